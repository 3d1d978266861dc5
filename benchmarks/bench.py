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
    # P3: OPT-30B with the GPU capped at 24 GiB and the host at 110 GiB, policy chosen by the model
    "P3": ("flexgen.flex_opt", "--model facebook/opt-30b --percent auto --gpu-batch-size auto "
                               "--num-gpu-batches auto --gpu-mem 24GiB --cpu-mem 110GiB"),
    # the policy --percent auto chose for P3 on the H100 (session 2), run explicitly
    "P3x": ("flexgen.flex_opt", "--model facebook/opt-30b --percent 60 40 60 40 100 0 --gpu-batch-size 32 "
                                "--num-gpu-batches 2 --compress-weight --compress-cache"),
    # issue 12: the policy --percent auto chose for P3 on a lent H200 (session 10), run explicitly
    # under P3's caps (P3c) and without them (P3u)
    "P3c": ("flexgen.flex_opt", "--model facebook/opt-30b --percent 20 80 100 0 100 0 --gpu-batch-size 32 "
                                "--num-gpu-batches 3 --compress-weight --compress-cache --gpu-mem 24GiB --cpu-mem 110GiB"),
    # session 12: all on the GPU at 4 bits, decode steps replayed as CUDA graphs over packed weights
    # and cache, under P3's caps (the best policy measured there; --percent auto predicts it below
    # the 24 GiB margin)
    "P3g": ("flexgen.flex_opt", "--model facebook/opt-30b --percent 100 0 100 0 100 0 --gpu-batch-size 16 "
                                "--num-gpu-batches 1 --compress-weight --compress-cache --gpu-mem 24GiB --cpu-mem 110GiB"),
    "P3u": ("flexgen.flex_opt", "--model facebook/opt-30b --percent 20 80 100 0 100 0 --gpu-batch-size 32 "
                                "--num-gpu-batches 3 --compress-weight --compress-cache"),
    # issue 5: OPT-30B, weights and cache on CPU, attention next to the cache (64 sequences:
    # 45 GiB of cache + 56 GiB of weights within 110 GiB of host memory)
    "C30": ("flexgen.flex_opt", "--model facebook/opt-30b --percent 0 100 0 100 100 0 --gpu-batch-size 32 "
                                "--num-gpu-batches 2 --cpu-cache-compute"),
    # the same with the cache packed 4-bit: CPU attention over the packed cache
    "C30C": ("flexgen.flex_opt", "--model facebook/opt-30b --percent 0 100 0 100 100 0 --gpu-batch-size 32 "
                                 "--num-gpu-batches 2 --cpu-cache-compute --compress-cache"),
    # issue 6: policies whose predicted time is checked against the measurement
    "V1": ("flexgen.flex_opt", "--model facebook/opt-6.7b --percent 100 0 100 0 100 0 --gpu-batch-size 32 "
                               "--num-gpu-batches 1"),
    "V2": ("flexgen.flex_opt", "--model facebook/opt-6.7b --percent 50 50 100 0 100 0 --gpu-batch-size 16 "
                               "--num-gpu-batches 2"),
    "V3": ("flexgen.flex_opt", "--model facebook/opt-6.7b --percent 0 100 100 0 100 0 --gpu-batch-size 16 "
                               "--num-gpu-batches 4 --compress-weight"),
    "V4": ("flexgen.flex_opt", "--model facebook/opt-13b --percent 0 100 0 100 100 0 --gpu-batch-size 32 "
                               "--num-gpu-batches 2 --cpu-cache-compute"),
    "V5": ("flexgen.flex_opt", "--model facebook/opt-13b --percent 40 60 100 0 100 0 --gpu-batch-size 16 "
                               "--num-gpu-batches 3"),
    "V6": ("flexgen.flex_opt", "--model facebook/opt-13b --percent 100 0 100 0 100 0 --gpu-batch-size 32 "
                               "--num-gpu-batches 2 --compress-cache"),
    "V7": ("flexgen.flex_opt", "--model facebook/opt-30b --percent 0 100 100 0 100 0 --gpu-batch-size 16 "
                               "--num-gpu-batches 4"),
    "V8": ("flexgen.flex_opt", "--model facebook/opt-30b --percent 100 0 100 0 100 0 --gpu-batch-size 32 "
                               "--num-gpu-batches 2 --compress-weight"),
    # issue 12: a LLaMA-3-70B-shaped model, policy chosen by the model under the same caps as P3
    "L3A": ("flexgen.flex_llama", "--model meta-llama/Meta-Llama-3-70B --percent auto --gpu-batch-size auto "
                                  "--num-gpu-batches auto --gpu-mem 24GiB --cpu-mem 110GiB"),
    # issue 12: a fresh validation set for the cost model (LLaMA-3 shapes, >= 8 GPU batches,
    # activations on the CPU, 4-bit weights and cache, CPU attention, hard GPU caps)
    "N1": ("flexgen.flex_llama", "--model meta-llama/Meta-Llama-3-8B --percent 100 0 100 0 100 0 "
                                 "--gpu-batch-size 32 --num-gpu-batches 1"),
    "N2": ("flexgen.flex_llama", "--model meta-llama/Meta-Llama-3-8B --percent 0 100 100 0 100 0 "
                                 "--gpu-batch-size 16 --num-gpu-batches 8"),
    "N3": ("flexgen.flex_llama", "--model meta-llama/Meta-Llama-3-8B --percent 100 0 0 100 0 100 "
                                 "--gpu-batch-size 32 --num-gpu-batches 4"),
    "N4": ("flexgen.flex_llama", "--model meta-llama/Meta-Llama-3-8B --percent 50 50 50 50 100 0 "
                                 "--gpu-batch-size 32 --num-gpu-batches 8 --compress-weight --compress-cache "
                                 "--gpu-mem 12GiB"),
    "N5": ("flexgen.flex_opt", "--model facebook/opt-13b --percent 100 0 0 100 100 0 --gpu-batch-size 48 "
                               "--num-gpu-batches 2 --cpu-cache-compute --compress-cache"),
    "N6": ("flexgen.flex_opt", "--model facebook/opt-30b --percent 0 100 100 0 0 100 --gpu-batch-size 8 "
                               "--num-gpu-batches 8"),
    "N7": ("flexgen.flex_llama", "--model meta-llama/Meta-Llama-3-70B --percent 0 100 100 0 100 0 "
                                 "--gpu-batch-size 8 --num-gpu-batches 3 --compress-weight"),
    "N8": ("flexgen.flex_llama", "--model meta-llama/Meta-Llama-3-70B --percent 20 80 0 100 0 100 "
                                 "--gpu-batch-size 16 --num-gpu-batches 8 --compress-weight --compress-cache "
                                 "--gpu-mem 24GiB"),
    "N9": ("flexgen.flex_opt", "--model facebook/opt-6.7b --percent 100 0 100 0 0 100 --gpu-batch-size 32 "
                               "--num-gpu-batches 8"),
    "N10": ("flexgen.flex_llama", "--model meta-llama/Meta-Llama-3-8B --percent 0 100 0 100 100 0 "
                                  "--gpu-batch-size 32 --num-gpu-batches 2 --cpu-cache-compute"),
    "N11": ("flexgen.flex_opt", "--model facebook/opt-30b --percent 30 70 0 100 100 0 --gpu-batch-size 32 "
                                "--num-gpu-batches 4 --compress-weight --compress-cache --gpu-mem 24GiB"),
    "V9": ("flexgen.flex_opt", "--model facebook/opt-13b --percent 0 100 50 50 100 0 --gpu-batch-size 24 "
                               "--num-gpu-batches 2"),
}
COMMON = "--path _DUMMY_ --prompt-len 512 --gen-len 32 --verbose 1"
FIELDS = ["prefill latency", "decode latency", "total throughput", "decode throughput", "peak gpu mem",
          "peak gpu mem reserved"]
