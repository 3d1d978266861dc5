"""Benchmark scenarios of ../shared/DESIGN.md (and issue-specific ones), each run through the
CLI in its own process, with FlexGen's benchmark block parsed into one table.

Usage: PYTHONPATH=. python3 benchmarks/bench.py P4 P1 [--out DIR] [--extra "--overlap false"]
"""
import argparse
import os
import re
import subprocess
import sys
import time

SCENARIOS = {
    # id: (module, args)
    "P1": ("flexgen.flex_opt", "--model facebook/opt-30b --percent 0 100 100 0 100 0 --gpu-batch-size 8 "
                               "--num-gpu-batches 3"),
    "P2": ("flexgen.flex_opt", "--model facebook/opt-30b --percent 0 100 100 0 100 0 --gpu-batch-size 8 "
                               "--num-gpu-batches 3 --compress-weight"),
    "P4": ("flexgen.flex_opt", "--model facebook/opt-6.7b --percent 100 0 100 0 100 0 --gpu-batch-size 8 "
                               "--num-gpu-batches 1"),
    "L30": ("flexgen.flex_llama", "--model huggyllama/llama-30b --percent 0 100 100 0 100 0 --gpu-batch-size 8 "
                                  "--num-gpu-batches 3"),
    "L70": ("flexgen.flex_llama", "--model meta-llama/Llama-2-70b-hf --percent 0 85 100 0 100 0 "
                                  "--gpu-batch-size 8 --num-gpu-batches 3"),
    # LLaMA-2-70B with 4-bit weights streamed from pinned CPU memory (fp16 would not fit 128 GiB)
    "L70C": ("flexgen.flex_llama", "--model meta-llama/Llama-2-70b-hf --percent 0 100 100 0 100 0 "
                                   "--gpu-batch-size 8 --num-gpu-batches 3 --compress-weight"),
    "O13": ("flexgen.flex_opt", "--model facebook/opt-13b --percent 0 100 100 0 100 0 --gpu-batch-size 8 "
                                "--num-gpu-batches 3"),
}
COMMON = "--path _DUMMY_ --prompt-len 512 --gen-len 32 --verbose 1"
FIELDS = ["prefill latency", "decode latency", "total throughput", "decode throughput", "peak gpu mem"]


def parse(text):
    out = {}
    for key in FIELDS:
        m = re.search(rf"{key}: ([0-9.]+)", text)
        out[key] = float(m.group(1)) if m else None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scenarios", nargs="+")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--extra", default="", help="extra CLI flags for every scenario")
    ap.add_argument("--timeout", type=int, default=500)
    a = ap.parse_args()
    rows = []
    for sid in a.scenarios:
        module, args = SCENARIOS[sid.split("+")[0]]
        extra = a.extra + (" " + " ".join(sid.split("+")[1:]) if "+" in sid else "")
        cmd = [sys.executable, "-m", module] + (args + " " + COMMON + " " + extra).split()
        cmd += ["--log-file", os.path.join(a.out, f"{sid.replace('+', '_').replace('-', '')}.log")]
        print("$", " ".join(cmd), flush=True)
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            text = p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            text = f"timeout after {a.timeout}s\n{e.stdout or ''}"
        print(text[-3000:], flush=True)
        rows.append((sid, time.time() - t0, parse(text)))
    print(f"\n{'scenario':28} {'wall s':>7} {'prefill s':>9} {'decode s':>9} {'decode tok/s':>12} "
          f"{'total tok/s':>11} {'peak GB':>8}")
    for sid, wall, r in rows:
        f = lambda k: "-" if r[k] is None else f"{r[k]:.3f}"  # noqa: E731
        print(f"{sid:28} {wall:7.1f} {f('prefill latency'):>9} {f('decode latency'):>9} "
              f"{f('decode throughput'):>12} {f('total throughput'):>11} {f('peak gpu mem'):>8}")


if __name__ == "__main__":
    main()
