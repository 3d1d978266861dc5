"""The data-wrangling app: few-shot entity matching, imputation, error detection and schema
matching over the fm_data_tasks datasets, run through the request layer.

    python3 -m flexgen.apps.data_wrangle --data_dir data/datasets/entity_matching/structured/Fodors-Zagats \\
        --do_test --sample_method manual --batch_run --model smollm2-135m --output_dir out

Writes, in --output_dir: trial_<n>.jsonl (one line per example as it finishes: id, prompt_tokens,
completion, parsed, gold, correct), summary.json (metrics, examples, tokens, time, tokens/s) and
run.json (the settings that decide the predictions). A rerun with the same settings resumes:
examples already in trial_<n>.jsonl are not run again (see flexgen/apps/resumable.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from ...cli import add_arguments, main_errors, positive_int
from ...models.registry import EMBEDDED_DEFAULT
from ..resumable import ResultsFileError, append_records, id_key, load_done, locked_output
from .datasets import TASKS, DatasetError, read_dataset
from .metrics import compute_metrics, is_correct, parse_answer
from .prompts import (VALIDATION_MODEL, build_prompt, manual_prompt, random_demonstrations,
                      validation_demonstrations)

# Settings that decide the predictions: a rerun into the same --output_dir must match them.
RUN_KEYS = ("dataset", "split", "task", "num_run", "k", "sample_method", "seed", "class_balanced", "sep_tok",
            "nan_tok", "add_task_instruction", "max_tokens", "stop_token", "temperature", "model",
            "validation_path", "chat")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m flexgen.apps.data_wrangle",
        description="Few-shot data wrangling (Narayan et al., VLDB 2022) over the fm_data_tasks layout. "
                    "`python3 -m flexgen.apps.data_wrangle prepare --help`: build real datasets offline.",
        epilog="Model and policy flags as in flex_opt / flex_llama (--percent auto plans for prompts of "
               "--pad-to-seq-len tokens, else --prompt-len). --cache_name, --cache_connection, --client_name, "
               "--client_connection, --overwrite_cache and --run-path are accepted for compatibility and not used.")
    add_arguments(p, EMBEDDED_DEFAULT, None)
    p.set_defaults(gpu_batch_size=16)   # the original app's default
    a = p.add_argument
    a("--data_dir", required=True, help="dataset directory (e.g. data/datasets/entity_matching/structured/Beer)")
    a("--output_dir", default="outputs", help="predictions and summary go here (a rerun resumes)")
    a("--task", choices=TASKS, default=None, help="the task, when the path does not tell it")
    a("--impute_col", default=None, help="data imputation: the column to impute (known for Buy and Restaurant)")
    a("--k", type=int, default=1, help="number of demonstrations in the prompt (random, validation_clusters)")
    a("--sample_method", default="random", choices=["random", "manual", "validation_clusters"])
    a("--validation_path", default=None,
      help="validation_clusters: trial_0.jsonl of an earlier run on the validation split")
    a("--validation_model", default=VALIDATION_MODEL, help="validation_clusters: sentence-transformers model")
    a("--seed", type=int, default=1234, help="seed of the random demonstrations (trial n uses seed + n)")
    a("--class_balanced", action="store_true", help="random demonstrations from a label-balanced train set")
    a("--sep_tok", default=".", help="separator between attr: value pairs")
    a("--nan_tok", default="nan", help="text for a missing value")
    a("--num_run", type=int, default=-1, help="run the first N examples (-1: all)")
    a("--num_trials", type=positive_int, default=1, help="trials (different random demonstrations); mean and std")
    a("--num_print", type=int, default=10, help="with --dry_run: how many prompts to print")
    a("--add_task_instruction", action="store_true", help="put the task instruction before the prompt")
    a("--task_instruction_idx", type=int, default=0, choices=[0], help="(one instruction per dataset)")
    a("--do_test", action="store_true", help="run on test.csv (default: valid.csv)")
    a("--dry_run", action="store_true", help="print prompts; do not load a model")
    a("--stop_token", default="\n", help="generation stops at this text")
    a("--temperature", type=float, default=0.0, help="0 = greedy")
    a("--max_tokens", type=positive_int, default=3, help="new tokens per example")
    a("--batch_run", action="store_true",
      help="run all prompts in blocks of --gpu-batch-size x --num-gpu-batches (else one prompt at a time)")
    a("--pad-to-seq-len", type=positive_int, default=None,
      help="--batch_run: left-pad every prompt to this many tokens (longer prompts: to the longest)")
    a("--run_tag", default="default", help="recorded in run.json")
    a("--no-progress", action="store_true", help="no progress bar")
    for flag in ("--cache_name", "--cache_connection", "--client_name", "--client_connection", "--run-path"):
        a(flag, default=None, help=argparse.SUPPRESS)
    a("--overwrite_cache", action="store_true", help=argparse.SUPPRESS)
    return p


def _split_examples(args, ds):
    split = "test" if args.do_test else "validation"
    if split not in ds.splits:
        raise DatasetError(f"{args.data_dir}: no {'test.csv' if args.do_test else 'valid.csv'}"
                           + ("" if args.do_test else " (add --do_test for test.csv)"))
    ex = ds.splits[split]
    n = len(ex) if args.num_run < 0 else min(args.num_run, len(ex))
    return split, ex[:n]


def build_prompts(args, ds, examples, trial: int, embed=None) -> list:
    instruction = ds.spec.instruction if args.add_task_instruction else None
    if args.sample_method == "manual":
        return [build_prompt(manual_prompt(ds.name, ds.spec, e), e, instruction) for e in examples]
    if args.sample_method == "validation_clusters":
        if "validation" not in ds.splits:
            raise DatasetError(f"{args.data_dir}: validation_clusters needs valid.csv")
        demos = validation_demonstrations(ds.splits["validation"], args.validation_path, args.k, ds.spec.task,
                                          args.seed + trial, embed=embed)
    else:
        if args.k < 0:
            raise DatasetError(f"--k must be >= 0, got {args.k}")
        demos = random_demonstrations(ds.splits["train"], args.k, args.seed + trial, args.class_balanced) \
            if args.k > 0 else ""
    return [build_prompt(demos, e, instruction) for e in examples]


def _check_run_config(path, config):
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise ResultsFileError(f"{path} is not a run description ({e}); move it or use another --output_dir")
        diff = [k for k in RUN_KEYS if old.get(k) != config.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff[:4])
            raise ResultsFileError(f"{os.path.dirname(path) or '.'} holds a run with other settings ({shown}); "
                                   "use another --output_dir")
        return
    with open(path, "w") as f:
        json.dump(config, f, indent=1)


def _read_trial(path, keys) -> dict:
    out = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    if id_key(r["id"]) in keys:
                        out[id_key(r["id"])] = r
    return out


def run(args, open_model=None, embed=None, log=None) -> dict:
    """The whole app; returns the summary dict (also written to --output_dir/summary.json)."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if args.temperature < 0 or not math.isfinite(args.temperature):
        raise DatasetError(f"--temperature must be >= 0, got {args.temperature}")
    ds = read_dataset(args.data_dir, args.task, args.impute_col, args.sep_tok, args.nan_tok)
    split, examples = _split_examples(args, ds)
    if not examples:
        raise DatasetError(f"{args.data_dir}: the {split} split has no examples")
    trials = [build_prompts(args, ds, examples, t, embed) for t in range(args.num_trials)]
    if args.dry_run:
        for prompt, e in list(zip(trials[0], examples))[:max(args.num_print, 0)]:
            print(f"--- example {e.id} (gold: {e.label_str.strip()})\n{prompt}")
        return {"dry_run": True, "examples": len(examples)}

    os.makedirs(args.output_dir, exist_ok=True)
    config = {"dataset": ds.name, "data_dir": os.path.abspath(args.data_dir), "split": split, "task": ds.spec.task,
              "num_run": len(examples), "k": args.k, "sample_method": args.sample_method, "seed": args.seed,
              "class_balanced": args.class_balanced, "sep_tok": args.sep_tok, "nan_tok": args.nan_tok,
              "add_task_instruction": args.add_task_instruction, "max_tokens": args.max_tokens,
              "stop_token": args.stop_token, "temperature": args.temperature, "model": args.model,
              "validation_path": args.validation_path, "chat": args.chat, "run_tag": args.run_tag}
    _check_run_config(os.path.join(args.output_dir, "run.json"), config)

    from ...requests import GenerationRequest, RequestRunner, open_model_for_requests
    if not args.batch_run:   # the original's single-query mode: one prompt at a time
        args.gpu_batch_size, args.num_gpu_batches = 1, 1
    keys = {id_key(e.id) for e in examples}
    stats = {"prompts": 0, "prompt_tokens": 0, "completion_tokens": 0, "padded_prompt_tokens": 0, "seconds": 0.0}
    lm = env = runner = None
    try:
        for t, prompts in enumerate(trials):
            path = os.path.join(args.output_dir, f"trial_{t}.jsonl")
            with locked_output(path) as out:
                done = load_done(path, repair=True, log=log)
                todo = [(e, p) for e, p in zip(examples, prompts) if id_key(e.id) not in done]
                if not todo:
                    continue
                if lm is None:
                    opener = open_model or open_model_for_requests
                    lm, env = opener(args, args.pad_to_seq_len or args.prompt_len, args.max_tokens)
                    runner = RequestRunner(lm, pad_to_seq_len=args.pad_to_seq_len if args.batch_run else None,
                                           progress=not args.no_progress, log=log)
                lengths = [len(runner.encode(p, args.chat)) for _, p in todo]
                too_long = [(e, n) for (e, _), n in zip(todo, lengths) if n + args.max_tokens > lm.info.max_seq_len]
                if too_long:
                    e, n = too_long[0]
                    raise DatasetError(f"example {e.id}: {n} prompt tokens + {args.max_tokens} new tokens exceed the "
                                       f"model's context of {lm.info.max_seq_len} ({len(too_long)} such examples)")
                # Sampled runs share one seed per trial so that they batch (a resumed sampled run
                # draws its remaining examples afresh; greedy ones resume exactly).
                sampled = args.temperature > 0
                reqs = [GenerationRequest(p, max_new_tokens=args.max_tokens, temperature=args.temperature,
                                          stop=(args.stop_token,) if args.stop_token else (), chat=args.chat,
                                          seed=args.seed + t if sampled else None)
                        for e, p in todo]

                def write(i, res, todo=todo, out=out, path=path):
                    e = todo[i][0]
                    if res.error is not None:
                        raise DatasetError(f"example {e.id}: {res.error}")
                    c = res.completions[0]
                    parsed = parse_answer(c.text, ds.spec.task)
                    append_records(out, [{"id": e.id, "prompt_tokens": res.prompt_len, "completion": c.text,
                                          "parsed": parsed, "gold": e.label_str.strip(),
                                          "correct": is_correct(parsed, e.label_str),
                                          "completion_tokens": len(c.token_ids), "finish_reason": c.finish_reason}],
                                   path)

                t0 = time.perf_counter()
                runner.generate(reqs, on_result=write)
                stats["seconds"] += time.perf_counter() - t0
                stats["prompts"] += len(reqs)
                if args.batch_run and args.pad_to_seq_len:
                    stats["padded_prompt_tokens"] += sum(max(n, args.pad_to_seq_len) for n in lengths)
    finally:
        if lm is not None:
            lm.close()
            env.close_copy_threads()
    if runner is not None:
        stats["prompt_tokens"] = runner.stats["prompt_tokens"]
        stats["completion_tokens"] = runner.stats["completion_tokens"]
    return _summarise(args, ds, split, examples, keys, stats)


