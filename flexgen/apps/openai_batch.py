"""OpenAI Batch API files for the batch runner: input lines in, output lines out.

An input line (https://platform.openai.com/docs/guides/batch):

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}}

`url` is /v1/chat/completions (body.messages, through the model's chat template) or
/v1/completions (body.prompt: a string or a list of token ids). Body fields used: model,
max_tokens (chat: also max_completion_tokens), temperature, top_p, stop, n, seed, logprobs,
top_logprobs (chat: logprobs true/false and top_logprobs 0-20; completions: logprobs 0-5); fields
that would change the answer and that we cannot honour (penalties, logit_bias, tools, echo,
streaming, ...) make the line a 400 error. Others (user, metadata, ...) are ignored.

An output line, in OpenAI's batch output format:

    {"id": "batch_req_...", "custom_id": "r1",
     "response": {"status_code": 200, "request_id": "...", "body": {"id": "chatcmpl-...",
                  "object": "chat.completion", "created": ..., "model": ..., "choices": [...],
                  "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}},
     "error": null}

A bad request gets status_code 400 and body {"error": {"message", "type": "invalid_request_error",
"param", "code"}}, like the API's own per-request errors. The line's "id" is derived from its
custom_id, so the resumable writer (which keys a results file on "id") knows which custom_ids are
done: every custom_id appears exactly once however often the run is resumed.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field

from ..requests import GenerationRequest

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"

# body fields that change the answer and that this engine does not implement: (name, value that is harmless)
_UNSUPPORTED = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "tools": None,
                "functions": None, "tool_choice": None, "function_call": None, "stream": False, "echo": False,
                "best_of": 1, "suffix": None, "response_format": None, "audio": None, "modalities": None,
                "prediction": None}
_HARMLESS = {"response_format": [{"type": "text"}], "modalities": [["text"]], "tool_choice": ["none"]}


class OpenAIRequestError(ValueError):
    """A request the API would refuse with 400: message and the offending body field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def is_openai_line(obj) -> bool:
    """An object in the OpenAI batch input format (our own format has "id" and "prompt")."""
    return isinstance(obj, dict) and "custom_id" in obj and ("body" in obj or "url" in obj or "method" in obj)