PREDICTED = re.compile(r"predicted vs measured: prefill ([0-9.]+) / [0-9.]+ s, decode step ([0-9.]+) / ([0-9.]+) s, "
                       r"throughput ([0-9.]+) /")


def parse(text):
    out = {}
    for key in FIELDS:
        m = re.search(rf"{key}: ([0-9.]+)", text)
        out[key] = float(m.group(1)) if m else None
    m = PREDICTED.search(text)
    out["pred prefill"], out["pred step"], out["step"], out["pred tput"] = \
        (float(x) for x in m.groups()) if m else (None,) * 4
    m = re.search(r"peak host mem \(max RSS\): ([0-9.]+) GB", text)
    out["host GB"] = float(m.group(1)) if m else None
    return out


def readable(text):
    """The run's output without progress-bar redraws."""
    lines = [ln.split("\r")[-1] for ln in text.splitlines()]
    return "\n".join(ln for ln in lines if not re.search(r"\d+/\d+ \[[0-9:<]+", ln))


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
            if p.returncode:
                text += f"\nexit status {p.returncode}" + (" (killed by signal %d)" % -p.returncode
                                                          if p.returncode < 0 else "")
        except subprocess.TimeoutExpired as e:
            text = f"timeout after {a.timeout}s\n{e.stdout or ''}"
        print(readable(text)[-4000:], flush=True)
        rows.append((sid, time.time() - t0, parse(text)))
    print(f"\n{'scenario':28} {'wall s':>6} {'prefill s':>9} {'decode s':>8} {'decode tok/s':>12} "
          f"{'total tok/s':>11} {'GPU GB':>6} {'resv GB':>7} {'host GB':>7} | {'pred prefill':>12} {'pred step':>9} {'step':>7} "
          f"{'pred tok/s':>10} {'err':>6}")
    for sid, wall, r in rows:
        f = lambda k, w=3: "-" if r[k] is None else f"{r[k]:.{w}f}"  # noqa: E731
        err = "-" if r["pred tput"] is None or not r["total throughput"] else \
            f"{100 * (r['pred tput'] / r['total throughput'] - 1):+.0f}%"
        print(f"{sid:28} {wall:6.0f} {f('prefill latency'):>9} {f('decode latency'):>8} "
              f"{f('decode throughput'):>12} {f('total throughput'):>11} {f('peak gpu mem', 2):>6} {f('peak gpu mem reserved', 2):>7} {f('host GB', 1):>7} | "
              f"{f('pred prefill'):>12} {f('pred step', 4):>9} {f('step', 4):>7} {f('pred tput', 2):>10} {err:>6}")


if __name__ == "__main__":
    main()