def _summarise(args, ds, split, examples, keys, stats) -> dict:
    per_trial = []
    for t in range(args.num_trials):
        recs = _read_trial(os.path.join(args.output_dir, f"trial_{t}.jsonl"), keys)
        if len(recs) != len(keys):
            raise ResultsFileError(f"trial_{t}.jsonl has {len(recs)} of {len(keys)} examples")
        per_trial.append(compute_metrics([recs[id_key(e.id)] for e in examples], ds.spec.task))
    names = [k for k in ("precision", "recall", "f1", "accuracy") if k in per_trial[0]]
    metrics = {}
    for k in names:
        vals = [m[k] for m in per_trial]
        mean = sum(vals) / len(vals)
        metrics[k] = mean
        metrics[f"{k}_std"] = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    tokens = stats["prompt_tokens"] + stats["completion_tokens"]
    summary = {"dataset": ds.name, "split": split, "task": ds.spec.task, "examples": len(examples),
               "trials": args.num_trials, "metrics": metrics, "per_trial": per_trial,
               "this_run": {**stats, "tokens_per_s": tokens / stats["seconds"] if stats["seconds"] else 0.0,
                            "padded_tokens_per_s": (stats["padded_prompt_tokens"] + stats["completion_tokens"])
                            / stats["seconds"] if stats["seconds"] and stats["padded_prompt_tokens"] else None},
               "output_dir": args.output_dir}
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def format_summary(s: dict) -> str:
    if s.get("dry_run"):
        return f"dry run: {s['examples']} examples, no model run"
    m = s["metrics"]
    scores = ", ".join(f"{k} {m[k]:.3f}" + (f" (std {m[k + '_std']:.3f})" if s["trials"] > 1 else "")
                       for k in ("precision", "recall", "f1", "accuracy") if k in m)
    r = s["this_run"]
    lines = [f"data_wrangle: {s['dataset']} ({s['split']}), {s['examples']} examples x {s['trials']} trial(s): {scores}"]
    if r["prompts"]:
        line = (f"this run: {r['prompts']} prompts, {r['prompt_tokens']} input + {r['completion_tokens']} output "
                f"tokens in {r['seconds']:.2f} s: {r['tokens_per_s']:.1f} input+output tokens/s")
        if r["padded_tokens_per_s"]:
            line += f" ({r['padded_tokens_per_s']:.1f} counting the padded input, as the original does)"
        lines.append(line)
    else:
        lines.append("this run: nothing to do (every example already in the output)")
    lines.append(f"predictions: {s['output_dir']}/trial_<n>.jsonl; summary: {s['output_dir']}/summary.json")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:
        return prepare_main(argv[1:])
    args = build_parser().parse_args(argv)
    summary = main_errors(lambda: run(args), (DatasetError, ResultsFileError),
                          f"interrupted: finished examples are in {args.output_dir}; rerun the same command to resume")
    print(format_summary(summary), flush=True)


def prepare_main(argv):
    from .prepare import prepare
    p = argparse.ArgumentParser(prog="python3 -m flexgen.apps.data_wrangle prepare",
                                description="Fodors-Zagats, DBLP-ACM and Restaurant (city imputation) from the "
                                            "py-entitymatching 0.4.2 sdist, in the fm_data_tasks layout.")
    p.add_argument("--out", default="data/datasets", help="datasets root (default data/datasets)")
    p.add_argument("--sdist", default=None, help="py-entitymatching-0.4.2.tar.gz or its unpacked folder "
                                                 "(default: pip download it)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--limit", type=positive_int, nargs=3, metavar=("TRAIN", "VALID", "TEST"), default=None,
                   help="keep only the first N examples of each split (and the table rows they use)")
    args = p.parse_args(argv)
    try:
        done = prepare(args.out, args.sdist, args.seed, args.limit)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for d, (a, b, c) in done.items():
        print(f"{d}: train {a}, valid {b}, test {c}")
