"""Text in, text out: tokenize prompts, group them by length into blocks, generate, decode.

    from flexgen.text import generate_text
    completions = generate_text(model, ["Paris is", "The moon"], max_new_tokens=16, stop=["\\n"])
    completions[0].text
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Completion:
    text: str
    token_ids: list[int]                 # generated tokens, up to and including a stop token
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str                   # "stop" (stop token or string, end of sequence) or "length"
    logprobs: list[float] | None = field(default=None)


def encode_prompts(tokenizer, prompts, chat: bool = False) -> list[list[int]]:
    rows = []
    for text in prompts:
        if chat:
            enc = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
            if hasattr(enc, "keys"):
                enc = enc["input_ids"]
        else:
            enc = tokenizer.encode(text)
        rows.append([int(t) for t in enc])
    return rows


def _stop_token_ids(tokenizer, stop_strings, eos):
    """Single-token stop strings and the end-of-sequence tokens end a sequence inside the engine;
    longer stop strings are cut from the text afterwards."""
    ids = set()
    for s in stop_strings:
        enc = tokenizer.encode(s, add_special_tokens=False)
        if len(enc) == 1:
            ids.add(int(enc[0]))
    if eos is not None:
        ids.update([eos] if isinstance(eos, int) else eos)
    return ids


def generate_text(lm, prompts, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop=None, chat: bool = False,
                  logprobs: bool = False, stop_at_eos: bool = True, tokenizer=None) -> list[Completion]:
    """Completions for a list of strings, in input order.

    Prompts are sorted by token length and run in blocks of gpu_batch_size x num_gpu_batches, so a
    block pads its prompts only to the longest of similar lengths; each prompt's answer is what it
    would get alone (greedy). temperature 0 means greedy."""
    tok = tokenizer or lm.tokenizer
    if tok is None:
        raise ValueError("this model has no tokenizer: pass token ids to generate() instead")
    stop_strings = [stop] if isinstance(stop, str) else list(stop or [])
    rows = encode_prompts(tok, prompts, chat)
    stop_ids = _stop_token_ids(tok, stop_strings, lm.info.eos_token_id if stop_at_eos else None)
    sample = do_sample and temperature > 0
    results: list[Completion | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    block = lm.policy.block_size
    pad = lm.info.pad_token_id
    for b in range(0, len(order), block):
        idx = order[b:b + block]
        width = max(len(rows[i]) for i in idx)
        ids = np.full((len(idx), width), pad, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=bool)
        for r, i in enumerate(idx):
            ids[r, width - len(rows[i]):] = rows[i]
            mask[r, width - len(rows[i]):] = True
        out = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature or 1.0,
                          stop=sorted(stop_ids) or None, top_k=top_k, top_p=top_p, seed=seed,
                          attention_mask=mask, return_logprobs=logprobs)
        out, lps = out if logprobs else (out, None)
        for r, i in enumerate(idx):
            gen = out[r, width:].tolist()
            lp = None if lps is None else lps[r].tolist()
            results[i] = _finish(tok, gen, lp, len(rows[i]), stop_ids, stop_strings)
    return results


def _finish(tok, gen, lp, prompt_tokens, stop_ids, stop_strings) -> Completion:
    cut = next((n for n, t in enumerate(gen) if t in stop_ids), None)
    reason = "length"
    if cut is not None:
        gen, reason = gen[:cut + 1], "stop"
    text = tok.decode(gen, skip_special_tokens=True)
    hits = [text.find(s) for s in stop_strings if s and s in text]
    if hits:
        text, reason = text[:min(hits)], "stop"
    return Completion(text=text, token_ids=gen, prompt_tokens=prompt_tokens, completion_tokens=len(gen),
                      finish_reason=reason, logprobs=None if lp is None else lp[:len(gen)])
