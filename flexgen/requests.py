"""The one request layer: generate and score requests of any length and decoding parameters ->
grouped blocks -> results in input order. Every app and integration (batch files, HELM,
lm-eval, data wrangling, perplexity) goes through here; none writes its own batching loop.

    runner = RequestRunner(lm)
    results = runner.generate([GenerationRequest("Paris is", max_new_tokens=8, logprobs=True)])
    results[0].completions[0].text
    runner.score([ScoreRequest("The capital of France is", " Paris")])[0].logprob

Requests with the same decoding parameters are sorted by prompt length and run in blocks of
gpu_batch_size x num_gpu_batches, left-padded to the block's longest prompt (or to pad_to_seq_len),
so a greedy answer is what the prompt gets alone. A block that runs out of memory is retried with
half the GPU batch, as long as one remains.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .engine.generate import GenerationError
from .engine.sampling import SamplingParams
from .memory.oom import OutOfMemory, first_line, is_out_of_memory, which_memory


@dataclass
class GenerationRequest:
    prompt: object                         # text, token ids, or chat messages [{"role", "content"}]
    max_new_tokens: int = 32               # 0 only with echo: score the prompt, generate nothing
    temperature: float = 0.0               # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple = ()                       # stop strings
    n: int = 1                             # completions per prompt
    seed: int | None = None
    logprobs: bool = False                 # logprob of each generated token
    top_logprobs: int = 0                  # and its k best alternatives
    echo: bool = False                     # logprobs of the prompt's own tokens too
    chat: bool = False                     # a text prompt wrapped in the chat template
    stop_at_eos: bool = True

    def __post_init__(self):
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def sampled(self) -> bool:
        return self.temperature > 1e-5

    def group_key(self) -> tuple:
        """Requests that can share a block: the same decoding parameters."""
        return (self.max_new_tokens, self.sampled and self.temperature, self.sampled and self.top_p,
                self.sampled and self.top_k, self.sampled and self.seed, self.stop, self.stop_at_eos,
                self.logprobs or self.top_logprobs > 0 or self.echo, self.top_logprobs, self.echo)


@dataclass
class TokenLogprob:
    token_id: int
    text: str
    logprob: float | None                  # None for a first prompt token (nothing before it)
    top: list = field(default_factory=list)   # [(id, text, logprob)], best first


@dataclass
class CompletionOut:
    text: str
    token_ids: list
    finish_reason: str                     # "stop" (stop token or string) or "length"
    tokens: list | None = None             # [TokenLogprob] per generated token

    @property
    def logprob(self) -> float:
        return sum(t.logprob for t in self.tokens or [])


@dataclass
class GenerationResult:
    prompt_token_ids: list
    completions: list                      # n CompletionOut
    prompt_tokens: list | None = None      # [TokenLogprob] with echo
    error: str | None = None               # why the request was not run (nothing else is set)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)


@dataclass
class ScoreRequest:
    context: object                        # text or ids; "" = only the BOS (or EOS) token as context
    continuation: object | None = None     # text or ids; None = score every token of context (rolling)


@dataclass
class ScoreResult:
    logprob: float                         # sum over the scored tokens
    is_greedy: bool                        # every scored token was the model's argmax
    num_tokens: int


class RequestRunner:
    def __init__(self, lm, pad_to_seq_len: int | None = None, progress: bool = True, log=print, tokenizer=None):
        self.lm = lm
        self.tok = tokenizer or lm.tokenizer
        self.pad_to = pad_to_seq_len
        self.progress = progress
        self.log = log
        self.stats = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "seconds": 0.0, "blocks": 0,
                      "retries": 0}

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, requests, on_result=None) -> list:
        t0 = time.perf_counter()
        results = [None] * len(requests)
        rows = []            # (request index, completion index, prompt ids)
        for i, r in enumerate(requests):
            try:
                ids = self.encode(r.prompt, r.chat)
                self._check(r, ids)
            except GenerationError as e:
                results[i] = GenerationResult([], [], error=str(e))
                if on_result is not None:
                    on_result(i, results[i])
                continue
            # n rows for n completions; a prompt that is only scored (echo, no new tokens) runs once
            copies = max(r.n, 1) if r.max_new_tokens > 0 else 1
            results[i] = GenerationResult(ids, [None] * copies if r.max_new_tokens > 0 else [])
            rows.extend((i, j, ids) for j in range(copies))
        pending = {}          # rows still to run per request: its result is handed on at 0
        for i, _, _ in rows:
            pending[i] = pending.get(i, 0) + 1
        groups = {}
        for row in rows:
            groups.setdefault(requests[row[0]].group_key(), []).append(row)
        with self._bar(len(rows), "generate") as bar:
            for group in groups.values():
                req = requests[group[0][0]]
                group.sort(key=lambda row: len(row[2]))
                for part in self._blocks(group):
                    self._generate_block(req, part, results, requests)
                    for i, j, _ in part:
                        pending[i] -= 1
                        if pending[i] == 0 and on_result is not None:
                            on_result(i, results[i])
                    bar.update(len(part))
        self._count(requests, results, t0)
        return results

    def _generate_block(self, req, part, results, requests):
        lm = self.lm
        steps = max(req.max_new_tokens, 1)
        ids, mask, width = self._pad([row[2] for row in part])
        stop_ids = self._stop_token_ids(req)
        params = SamplingParams(do_sample=req.sampled, temperature=req.temperature if req.sampled else 1.0,
                                top_k=req.top_k, top_p=req.top_p, seed=req.seed)
        want_lp = req.logprobs or req.top_logprobs > 0
        out = self._run_retrying(lambda rows, m: lm.run_rows(rows, m, steps, params, sorted(stop_ids) or None,
                                                             logprobs=want_lp,
                                                             top_logprobs=req.top_logprobs, score=req.echo),
                                 ids, mask)
        for r, (i, j, prompt) in enumerate(part):
            res = results[i]
            if req.echo and res.prompt_tokens is None:
                res.prompt_tokens = self._prompt_logprobs(out, r, prompt, width, requests[i].top_logprobs)
            if req.max_new_tokens == 0:
                continue
            gen = out.ids[r, width:width + steps].tolist()
            cut = next((n for n, t in enumerate(gen) if t in stop_ids), None)
            reason = "length"
            if cut is not None:
                gen, reason = gen[:cut + 1], "stop"
            tokens = None
            if want_lp:
                tokens = [self._token(t, out.logprobs[r, n],
                                      None if out.top_ids is None else (out.top_ids[r, n], out.top_logprobs[r, n]))
                          for n, t in enumerate(gen)]
            text = self._decode(gen)
            hits = [text.find(s) for s in req.stop if s and s in text]
            if hits:  # the text is cut; the tokens stay as generated (up to the stop token)
                text, reason = text[:min(hits)], "stop"
            res.completions[j] = CompletionOut(text, gen, reason, tokens)

    # ---- scoring -------------------------------------------------------------------------------
    def score(self, requests, on_result=None) -> list:
        """Log-likelihood of each continuation given its context (lm-eval's loglikelihood), or of
        every token of a text (continuation None: lm-eval's loglikelihood_rolling, in windows of
        the model's context). Run through the prefill path with the head over every position."""
        t0 = time.perf_counter()
        results = [None] * len(requests)
        windows = []          # (request index, token ids, number of scored tokens at the end)
        for i, r in enumerate(requests):
            for ids, n in self._score_windows(r):
                windows.append((i, ids, n))
        parts = {i: [] for i in range(len(requests))}
        counts = {i: 0 for i in range(len(requests))}
        for i, _, _ in windows:
            counts[i] += 1
        order = sorted(range(len(windows)), key=lambda w: len(windows[w][1]))
        with self._bar(len(windows), "score") as bar:
            for part in self._blocks(order):
                # a row's last token is not fed: it is the forced token of the one decode step,
                # scored from the logits at the end of the rest (as a Hugging Face model scores
                # max_length + 1 tokens by feeding max_length)
                rows = [windows[w][1][:-1] for w in part]
                last = [[windows[w][1][-1]] for w in part]
                ids, mask, width = self._pad(rows)
                out = self._run_retrying(
                    lambda r, m, last=last: self.lm.run_rows(r, m, 1, SamplingParams(), score=True, logprobs=True,
                                                             top_logprobs=1, forced=last),
                    ids, mask)
                for r, w in enumerate(part):
                    i, seq, n = windows[w]
                    fed = n - 1      # scored tokens among the fed ones, at the end of the row
                    lp = float(out.scores[r, width - fed:width].sum()) + float(out.logprobs[r, 0])
                    greedy = bool((out.score_argmax[r, width - fed:width] == np.asarray(seq[-n:-1], dtype=np.int64)).all()
                                  and out.top_ids[r, 0, 0] == seq[-1])
                    parts[i].append((lp, greedy, n))
                    if len(parts[i]) == counts[i]:
                        results[i] = ScoreResult(sum(p[0] for p in parts[i]), all(p[1] for p in parts[i]),
                                                 sum(p[2] for p in parts[i]))
                        if on_result is not None:
                            on_result(i, results[i])
                bar.update(len(part))
        self.stats["requests"] += len(requests)
        self.stats["prompt_tokens"] += sum(len(w[1]) for w in windows)
        self.stats["seconds"] += time.perf_counter() - t0
        return results

    def _score_windows(self, r):
        """[(ids, n)]: rows to run and how many tokens at each row's end are scored."""
        limit = self.lm.info.max_seq_len + 1   # rows feed all but their last token
        prefix = self._prefix_token()
        if r.continuation is None:
            toks = self.encode(r.context)
            if not toks:
                raise GenerationError("a rolling score needs a non-empty text")
            return rolling_windows(toks, prefix, limit - 1)
        ctx = self.encode(r.context) if r.context not in ("", []) else []
        cont = self.encode(r.continuation, add_special=False)
        if not cont:
            raise GenerationError("a scored continuation must have at least one token")
        ctx = ctx or [prefix]
        seq = (ctx + cont)[-limit:]
        return [(seq, min(len(cont), len(seq) - 1))]

    def _prefix_token(self) -> int:
        info = self.lm.info
        if info.bos_token_id is not None:
            return info.bos_token_id
        eos = info.eos_token_id
        return eos[0] if isinstance(eos, list) else (eos if eos is not None else info.pad_token_id)

    # ---- blocks, padding, retries ---------------------------------------------------------------
    def _blocks(self, items):
        """Consecutive slices of one block each (the block size may shrink after a retry)."""
        pos = 0
        while pos < len(items):
            size = self.lm.policy.block_size
            yield items[pos:pos + size]
            pos += size

    def _pad(self, rows):
        width = max(len(r) for r in rows)
        if self.pad_to:
            width = max(width, min(self.pad_to, self.lm.info.max_seq_len - 1))
        pad = self.lm.info.pad_token_id
        ids = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=bool)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = row
            mask[r, width - len(row):] = True
        return ids, mask, width

    def _run_retrying(self, run, ids, mask):
        """run(ids, mask) -> BlockResult; on running out of memory, halve the GPU batch and run the
        rows again (the weights stay where they are)."""
        while True:
            try:
                out = run(ids, mask)
                self.stats["blocks"] += 1
                return out
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                p = self.lm.policy
                self._free_memory()
                if p.gpu_batch_size == 1 and p.num_gpu_batches == 1:
                    raise OutOfMemory(f"out of {which_memory(e)} memory even with a GPU batch of 1 "
                                      f"({first_line(e)}); put more of the weights or cache off the GPU "
                                      "or on disk") from None
                gbs, ngb = (p.gpu_batch_size // 2, p.num_gpu_batches) if p.gpu_batch_size > 1 else \
                    (1, p.num_gpu_batches // 2)
                self.log(f"out of {which_memory(e)} memory in a block of {p.gpu_batch_size} x "
                         f"{p.num_gpu_batches} ({first_line(e)}); retrying with --gpu-batch-size {gbs} --num-gpu-batches {ngb}")
                self.stats["retries"] += 1
                self.lm.resize_batch(gbs, ngb)

    def _free_memory(self):
        import gc

        import torch
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- tokens and text --------------------------------------------------------------------------
    def encode(self, prompt, chat: bool = False, add_special: bool = True) -> list:
        if isinstance(prompt, (list, tuple, np.ndarray)) and (len(prompt) == 0 or not isinstance(prompt[0], dict)):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.lm.info.vocab_size]
            if bad:
                raise GenerationError(f"token id {bad[0]} is outside the vocabulary (size {self.lm.info.vocab_size})")
            return ids
        tok = self._tokenizer()
        if isinstance(prompt, (list, tuple)):   # chat messages
            return self._chat(prompt)
        if not isinstance(prompt, str):
            raise GenerationError(f"a prompt must be text, token ids or chat messages, got {type(prompt).__name__}")
        if chat:
            return self._chat([{"role": "user", "content": prompt}])
        return [int(t) for t in tok.encode(prompt, add_special_tokens=add_special)]

    def _chat(self, messages) -> list:
        tok = self._tokenizer()
        if not getattr(tok, "chat_template", None):
            raise GenerationError("this model's tokenizer has no chat template; send a plain prompt")
        try:
            enc = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        except Exception as e:  # a malformed message list
            raise GenerationError(f"chat messages could not be formatted: {e}") from None
        if hasattr(enc, "keys"):
            enc = enc["input_ids"]
        return [int(t) for t in enc]

    def _tokenizer(self):
        if self.tok is None:
            raise GenerationError("this model has no tokenizer: send token ids instead of text")
        return self.tok

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True) if self.tok is not None else ""

    def _piece(self, t) -> str:
        return self.tok.decode([int(t)]) if self.tok is not None else ""

    def _token(self, t, lp, top) -> TokenLogprob:
        alts = []
        if top is not None:
            alts = [(int(a), self._piece(a), float(v)) for a, v in zip(*top)]
        return TokenLogprob(int(t), self._piece(t), None if lp is None else float(lp), alts)

    def _prompt_logprobs(self, out, r, prompt, width, k):
        off = width - len(prompt)
        toks = []
        for n, t in enumerate(prompt):
            top = None
            if k and n > 0:
                top = (out.prompt_top_ids[r, off + n], out.prompt_top_logprobs[r, off + n])
            toks.append(self._token(t, out.scores[r, off + n] if n > 0 else None, top))
        return toks

    def _stop_token_ids(self, req) -> set:
        """Single-token stop strings and the end-of-sequence tokens end a sequence inside the engine;
        longer stop strings are cut from the text afterwards."""
        ids = set()
        for s in req.stop:
            if self.tok is not None:
                enc = self.tok.encode(s, add_special_tokens=False)
                if len(enc) == 1:
                    ids.add(int(enc[0]))
        eos = self.lm.info.eos_token_id if req.stop_at_eos else None
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
        return ids

    def _check(self, r, ids):
        if not ids:
            raise GenerationError("empty prompt")
        if r.max_new_tokens < 0 or (r.max_new_tokens == 0 and not r.echo):
            raise GenerationError(f"max_new_tokens must be >= 1 (or 0 with echo), got {r.max_new_tokens}")
        if r.n < 1:
            raise GenerationError(f"n must be >= 1, got {r.n}")
        if r.top_logprobs < 0 or r.top_logprobs > self.lm.info.vocab_size:
            raise GenerationError(f"top_logprobs must be in [0, {self.lm.info.vocab_size}], got {r.top_logprobs}")
        total = len(ids) + max(r.max_new_tokens, 1)
        if total > self.lm.info.max_seq_len:
            raise GenerationError(f"prompt of {len(ids)} tokens + {r.max_new_tokens} new tokens exceeds the "
                                  f"model's context of {self.lm.info.max_seq_len}")
        try:
            SamplingParams(r.sampled, r.temperature if r.sampled else 1.0, r.top_k, r.top_p, r.seed)
        except ValueError as e:
            raise GenerationError(str(e)) from None

    # ---- bookkeeping ------------------------------------------------------------------------------
    def _bar(self, total, what):
        from tqdm import tqdm
        return tqdm(total=total, desc=what, unit="seq", disable=not self.progress or total == 0)

    def _count(self, requests, results, t0):
        ok = [r for r in results if r is not None and r.error is None]
        self.stats["requests"] += len(requests)
        self.stats["prompt_tokens"] += sum(r.prompt_len * max(len(r.completions), 1) for r in ok)
        self.stats["completion_tokens"] += sum(r.completion_tokens for r in ok)
        self.stats["seconds"] += time.perf_counter() - t0

    def throughput(self) -> float:
        """Input + output tokens per second, as FlexGen reports its HELM and data-wrangling runs."""
        s = self.stats
        return (s["prompt_tokens"] + s["completion_tokens"]) / max(s["seconds"], 1e-9)


def open_model_for_requests(args, prompt_len: int, gen_len: int, need_tokenizer: bool = True):
    """(lm, env) from the shared CLI flags, --percent auto included (the policy chosen for this
    workload: prompts of prompt_len, gen_len new tokens). The caller closes: lm.close();
    env.close_copy_threads()."""
    from .cli import open_model
    return open_model(args, need_tokenizer=need_tokenizer, workload=(max(1, prompt_len), max(1, gen_len)))


def rolling_windows(toks, prefix, size):
    """[(row, n)] covering every token of toks once, as lm-eval's rolling windows do: the first
    window predicts up to `size` tokens after the prefix token, each later one up to `size` more,
    each seeing up to `size` tokens before its last; n is the count scored at the row's end."""
    first = min(size, len(toks))
    out = [([prefix] + toks[:first], first)]
    done = first
    while done < len(toks):
        n = min(size, len(toks) - done)
        end = done + n
        out.append((toks[max(0, end - size - 1):end], n))
        done = end
    return out
