"""Predicted vs measured for benchmark runs, recomputed with the current cost model: reads the
table that benchmarks/bench.py printed (measured figures) and a profile JSON (the same machine's),
re-predicts every scenario, and prints both. Used to check a change to the model against runs
already made, without device time.

Usage: PYTHONPATH=. python3 benchmarks/check_cost_model.py BENCH_OUTPUT PROFILE_JSON [--cpu-threads N]
"""
import argparse
import json
import re
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench import COMMON, SCENARIOS  # noqa: E402

from flexgen.cli import add_arguments, policy_from_args  # noqa: E402
from flexgen.models.registry import resolve_model  # noqa: E402
from flexgen.optimizer.cost_model import Workload, predict  # noqa: E402
from flexgen.parallel import resolve_threads  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bench_output")
    ap.add_argument("profile")
    a = ap.parse_args()
    prof = json.load(open(a.profile))
    rows = []
    for line in open(a.bench_output):
        m = re.match(r"^(\S+)\s+\d+\s+([0-9.]+)\s+([0-9.]+)\s+[0-9.]+\s+([0-9.]+)\s", line)
        if m and m.group(1).split("+")[0] in SCENARIOS:
            rows.append((m.group(1), float(m.group(2)), float(m.group(3)), float(m.group(4))))
    print(f"{'scenario':34} {'prefill pred/meas':>18} {'step pred/meas':>18} {'tok/s pred/meas':>20} {'time err':>8}")
    for sid, prefill, decode, tput in rows:
        module, args = SCENARIOS[sid.split("+")[0]]
        extra = " ".join(sid.split("+")[1:]).replace("=", " ")
        p = argparse.ArgumentParser()
        add_arguments(p, "", "")
        args = p.parse_args((args + " " + COMMON + " " + extra).split())
        if args.percent == ["auto"]:
            print(f"{sid:34} (auto: see the run's own predicted vs measured line)")
            continue
        family = resolve_model(args.model, "llama" if "llama" in module else "opt").family
        threads = resolve_threads(args.cpu_threads, args.io_threads, cores=prof["cpu"]["cores"]).cpu_threads
        pr = predict(family, Workload(args.prompt_len, args.gen_len), policy_from_args(args), prof, is_cuda=True,
                     cpu_threads=threads)
        step = decode / (args.gen_len - 1)
        err = (pr.prefill_s + (args.gen_len - 1) * pr.decode_step_s) / (prefill + decode) - 1
        print(f"{sid:34} {pr.prefill_s:8.3f} / {prefill:7.3f} {pr.decode_step_s:8.4f} / {step:7.4f} "
              f"{pr.throughput:9.2f} / {tput:8.2f} {100 * err:+7.0f}%")


if __name__ == "__main__":
    main()
