"""Predicted vs measured for benchmark runs, recomputed with the current cost model: reads the
raw output of benchmarks/bench.py (every run's `$ python3 -m flexgen.flex_* ...` command line and
its benchmark block; an output that kept only bench.py's tables is read from those) and a profile JSON (the same machine's), re-predicts every run from its own
command line (a `--percent auto` run from the policy it printed), and prints the table. Used to
check a change to the model against runs already made, without device time.

Usage: PYTHONPATH=. python3 benchmarks/check_cost_model.py BENCH_OUTPUT PROFILE_JSON [--only N1,N2]
       [--engine-before] [--graph-op-s S]

--engine-before: count the compressed cache's host work as the engine issued it before its fused
write (runs recorded until 2026-12-02, session 4); without it the prediction is for the engine as
it is now (what the next device run will measure). --graph-op-s: the host cost per operation of a
decode step replayed from a CUDA graph, for the policies that can (cost_model.graph_eligible;
default cost_model.GRAPH_OP_S, as the runs themselves predict; a run with --no-cuda-graphs: none).
"""
import argparse
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flexgen.cli import add_arguments, policy_from_args  # noqa: E402
from flexgen.models.registry import resolve_model  # noqa: E402
from flexgen.optimizer import cost_model  # noqa: E402
from flexgen.optimizer.cost_model import Workload, predict  # noqa: E402
from flexgen.parallel import policy_threads  # noqa: E402

NUM = r"([0-9.]+)"


def runs(text):
    """[(id, argv, measured)] of every run in a bench.py output, in order; a run without a
    benchmark block (failed, cut off) is left out."""
    out = []
    blocks = re.split(r"^\$ ", text, flags=re.M)[1:]
    for block in blocks:
        cmd, _, body = block.partition("\n")
        m = re.search(r"-m (flexgen\.flex_\w+) (.*)", cmd)
        if not m:
            continue
        argv = m.group(2).split()
        sid = re.search(r"--log-file \S*/([^/\s]+)\.log", cmd)
        sid = sid.group(1) if sid else "?"
        meas = {}
        for key in ("prefill latency", "decode latency", "total throughput"):
            f = re.search(rf"{key}: {NUM}", body)
            if f:
                meas[key] = float(f.group(1))
        if len(meas) < 3:
            continue
        auto = re.search(r"auto policy[^:]*: (--percent .*?); predicted", body)
        if auto:   # the policy the search chose, in place of the auto arguments
            argv = strip_auto(argv) + auto.group(1).split()
        out.append((sid, m.group(1), argv, meas))
    return out


def table_runs(text):
    """[(id, module, argv, measured)] from the table bench.py prints last (older outputs keep only
    the tables): the arguments are the scenario's in bench.py, an `--percent auto` run is left out
    (its chosen policy is not in the table)."""
    from bench import COMMON, SCENARIOS
    out = []
    for line in text.splitlines():
        m = re.match(r"^(\S+)\s+\d+\s+([0-9.]+)\s+([0-9.]+)\s+[0-9.]+\s+([0-9.]+)\s", line)
        if not m or m.group(1).split("+")[0] not in SCENARIOS:
            continue
        sid = m.group(1)
        module, args = SCENARIOS[sid.split("+")[0]]
        if "--percent auto" in args:
            continue
        extra = " ".join(sid.split("+")[1:]).replace("=", " ")
        meas = {"prefill latency": float(m.group(2)), "decode latency": float(m.group(3)),
                "total throughput": float(m.group(4))}
        out.append((sid, module, (args + " " + COMMON + " " + extra).split(), meas))
    return out


def strip_auto(argv):
    out, skip = [], 0
    for i, a in enumerate(argv):
        if skip:
            skip -= 1
            continue
        if a == "--percent" and argv[i + 1] == "auto":
            skip = 1
            continue
        if a in ("--gpu-batch-size", "--num-gpu-batches") and argv[i + 1] == "auto":
            skip = 1
            continue
        out.append(a)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bench_output")
    ap.add_argument("profile")
    ap.add_argument("--only", default=None, help="comma-separated run ids")
    ap.add_argument("--engine-before", action="store_true")
    ap.add_argument("--graph-op-s", type=float, default=None)
    ap.add_argument("--no-engine-count", action="store_true",
                    help="leave out the engine's scheduling operations (optimizer/engine_ops.py)")
    a = ap.parse_args()
    prof = json.load(open(a.profile))
    if a.engine_before:
        from flexgen.optimizer.op_count import count_compressed_cache_ops_before
        cost_model._CACHE_OPS.clear()
        cost_model.cache_host_ops = lambda kv, hd, cfg: count_compressed_cache_ops_before(kv, hd, cfg)
    only = set(a.only.split(",")) if a.only else None
    print(f"{'run':6} {'prefill pred / meas s':>22} {'decode step pred / meas s':>26} {'tok/s pred / meas':>20} "
          f"{'tok/s err':>9}")
    errs = []
    text = open(a.bench_output).read()
    for sid, module, argv, meas in runs(text) or table_runs(text):
        if only and sid not in only:
            continue
        p = argparse.ArgumentParser()
        add_arguments(p, "", "")
        args, _ = p.parse_known_args(argv)
        family = resolve_model(args.model, "llama" if "llama" in module else "opt").family
        policy = policy_from_args(args)
        threads = policy_threads(policy, args.cpu_threads, args.io_threads, prof["cpu"]["cores"], prof).cpu_threads
        graph_s = None if not args.cuda_graphs else (a.graph_op_s or cost_model.GRAPH_OP_S)
        count_on = None if a.no_engine_count or not torch.cuda.is_available() else "cuda"
        pr = predict(family, Workload(args.prompt_len, args.gen_len), policy, prof, is_cuda=True,
                     cpu_threads=threads, graph_op_s=graph_s, count_on=count_on)
        step = meas["decode latency"] / (args.gen_len - 1)
        err = pr.throughput / meas["total throughput"] - 1
        errs.append((sid, err))
        print(f"{sid:6} {pr.prefill_s:10.3f} / {meas['prefill latency']:8.3f} {pr.decode_step_s:12.4f} / {step:9.4f} "
              f"{pr.throughput:9.1f} / {meas['total throughput']:8.1f} {100 * err:+8.0f}%")
    if errs:
        ok = sum(abs(e) <= 0.20 for _, e in errs)
        print(f"{ok} of {len(errs)} within 20% of measured throughput"
              + (f" (outside: {', '.join(s for s, e in errs if abs(e) > 0.20)})" if ok < len(errs) else ""))


if __name__ == "__main__":
    main()
