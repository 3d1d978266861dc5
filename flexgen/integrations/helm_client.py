"""FlexGen as a HELM model deployment: HELM's Request in, HELM's RequestResult out, every request
list handed whole to flexgen.requests (which groups, sorts and batches; nothing here does).

Two ways in (README, "HELM"):
- `python3 -m flexgen.apps.helm_run ...`: HELM's own Runner with an executor that hands all requests
  of a run to `FlexGenClient.make_requests` at once (flexgen/integrations/helm_runner.py).
- `helm-run --run-entries "...,model=flexgen/<name>"` with the deployment entries that
  `python3 -m flexgen.integrations.helm_config` writes: HELM's threads call `make_request` one
  request each; concurrent calls are gathered and run as one list.

One loaded model per process and deployment (`Engine`), opened on the first requests, closed at
exit. HELM's Token carries (text, logprob) only; the top-k alternatives that `top_k_per_token` asks
for ride along in `FlexGenToken.top_logprobs` (a Token subclass, so HELM's metrics and its JSON
readers see an ordinary Token with one more field).
"""
from __future__ import annotations

import argparse
import atexit
import os
import shlex
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from helm.clients.client import CachingClient
from helm.common.request import (EMBEDDING_UNAVAILABLE_REQUEST_RESULT, ErrorFlags, GeneratedOutput, Request,
                                 RequestResult, Token)
from helm.tokenizers.huggingface_tokenizer import HuggingFaceTokenizer, WrappedPreTrainedTokenizer

from ..requests import CompletionOut, GenerationRequest, GenerationResult, RequestRunner, open_model_for_requests


@dataclass(frozen=True)
class FlexGenToken(Token):
    """A HELM Token plus the top alternatives at its position: {token text: logprob}, best first."""
    top_logprobs: Dict[str, float] = field(default_factory=dict)


# ---- engine flags ---------------------------------------------------------------------------------

def add_engine_arguments(parser: argparse.ArgumentParser):
    """FlexGen's shared model/policy flags plus what a HELM backend needs."""
    from ..cli import add_arguments
    from ..models.registry import EMBEDDED_DEFAULT
    add_arguments(parser, default_model=EMBEDDED_DEFAULT, default_path=None)
    parser.add_argument("--pad-to-seq-len", type=int, default=None,
                        help="left-pad every prompt block to this many tokens (FlexGen's HELM runs: 512)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (num_completions > 1, temperature > 0)")
    parser.add_argument("--tokenizer", type=str, default=None,
                        help="tokenizer source when the model has none (dummy weights): a HF directory, a .gguf "
                             "file, or a model name")
    # The original's scripts pass --cpu, an argparse abbreviation of --cpu-cache-compute there.
    parser.add_argument("--cpu", dest="cpu_cache_compute", action="store_true", help=argparse.SUPPRESS)


def _engine_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexgen HELM deployment", add_help=False)
    add_engine_arguments(parser)
    return parser


def engine_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """Only the engine's flags of a larger command line (what decides whether an engine is reused)."""
    dests = {a.dest for a in _engine_parser()._actions}
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if k in dests})


def parse_engine_flags(model: str, flags) -> argparse.Namespace:
    from .. import cli
    parser = _engine_parser()
    argv = ["--model", model] + (shlex.split(flags) if isinstance(flags, str) else list(flags or []))
    try:
        return parser.parse_args(argv)
    except SystemExit:
        raise cli.PolicyError(f"bad FlexGen flags for {model}: {' '.join(argv)}") from None


# ---- the model's own tokenizer, offline -------------------------------------------------------------

_tokenizers: dict = {}
# re-entrant: a stand-in tokenizer (--tokenizer) is loaded through model_tokenizer itself
_tokenizers_lock = threading.RLock()


def model_tokenizer(model: str, path: Optional[str] = None, tokenizer: Optional[str] = None):
    """The Hugging Face tokenizer of `model` (its HF directory or GGUF file; `tokenizer` names a
    stand-in), loaded once per process and shared by HELM's tokenizer service and the engine."""
    key = (model, path, tokenizer)
    with _tokenizers_lock:
        if key not in _tokenizers:
            _tokenizers[key] = _load_tokenizer(model, path, tokenizer)
        return _tokenizers[key]


