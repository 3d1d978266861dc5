"""Run a file of prompts through the engine without ever losing or duplicating work.

    python3 -m flexgen.apps.batch --model smollm2-135m --input prompts.jsonl --output results.jsonl

Input: one JSON object a line, {"id": "a1", "prompt": "...", "max_new_tokens": 32, "temperature": 0,
"top_p": 1.0, "stop": ["\\n"]}; only id (string or integer) and prompt are required. max_new_tokens
defaults to --gen-len, temperature to 0 (greedy). Output: one JSON object a line, {"id",
"completion", "prompt_tokens", "completion_tokens", "finish_reason"} (plus "logprobs" with
--logprobs), in the order requests finish.

Safety: requests with the same sampling parameters are sorted by length and run in chunks of
--chunk-blocks blocks of gpu_batch_size x num_gpu_batches; each chunk's lines are appended in one
write, flushed and fsync'ed. A rerun of the same command skips the ids already in the output, so a
crash or kill loses at most the chunk in flight; a partial last line left by a crash is cut off
first. Sampled chunks are seeded from --seed and the chunk's ids, so a resumed run samples what
the uninterrupted run would have. Malformed input lines are reported with their line numbers and
skipped (--strict: exit 2); duplicate ids are an error before anything runs.

From Python:

    from flexgen.apps.batch import run_batch
    summary = run_batch(lm, [{"id": 1, "prompt": "Paris is"}], "results.jsonl")
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from dataclasses import dataclass

from ..cli import add_arguments, main_errors, open_model, policy_from_args, positive_int
from ..engine.generate import GenerationError
from ..models.registry import EMBEDDED_DEFAULT
from ..requests import RequestRunner
from ..text import encode_prompts, generate_text
from .resumable import ResultsFileError, append_records, id_key, load_done, locked_output
from .openai_batch import (OpenAIRequest, OpenAIRequestError, chat_prompt_ids, error_line, is_openai_line,
                           parse_openai_line, response_line)

DEFAULT_MAX_NEW_TOKENS = 32


class BatchInputError(ValueError):
    """A malformed request, duplicate ids, or an unreadable input file (message meant for the user)."""


BatchOutputError = ResultsFileError   # the old name


@dataclass(frozen=True)
class Request:
    id: str | int
    prompt: str
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple = ()
    line: int | None = None          # input line number, for messages

    @property
    def key(self) -> str:
        return id_key(self.id)

    @property
    def params(self) -> tuple:
        return (self.max_new_tokens, self.temperature, self.top_p, self.stop)

    def where(self) -> str:
        return f"line {self.line}: id {self.key}" if self.line is not None else f"id {self.key}"


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object" if isinstance(v, dict) else type(v).__name__


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_request(obj, default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, line: int | None = None) -> Request:
    """A Request from one input object; BatchInputError says what is wrong with it. Fields other
    than id, prompt, max_new_tokens, temperature, top_p and stop are ignored."""
    if isinstance(obj, (Request, OpenAIRequest)):
        return obj
    if is_openai_line(obj):
        try:
            return parse_openai_line(obj, default_max_new_tokens, line=line)  # a bad request: .error, a 400 line
        except OpenAIRequestError as e:
            raise BatchInputError(str(e)) from None
    if not isinstance(obj, dict):
        raise BatchInputError(f"expected a JSON object, got {_json_type(obj)}")
    if "id" not in obj:
        raise BatchInputError('missing "id"')
    rid = obj["id"]
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise BatchInputError(f'"id" must be a string or an integer, got {_json_type(rid)}')
    if "prompt" not in obj:
        raise BatchInputError(f'id {id_key(rid)}: missing "prompt"')
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise BatchInputError(f'id {id_key(rid)}: "prompt" must be a string, got {_json_type(prompt)}')
    if not prompt:
        raise BatchInputError(f'id {id_key(rid)}: "prompt" is empty')

    def field(name, default, ok, expected):
        v = obj.get(name)
        if v is None:
            return default
        if not ok(v):
            raise BatchInputError(f'id {id_key(rid)}: "{name}" must be {expected}, got {json.dumps(v)[:40]}')
        return v

    max_new = field("max_new_tokens", default_max_new_tokens,
                    lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1")
    temperature = field("temperature", 0.0, lambda v: _is_number(v) and v >= 0, "a number >= 0")
    top_p = field("top_p", 1.0, lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    stop = field("stop", (), lambda v: isinstance(v, str) or (isinstance(v, list) and all(
        isinstance(s, str) for s in v)), "a string or a list of strings")
    stop = (stop,) if isinstance(stop, str) else tuple(sorted(set(s for s in stop if s)))
    return Request(rid, prompt, max_new, float(temperature), float(top_p), stop, line)


def read_requests(path, default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
    """(requests, problems) from a JSONL file: problems are (line number, message) for malformed
    lines, which are left out. Blank lines are ignored. Duplicate ids (on any line that has a
    usable id) raise BatchInputError naming the id and both line numbers.

    The format is detected from the file's first JSON object: OpenAI Batch API lines (with a
    "custom_id") come back as OpenAIRequests, a bad request among them with .error set (it is
    answered with a 400 line); only lines without a usable custom_id are problems."""
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().split(b"\n")
    except OSError as e:
        raise BatchInputError(f"cannot read {path}: {e.strerror or e}") from None
    requests, problems, first_line = [], [], {}
    duplicates = []
    openai = None                 # the file's format, from its first JSON object
    for n, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            problems.append((n, "not UTF-8 text"))
            continue
        except ValueError as e:
            problems.append((n, f"not valid JSON ({e})"))
            continue
        if openai is None and isinstance(obj, dict):
            openai = is_openai_line(obj)
        if openai:
            # OpenAI batch lines: a bad request with a usable custom_id is answered with a 400 line
            try:
                req = parse_openai_line(obj, default_max_new_tokens, line=n)
            except OpenAIRequestError as e:
                problems.append((n, str(e)))
                continue
            if req.key in first_line:
                duplicates.append((json.dumps(req.custom_id), first_line[req.key], n))
            else:
                first_line[req.key] = n
            requests.append(req)
            continue
        rid = obj.get("id") if isinstance(obj, dict) else None
        if isinstance(rid, (str, int)) and not isinstance(rid, bool):
            key = id_key(rid)
            if key in first_line:
                duplicates.append((key, first_line[key], n))
            else:
                first_line[key] = n
        try:
            requests.append(parse_request(obj, default_max_new_tokens, line=n))
        except BatchInputError as e:
            problems.append((n, str(e)))
    if duplicates:
        what = "custom_id" if openai else "id"
        shown = "; ".join(f"{what} {k} on lines {a} and {b}" for k, a, b in duplicates[:5])
        more = f" (and {len(duplicates) - 5} more)" if len(duplicates) > 5 else ""
        raise BatchInputError(f"duplicate ids in {path}: {shown}{more}")
    return requests, problems


# ---- the output file: flexgen/apps/resumable.py (shared with data_wrangle) ------------------

def _stderr(msg):
    print(msg, file=sys.stderr, flush=True)


def _finite(x: float):
    return float(x) if math.isfinite(x) else None


def chunk_seed(seed: int, keys) -> int:
    """A sampled chunk's seed: the same chunk of ids gets the same seed in every run."""
    return zlib.crc32(json.dumps([seed, list(keys)]).encode()) & 0x7FFFFFFF


