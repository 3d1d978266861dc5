"""Text in, text out: tokenize prompts, group them by length into blocks, generate, decode.

    from flexgen.text import generate_text
    completions = generate_text(model, ["Paris is", "The moon"], max_new_tokens=16, stop=["\\n"])
    completions[0].text
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .engine.generate import GenerationError


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


def generate_text(lm, prompts, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop=None, chat: bool = False,
                  logprobs: bool = False, stop_at_eos: bool = True, tokenizer=None, log=print) -> list[Completion]:
    """Completions for a list of strings, in input order (a thin layer over flexgen.requests).

    Prompts are sorted by token length and run in blocks of gpu_batch_size x num_gpu_batches, so a
    block pads its prompts only to the longest of similar lengths; each prompt's answer is what it
    would get alone (greedy). temperature 0 means greedy. log: where a retry after running out of
    memory is reported."""
    from .requests import GenerationRequest, RequestRunner
    tok = tokenizer or lm.tokenizer
    if tok is None:
        raise ValueError("this model has no tokenizer: pass token ids to generate() instead")
    temp = temperature if do_sample else 0.0
    reqs = [GenerationRequest(p, max_new_tokens=max_new_tokens, temperature=temp, top_k=top_k, top_p=top_p,
                              seed=seed, stop=stop or (), chat=chat, logprobs=logprobs, stop_at_eos=stop_at_eos)
            for p in prompts]
    out = []
    for r in RequestRunner(lm, progress=False, tokenizer=tok, log=log).generate(reqs):
        if r.error is not None:
            raise GenerationError(r.error)
        c = r.completions[0]
        out.append(Completion(text=c.text, token_ids=c.token_ids, prompt_tokens=r.prompt_len,
                              completion_tokens=len(c.token_ids), finish_reason=c.finish_reason,
                              logprobs=None if c.tokens is None else [t.logprob for t in c.tokens]))
    return out