def _load_tokenizer(model, path, tokenizer):
    from ..engine.generate import _cached_hub_snapshot
    from ..models.registry import resolve_model
    from ..weights import WeightsError, load_tokenizer
    if tokenizer is not None and tokenizer != model:
        return model_tokenizer(tokenizer)
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        tok = load_tokenizer(model)    # a directory of tokenizer files only (a stand-in's)
        if tok is not None:
            return tok
    resolved = resolve_model(model)
    # The engine keeps a GGUF's rebuilt tokenizer in its weight cache (seconds faster to load).
    root = os.path.expanduser(path or os.path.join("~", resolved.family.family + "_weights"))
    saved = os.path.join(root, f"{resolved.name}-np", "tokenizer")
    for source in (saved, resolved.source,
                   _cached_hub_snapshot(resolved.hub_name) if resolved.hub_name else None):
        if source and os.path.exists(source):
            tok = load_tokenizer(source)
            if tok is not None:
                if str(source).endswith(".gguf"):
                    try:
                        tok.save_pretrained(saved)
                    except OSError:
                        pass    # a read-only cache only costs time
                return tok
    raise WeightsError(f"{model}: no tokenizer found offline; give --tokenizer (a HF directory, a .gguf file "
                       f"or a model name) to use a stand-in")


class FlexGenTokenizer(HuggingFaceTokenizer):
    """HELM's Hugging Face tokenizer service over the model's own tokenizer (a GGUF's included),
    never reaching the hub. tokenizer_configs.yaml: class_name
    flexgen.integrations.helm_client.FlexGenTokenizer, args {model, path, tokenizer}."""

    def __init__(self, cache_config, tokenizer_name: str, model: str, path: Optional[str] = None,
                 tokenizer: Optional[str] = None):
        super().__init__(cache_config=cache_config, tokenizer_name=tokenizer_name)
        self._source = (model, path, tokenizer)
        self._wrapped: Optional[WrappedPreTrainedTokenizer] = None

    def get_wrapped_tokenizer(self) -> WrappedPreTrainedTokenizer:
        if self._wrapped is None:
            self._wrapped = WrappedPreTrainedTokenizer(model_tokenizer(*self._source))
        return self._wrapped


# ---- HELM Request <-> flexgen.requests ----------------------------------------------------------------

class UnsupportedRequest(ValueError):
    pass


def to_generation_request(r: Request, tokenizer, seed: int, chat: bool = False) -> GenerationRequest:
    """The GenerationRequest for a HELM Request. Text prompts go as the token ids HELM's own
    tokenizer service counts (tokenizer.encode), so a prompt is exactly as long as HELM thinks."""
    if r.multimodal_prompt is not None:
        raise UnsupportedRequest("multimodal prompts are not supported by FlexGen")
    if r.messages:
        prompt, chat = list(r.messages), True
    elif chat:
        prompt = r.prompt
    else:   # a prompt HELM began with the prefix (BOS) token must not get a second one
        bos = getattr(tokenizer, "bos_token", None)
        prompt = [int(t) for t in tokenizer.encode(r.prompt, add_special_tokens=not (bos and r.prompt.startswith(bos)))]
    return GenerationRequest(prompt=prompt, max_new_tokens=r.max_tokens, temperature=float(r.temperature),
                             top_p=float(r.top_p), stop=tuple(s for s in r.stop_sequences if s),
                             n=r.num_completions, seed=seed, logprobs=True,
                             top_logprobs=max(int(r.top_k_per_token), 0), echo=r.echo_prompt, chat=chat)


def _token(t) -> Token:
    top: Dict[str, float] = {}
    for _, text, lp in t.top:
        top.setdefault(text, float(lp))    # best first: a text two ids share keeps the better one
    lp = 0.0 if t.logprob is None else float(t.logprob)
    return FlexGenToken(text=t.text, logprob=lp, top_logprobs=top)


def _covering(tokenizer, ids, text) -> int:
    """How many of the generated tokens the (stop-cut) text is made of: the stop token and
    end-of-text are dropped, as HELM's truncate_sequence does for its Hugging Face client."""
    for k in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:k], skip_special_tokens=True)) >= len(text):
            return k
    return len(ids)