# ---- the runner --------------------------------------------------------------------------------

def run_batch(lm, requests, output_path, logprobs: bool = False, chunk_blocks: int = 1, progress: bool = True,
              seed: int = 0, chat: bool = False, strict: bool = False,
              default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, log=None) -> dict:
    """Run requests (dicts in the input format, or Requests) whose ids are not yet in
    output_path, appending each chunk's results durably. Returns a summary dict.

    A request too long for the model's context is reported through log (stderr by default) and
    skipped; with strict it raises BatchInputError before anything runs, as malformed requests
    and duplicate ids always do."""
    log = log or _stderr
    if chunk_blocks < 1:
        raise BatchInputError(f"chunk_blocks must be >= 1, got {chunk_blocks}")
    reqs, first = [], {}
    for i, r in enumerate(requests):
        try:
            req = parse_request(r, default_max_new_tokens)
        except BatchInputError as e:
            raise BatchInputError(f"request {i}: {e}") from None
        if req.key in first:
            raise BatchInputError(f"duplicate id {req.key} (requests {first[req.key]} and {i})")
        first[req.key] = i
        reqs.append(req)
    tok = lm.tokenizer
    if tok is None:
        raise GenerationError("this model has no tokenizer: the batch runner needs one for text prompts")

    start = time.perf_counter()
    summary = {"output": str(output_path), "requests": len(reqs), "already_done": 0, "prompts": 0,
               "invalid": [], "prompt_tokens": 0, "generated_tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0}
    with locked_output(output_path) as out:
        done = load_done(output_path, repair=True, log=log)
        pending = [r for r in reqs if r.key not in done]
        summary["already_done"] = len(reqs) - len(pending)

        # OpenAI requests the API would refuse are answered with a 400 line, before anything runs
        refused = [(r, r.error) for r in pending if isinstance(r, OpenAIRequest) and r.error is not None]
        pending = [r for r in pending if not (isinstance(r, OpenAIRequest) and r.error is not None)]

        # Context check up front, so that one long prompt cannot stop the run halfway.
        lengths = [prompt_tokens(tok, r, chat) for r in pending]
        limit = lm.info.max_seq_len
        runnable, problems = [], []
        for r, n in zip(pending, lengths):
            if isinstance(r, OpenAIRequest) and (n == 0 or n + r.max_tokens > limit):
                refused.append((r, OpenAIRequestError(
                    f"{n} prompt tokens + {r.max_tokens} max_tokens exceed the model's context of {limit} tokens",
                    "messages" if r.chat else "prompt", "context_length_exceeded")))
            elif n == 0:
                problems.append((r, "the prompt has no tokens"))
            elif n + r.max_new_tokens > limit:
                problems.append((r, f"{n} prompt tokens + {r.max_new_tokens} new tokens exceed the model's "
                                    f"context of {limit} positions"))
            else:
                runnable.append((r, n))
        if problems and strict:
            raise BatchInputError("; ".join(f"{r.where()}: {m}" for r, m in problems))
        for r, m in problems:
            log(f"{r.where()}: {m}; skipped")
        summary["invalid"] = [r.id for r, _ in problems]
        if refused:
            for r, e in refused:
                log(f"{r.where()}: {e}; answered with status 400")
            append_records(out, [error_line(r, e) for r, e in refused], output_path)
            done.update(r.key for r, _ in refused)
            summary["refused"] = [r.custom_id for r, _ in refused]

        # Same sampling parameters together (in order of first appearance), sorted by length.
        groups: dict[tuple, list] = {}
        for pos, (r, n) in enumerate(runnable):
            groups.setdefault(r.params, []).append((n, pos, r))
        chunk = chunk_blocks * lm.policy.block_size
        plan = []
        for items in groups.values():
            items.sort(key=lambda x: (x[0], x[1]))
            rs = [r for _, _, r in items]
            plan += [rs[i:i + chunk] for i in range(0, len(rs), chunk)]

        runner = RequestRunner(lm, progress=False) if any(isinstance(r, OpenAIRequest) for r, _ in runnable) else None
        model_name = getattr(lm.info, "name", None) or "flexgen"
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(reqs) - len(problems) - len(refused), initial=summary["already_done"], unit="prompt",
                       desc="batch", file=sys.stderr, dynamic_ncols=True)
        try:
            for part in plan:
                r0 = part[0]
                if isinstance(r0, OpenAIRequest):
                    lines = _run_openai(runner, part, model_name, seed, summary)
                    append_records(out, lines, output_path)
                    done.update(r.key for r in part)
                    summary["prompts"] += len(part)
                    if bar is not None:
                        bar.update(len(part))
                    continue
                sample = r0.temperature > 0
                comps = generate_text(lm, [r.prompt for r in part], max_new_tokens=r0.max_new_tokens,
                                      do_sample=sample, temperature=r0.temperature if sample else 1.0,
                                      top_p=r0.top_p, seed=chunk_seed(seed, [r.key for r in part]) if sample else None,
                                      stop=list(r0.stop) or None, chat=chat, logprobs=logprobs, log=log)
                records = []
                for r, c in zip(part, comps):
                    rec = {"id": r.id, "completion": c.text, "prompt_tokens": c.prompt_tokens,
                           "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason}
                    if logprobs:
                        rec["logprobs"] = [_finite(x) for x in (c.logprobs or [])]
                    records.append(rec)
                    summary["prompt_tokens"] += c.prompt_tokens
                    summary["generated_tokens"] += c.completion_tokens
                append_records(out, records, output_path)
                done.update(r.key for r in part)
                summary["prompts"] += len(part)
                if bar is not None:
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{summary['generated_tokens'] / elapsed:.1f} tok/s", refresh=False)
                    bar.update(len(part))
        finally:
            if bar is not None:
                bar.close()
            summary["seconds"] = time.perf_counter() - start
            summary["tokens_per_s"] = summary["generated_tokens"] / max(summary["seconds"], 1e-9)
    return summary


def prompt_tokens(tok, r, chat: bool = False) -> int:
    """Tokens in a request's prompt (its chat template included)."""
    if isinstance(r, OpenAIRequest):
        if not r.chat:
            return len(r.prompt) if not isinstance(r.prompt, str) else len(tok.encode(r.prompt))
        return len(chat_prompt_ids(tok, list(r.prompt)))
    return len(encode_prompts(tok, [r.prompt], chat)[0])


def _run_openai(runner, part, model_name, seed, summary) -> list[dict]:
    """Output lines of a chunk of OpenAI requests (same parameters), run together by the request
    layer. Sampled requests without a seed share one from --seed and the chunk's custom_ids (so
    they share blocks, and a resumed run draws what the uninterrupted run would have)."""
    gens = [r.generation_request() for r in part]
    shared = chunk_seed(seed, [r.custom_id for r in part])
    for g in gens:
        if g.seed is None and g.temperature > 0:
            g.seed = shared
    lines = []
    for r, res in zip(part, runner.generate(gens)):
        if res.error is not None:
            lines.append(error_line(r, OpenAIRequestError(res.error, "messages" if r.chat else "prompt")))
            continue
        lines.append(response_line(r, res, model_name))
        summary["prompt_tokens"] += res.prompt_len
        summary["generated_tokens"] += res.completion_tokens
    return lines


def format_summary(s: dict) -> str:
    extra = f", {len(s['invalid'])} skipped as too long" if s["invalid"] else ""
    if s.get("refused"):
        extra += f", {len(s['refused'])} answered with status 400"
    return (f"batch: {s['prompts']} prompts done ({s['already_done']} already in {s['output']}{extra}), "
            f"{s['generated_tokens']} generated tokens in {s['seconds']:.2f} s: {s['tokens_per_s']:.2f} tokens/s")


# ---- command line ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m flexgen.apps.batch",
        description="Run a JSONL file of prompts; results are appended durably and a rerun resumes.",
        epilog="--gen-len is the default max_new_tokens. --prompt-len, --cut-gen-len, --debug-mode and the "
               "log flags are accepted for compatibility and not used.")
    add_arguments(parser, EMBEDDED_DEFAULT, None)
    parser.add_argument("--input", required=True, help="JSONL file of requests")
    parser.add_argument("--output", required=True, help="JSONL results file (appended to; a rerun resumes)")
    parser.add_argument("--logprobs", action="store_true", help="add the log-probability of each generated token")
    parser.add_argument("--strict", action="store_true", help="fail (exit 2) on malformed or too long requests")
    parser.add_argument("--seed", type=int, default=0, help="base seed for sampled requests")
    parser.add_argument("--chunk-blocks", type=positive_int, default=1,
                        help="blocks (gpu_batch_size x num_gpu_batches prompts) per durable write")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_cli(args) -> dict:
    if args.prompt:
        raise BatchInputError("--prompt is not used by the batch runner: prompts come from --input")
    requests, problems = read_requests(args.input, args.gen_len)
    for n, msg in problems:
        _stderr(f"{args.input}: line {n}: {msg}" + ("" if args.strict else "; skipped"))
    if problems and args.strict:
        raise BatchInputError(f"{len(problems)} malformed line(s) in {args.input} (--strict)")
    policy = policy_from_args(args)
    with locked_output(args.output):
        done = load_done(args.output, repair=True)
    if all(r.key in done for r in requests):  # nothing to do: don't load the model
        n = len(requests)
        return {"output": args.output, "requests": n, "already_done": n, "prompts": 0, "invalid": [],
                "prompt_tokens": 0, "generated_tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0}
    lm, env = open_model(args, policy, need_tokenizer=True)
    try:
        return run_batch(lm, requests, args.output, logprobs=args.logprobs, chunk_blocks=args.chunk_blocks,
                         progress=not args.no_progress, seed=args.seed, chat=args.chat, strict=args.strict)
    finally:
        lm.close()
        env.close_copy_threads()


def main(argv=None):
    args = build_parser().parse_args(argv)
    summary = main_errors(lambda: run_cli(args), (BatchInputError, BatchOutputError),
                          f"interrupted: finished chunks are in {args.output}; rerun the same command to resume")
    print(format_summary(summary), flush=True)


if __name__ == "__main__":
    main()