def output_id(custom_id: str) -> str:
    """The output line's "id": fixed by the custom_id (so a rerun can tell what is done)."""
    return "batch_req_" + hashlib.sha256(custom_id.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class OpenAIRequest:
    custom_id: str
    url: str
    prompt: object                 # str (completions), list[int] (completions), list[dict] (chat)
    model: str | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple = ()
    n: int = 1
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    line: int | None = None
    error: OpenAIRequestError | None = field(default=None, compare=False)  # set: answer with this 400

    @property
    def id(self) -> str:
        return output_id(self.custom_id)

    @property
    def key(self) -> str:
        return json.dumps(self.id)

    @property
    def max_new_tokens(self) -> int:
        return self.max_tokens

    @property
    def chat(self) -> bool:
        return self.url == CHAT_URL

    @property
    def params(self) -> tuple:
        return (self.url, self.max_tokens, self.temperature, self.top_p, self.stop, self.n, self.seed,
                self.logprobs, self.top_logprobs)

    def where(self) -> str:
        return f"line {self.line}: custom_id {self.custom_id!r}" if self.line else f"custom_id {self.custom_id!r}"

    def generation_request(self) -> GenerationRequest:
        return GenerationRequest(prompt=self.prompt if isinstance(self.prompt, str) else list(self.prompt),
                                 max_new_tokens=self.max_tokens,
                                 temperature=self.temperature, top_p=self.top_p, stop=self.stop, n=self.n,
                                 seed=self.seed, logprobs=self.logprobs or self.top_logprobs > 0,
                                 top_logprobs=self.top_logprobs)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text_content(content, param):
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = []
        for p in content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise OpenAIRequestError(f"only text content parts are supported, got type {p.get('type')!r}", param)
            texts.append(p["text"])
        return "".join(texts)
    raise OpenAIRequestError("a message's content must be a string or a list of text parts", param)


def parse_openai_line(obj, default_max_tokens: int = 16, line: int | None = None) -> OpenAIRequest:
    """An OpenAIRequest from one input object. A line whose custom_id is usable but whose request is
    not comes back with .error set (it is answered with a 400 line); without a usable custom_id,
    OpenAIRequestError is raised (the line cannot be answered)."""
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    if not isinstance(cid, str) or not cid:
        raise OpenAIRequestError('"custom_id" must be a non-empty string')
    try:
        return _parse_body(obj, cid, default_max_tokens, line)
    except OpenAIRequestError as e:
        return OpenAIRequest(cid, str(obj.get("url")), None, line=line, error=e)


def _parse_body(obj, cid, default_max_tokens, line) -> OpenAIRequest:
    if obj.get("method", "POST") != "POST":
        raise OpenAIRequestError(f'"method" must be "POST", got {json.dumps(obj.get("method"))}', "method")
    url = obj.get("url")
    if url not in (CHAT_URL, COMPLETIONS_URL):
        raise OpenAIRequestError(f'"url" must be {CHAT_URL} or {COMPLETIONS_URL}, got {json.dumps(url)}', "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise OpenAIRequestError('"body" must be an object', "body")
    for name, harmless in _UNSUPPORTED.items():
        v = body.get(name)
        if v not in (None, {}, [], harmless) and v not in _HARMLESS.get(name, []):
            raise OpenAIRequestError(f'"{name}" is not supported by this server', name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise OpenAIRequestError('"model" must be a string', "model")
    chat = url == CHAT_URL

    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise OpenAIRequestError('"messages" must be a non-empty array', "messages")
        prompt = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise OpenAIRequestError(f"messages[{i}] must be an object with a role", f"messages[{i}]")
            role = "system" if m["role"] == "developer" else m["role"]
            prompt.append({"role": role, "content": _text_content(m.get("content"), f"messages[{i}].content")})
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]       # a one-element batch of prompts
        if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
            prompt = tuple(prompt)   # token ids
        elif isinstance(prompt, list):
            raise OpenAIRequestError("several prompts in one request are not supported: one line per prompt",
                                     "prompt")
        elif not isinstance(prompt, str) or not prompt:
            raise OpenAIRequestError('"prompt" must be a non-empty string or an array of token ids', "prompt")

    def get(name, default, ok, expected):
        v = body.get(name)
        if v is None:
            return default
        if not ok(v):
            raise OpenAIRequestError(f'"{name}" must be {expected}, got {json.dumps(v)[:40]}', name)
        return v

    max_tokens = get("max_tokens", None, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    if chat:
        max_tokens = get("max_completion_tokens", max_tokens, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    temperature = get("temperature", 1.0, lambda v: _is_number(v) and 0 <= v <= 2, "a number in [0, 2]")
    top_p = get("top_p", 1.0, lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    stop = get("stop", (), lambda v: isinstance(v, str) or (isinstance(v, list) and len(v) <= 4 and all(
        isinstance(s, str) for s in v)), "a string or an array of up to 4 strings")
    stop = (stop,) if isinstance(stop, str) else tuple(sorted(set(s for s in stop if s)))
    n = get("n", 1, lambda v: _is_int(v) and 1 <= v <= 128, "an integer in [1, 128]")
    seed = get("seed", None, _is_int, "an integer")
    if chat:
        logprobs = get("logprobs", False, lambda v: isinstance(v, bool), "a boolean")
        top = get("top_logprobs", 0, lambda v: _is_int(v) and 0 <= v <= 20, "an integer in [0, 20]")
        if top and not logprobs:
            raise OpenAIRequestError('"top_logprobs" needs "logprobs": true', "top_logprobs")
    else:
        lp = get("logprobs", None, lambda v: _is_int(v) and 0 <= v <= 5, "an integer in [0, 5]")
        logprobs, top = lp is not None, lp or 0
    return OpenAIRequest(cid, url, prompt, model, max_tokens, float(temperature), float(top_p), stop, n, seed,
                         bool(logprobs), int(top), line)


def chat_prompt_ids(tok, messages) -> list[int]:
    """Token ids of chat messages through the model's chat template (assistant turn opened)."""
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


# ---- output lines ------------------------------------------------------------------------------

def _finite(x):
    return float(x) if x is not None and math.isfinite(x) else -9999.0   # the API's floor for -inf


def _chat_logprobs(tokens):
    def entry(text, lp):
        return {"token": text, "logprob": _finite(lp), "bytes": list(text.encode("utf-8"))}
    return {"content": [dict(entry(t.text, t.logprob), top_logprobs=[entry(s, l) for _, s, l in t.top])
                        for t in tokens], "refusal": None}


def _completion_logprobs(tokens, offset: int):
    """The completions endpoint's shape. top_logprobs: per token, the `logprobs` best alternatives
    and the chosen token itself (so up to logprobs + 1 entries, as the API documents)."""
    texts, offsets, top = [], [], []
    for t in tokens:
        offsets.append(offset)
        texts.append(t.text)
        offset += len(t.text)
        d = {}
        for _, s, l in t.top:
            d.setdefault(s, _finite(l))   # two ids can decode to one string: keep the better
        d.setdefault(t.text, _finite(t.logprob))
        top.append(d)
    return {"tokens": texts, "token_logprobs": [_finite(t.logprob) for t in tokens], "top_logprobs": top,
            "text_offset": offsets}


def response_line(req: OpenAIRequest, result, model_name: str, created: int | None = None) -> dict:
    """The output line of a request that ran: result is the request layer's GenerationResult."""
    created = int(time.time()) if created is None else created
    model = req.model or model_name
    choices = []
    for i, c in enumerate(result.completions):
        tokens = c.tokens if req.logprobs else None
        if req.chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                            "logprobs": None if tokens is None else _chat_logprobs(tokens),
                            "finish_reason": c.finish_reason})
        else:
            prompt_chars = len(req.prompt) if isinstance(req.prompt, str) else 0
            choices.append({"text": c.text, "index": i,
                            "logprobs": None if tokens is None else _completion_logprobs(tokens, prompt_chars),
                            "finish_reason": c.finish_reason})
    usage = {"prompt_tokens": result.prompt_len, "completion_tokens": result.completion_tokens,
             "total_tokens": result.prompt_len + result.completion_tokens}
    digest = req.id[len("batch_req_"):]
    body = {"id": ("chatcmpl-" if req.chat else "cmpl-") + digest,
            "object": "chat.completion" if req.chat else "text_completion",
            "created": created, "model": model, "choices": choices, "usage": usage,
            "system_fingerprint": "flexgen"}
    return {"id": req.id, "custom_id": req.custom_id,
            "response": {"status_code": 200, "request_id": "req_" + digest, "body": body}, "error": None}


def error_line(req: OpenAIRequest, error: OpenAIRequestError) -> dict:
    """The output line of a request refused with 400 (the API's per-request error shape)."""
    digest = req.id[len("batch_req_"):]
    body = {"error": {"message": str(error), "type": "invalid_request_error", "param": error.param,
                      "code": error.code}}
    return {"id": req.id, "custom_id": req.custom_id,
            "response": {"status_code": 400, "request_id": "req_" + digest, "body": body}, "error": None}