def to_request_result(r: Request, res: GenerationResult, tokenizer, eos_ids=(), seconds: float = 0.0,
                      started: float = 0.0, batch_size: int = 1, batch_seconds: float = 0.0) -> RequestResult:
    completions = []
    # max_tokens 0 with echo_prompt (scoring a prompt): one completion made of the prompt alone
    outs = res.completions or [CompletionOut("", [], "length", []) for _ in range(max(r.num_completions, 1))]
    for c in outs:
        gen = [_token(t) for t in (c.tokens or [])]
        keep = _covering(tokenizer, c.token_ids, c.text) if c.finish_reason == "stop" else len(gen)
        ended_by_eos = bool(c.token_ids) and c.token_ids[-1] in eos_ids and keep < len(c.token_ids)
        gen = gen[:keep]
        text = c.text
        tokens = gen
        if r.echo_prompt:
            prompt_text = r.prompt if r.prompt else tokenizer.decode(res.prompt_token_ids)
            tokens = [_token(t) for t in (res.prompt_tokens or [])] + gen
            text = prompt_text + c.text
        reason = "endoftext" if ended_by_eos else c.finish_reason
        completions.append(GeneratedOutput(text=text, logprob=sum(t.logprob for t in tokens), tokens=tokens,
                                           finish_reason={"reason": reason}))
    return RequestResult(success=True, embedding=[], completions=completions, cached=False, request_time=seconds,
                         request_datetime=int(started), batch_size=batch_size, batch_request_time=batch_seconds)


def _failed(message: str, fatal: bool = False) -> RequestResult:
    return RequestResult(success=False, embedding=[], completions=[], cached=False, error=message,
                         error_flags=ErrorFlags(is_retriable=False, is_fatal=fatal))


# ---- one loaded model per process and deployment ----------------------------------------------------

class Engine:
    """A FlexGen model and its RequestRunner, opened on first use for the shape of the first
    requests (the policy check and --percent auto need prompt and generation lengths)."""

    _pool: Dict[str, "Engine"] = {}
    _pool_lock = threading.Lock()

    def __init__(self, args: argparse.Namespace, log=print):
        self.args = args
        self.log = log
        self.lm = self.env = self.runner = None
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "seconds": 0.0,
                      "load_seconds": 0.0}

    @classmethod
    def install(cls, name: str, args: argparse.Namespace, log=print) -> "Engine":
        """Make `name` (a HELM model deployment) run on an engine with these flags."""
        with cls._pool_lock:
            old = cls._pool.get(name)
            if old is not None and vars(old.args) == vars(args):
                return old
            if old is not None:
                old.close()
            cls._pool[name] = engine = Engine(args, log)
            return engine

    @classmethod
    def close_all(cls):
        """Close every engine and forget them (the next request opens a fresh one)."""
        with cls._pool_lock:
            for e in cls._pool.values():
                e.close()
            cls._pool.clear()

    @classmethod
    def get(cls, name: str, model: str, flags) -> "Engine":
        with cls._pool_lock:
            if name not in cls._pool:
                cls._pool[name] = Engine(parse_engine_flags(model, flags))
            return cls._pool[name]

    @property
    def tokenizer(self):
        return model_tokenizer(self.args.model, self.args.path, self.args.tokenizer)

    def _open(self, prompt_len: int, gen_len: int):
        a = self.args
        if a.pad_to_seq_len:
            prompt_len = max(prompt_len, a.pad_to_seq_len)
        self.lm, self.env = open_model_for_requests(a, prompt_len, max(gen_len, 1), need_tokenizer=False)
        # HELM's tokenizer object, also for dummy weights (which have none): one tokenization.
        self.runner = RequestRunner(self.lm, pad_to_seq_len=a.pad_to_seq_len, progress=a.verbose >= 1, log=self.log,
                                    tokenizer=self.tokenizer)
        atexit.register(self.close)

    def close(self):
        if self.lm is not None:
            self.lm.close()
            self.env.close_copy_threads()
            self.lm = self.env = self.runner = None

    def run(self, requests: List[Request]) -> List[RequestResult]:
        """Results for HELM requests, in order; all of them go to the request layer together."""
        with self._lock:
            return self._run(requests)

    def _run(self, requests):
        tok = self.tokenizer
        results: List[Optional[RequestResult]] = [None] * len(requests)
        todo, gen_requests = [], []
        for i, r in enumerate(requests):
            if r.embedding:
                results[i] = EMBEDDING_UNAVAILABLE_REQUEST_RESULT
                continue
            if r.max_tokens == 0 and not r.echo_prompt:   # nothing to generate or score
                results[i] = RequestResult(success=True, embedding=[], cached=False, request_time=0.0, completions=[
                    GeneratedOutput(text="", logprob=0.0, tokens=[], finish_reason={"reason": "length"})
                    for _ in range(r.num_completions)])
                continue
            try:
                g = to_generation_request(r, tok, self.args.seed, self.args.chat)
            except UnsupportedRequest as e:
                results[i] = _failed(str(e))
                continue
            todo.append(i)
            gen_requests.append(g)
        if gen_requests:
            if self.lm is None:
                t = time.time()
                longest = max(len(g.prompt) if not isinstance(g.prompt, str) else len(tok.encode(g.prompt))
                              for g in gen_requests)
                self._open(longest, max(g.max_new_tokens for g in gen_requests))
                self.stats["load_seconds"] += time.time() - t
            before = dict(self.runner.stats)
            t0 = time.time()
            outs = self.runner.generate(gen_requests)
            seconds = time.time() - t0
            eos = self.lm.info.eos_token_id
            eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
            for i, out in zip(todo, outs):
                if out.error is not None:   # this request only (a prompt longer than the context, say)
                    results[i] = _failed(out.error)
                else:
                    results[i] = to_request_result(requests[i], out, tok, eos_ids, seconds / len(outs), t0,
                                                   len(outs), seconds)
            for k in ("requests", "prompt_tokens", "completion_tokens", "seconds"):
                self.stats[k] += self.runner.stats[k] - before[k]
        return results


class _Gatherer:
    """HELM's executor calls make_request from several threads, one request each; calls that
    arrive while the engine is busy (or within `linger` seconds) go to it as one list."""

    def __init__(self, engine: Engine, linger: float = 0.05):
        self.engine, self.linger = engine, linger
        self._pending: list = []
        self._cond = threading.Condition()
        self._worker: Optional[threading.Thread] = None

    def submit(self, request: Request) -> RequestResult:
        fut: Future = Future()
        with self._cond:
            self._pending.append((request, fut))
            if self._worker is None:
                self._worker = threading.Thread(target=self._drain, daemon=True)
                self._worker.start()
            self._cond.notify()
        return fut.result()

    def _drain(self):
        while True:
            time.sleep(self.linger)
            with self._cond:
                batch, self._pending = self._pending, []
                if not batch:
                    self._worker = None
                    return
            try:
                outs = self.engine.run([r for r, _ in batch])
                for (_, fut), out in zip(batch, outs):
                    fut.set_result(out)
            except BaseException as e:   # every waiting caller sees the error
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)


class FlexGenClient(CachingClient):
    """HELM client for a FlexGen model. model_deployments.yaml: client_spec class_name
    flexgen.integrations.helm_client.FlexGenClient, args {model: <name, HF dir or .gguf>, flags:
    "<FlexGen flags: --percent ... --gpu-batch-size ... --num-gpu-batches ...>"}."""

    def __init__(self, cache_config=None, model_name: str = "", model: str = "smollm2-135m", flags: str = "",
                 linger: float = 0.05):
        super().__init__(cache_config=None)   # results are not cached: a whole run is one batch
        self.engine = Engine.get(model_name or f"flexgen/{model}", model, flags)
        self._gather = _Gatherer(self.engine, linger)

    def make_request(self, request: Request) -> RequestResult:
        return self._gather.submit(request)

    def make_requests(self, requests: List[Request]) -> List[RequestResult]:
        """All requests at once (what FlexGenRunner's executor calls)."""
        return self.engine.run(list(requests))
