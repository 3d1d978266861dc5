"""Pipeline-parallel throughput: a scenario on 1 process and on N ranks (torchrun), each run
through the CLI in its own process, FlexGen's benchmark block and each rank's lines parsed into
one table (the last thing printed).

    PYTHONPATH=. python3 benchmarks/dist_bench.py O67 P1 --ranks 1,2 [--comm-device cpu] [--timeout S]
    PYTHONPATH=. python3 benchmarks/dist_bench.py P1 --ranks 1,2,4 --orig   # also the original FlexGen

With one GPU for several ranks, --comm-device cpu is required (NCCL cannot join two ranks on one
GPU). The per-micro-batch block (gpu batch x num gpu batches) is the scenario's; N ranks run N
micro-batches, so N times the sequences of the one-process run: each rank streams only its 1/N of
the weights per micro-batch, which is where the scaling comes from. --orig runs the original
FlexGen 0.1.8's dist_flex_opt on the same flags (its ranks started by hand with --head-ip --port
--rank --local-rank --world-size; needs .whl_orig carried, see benchmarks/original_flexgen/).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

COMMON = "--path _DUMMY_ --prompt-len 512 --gen-len 32"
P1 = "--model facebook/opt-30b --percent 0 100 100 0 100 0 --gpu-batch-size 8 --num-gpu-batches 3"
SCENARIOS = {
    "O67": ("opt", "--model facebook/opt-6.7b --percent 100 0 100 0 100 0 --gpu-batch-size 8 --num-gpu-batches 1"),
    "O13": ("opt", "--model facebook/opt-13b --percent 0 100 100 0 100 0 --gpu-batch-size 8 --num-gpu-batches 3"),
    "P1": ("opt", P1),
    "P2": ("opt", P1 + " --compress-weight"),
    # fits nowhere on one GPU with its host in fp16 (350 GB): 4-bit weights, placement chosen per rank
    "O175C": ("opt", "--model facebook/opt-175b --percent auto --gpu-batch-size 8 --num-gpu-batches auto "
                     "--compress-weight"),
    "L70C": ("llama", "--model meta-llama/Llama-2-70b-hf --percent auto --gpu-batch-size 8 "
                      "--num-gpu-batches auto --compress-weight"),
}
NUM = r"([0-9.]+)"


def parse(text):
    def grab(pat):
        m = re.search(pat, text)
        return float(m.group(1)) if m else None
    ranks = re.findall(r"^rank (\d+) \((.*?)\): peak gpu mem ([0-9.]+) GB, peak host mem held (.*?), max RSS "
                       r"([0-9.]+) GB; computing ([0-9.]+) s, waiting for peers ([0-9.]+) s", text, re.M)
    return dict(prefill=grab(r"prefill latency: " + NUM), decode=grab(r"decode latency: " + NUM),
                total=grab(r"total throughput: " + NUM), gpu=grab(r"peak gpu mem: " + NUM), ranks=ranks)


def command(sid, n, a, orig=False, rank=None, port=None):
    family, flags = SCENARIOS[sid]
    flags = f"{flags} {COMMON} {a.extra}".split()
    off = f"/tmp/dist_bench_offload/{sid}-{n}"
    if orig:   # the original FlexGen: one process per rank, started by hand
        return [sys.executable, "-m", "flexgen.dist_flex_opt", *flags, "--offload-dir", off, "--head-ip", "127.0.0.1",
                "--port", str(port), "--rank", str(rank), "--local-rank", str(rank), "--world-size", str(n),
                "--comm-device", a.comm_device or "gpu", "--num-inner-iterations", str(n)]
    if n == 1:
        return [sys.executable, "-m", f"flexgen.flex_{family}", *flags, "--offload-dir", off]
    dist = ["--num-inner-iterations", str(n)] + (["--comm-device", a.comm_device] if a.comm_device else [])
    dist += ["--async-comm"] if a.async_comm else []
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", "29533",
            "-m", f"flexgen.dist_flex_{family}", *flags, "--offload-dir", off, *dist]


def run_ours(sid, n, a):
    cmd = command(sid, n, a)
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        text, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"), "timeout"
    log = os.path.join(a.out, f"{sid}-{n}.txt")
    with open(log, "w") as f:
        f.write(text)
    print(f"  rc={rc} wall={time.time() - t0:.0f} s log={log}", flush=True)
    for line in text.splitlines():
        if line.startswith(("auto policy", "  rank ", "rank ", "error", "total throughput", "decode latency")):
            print("  " + line)
    return rc, parse(text)


def run_orig(sid, n, a):
    """The original FlexGen's ranks (its package only on PYTHONPATH, from an empty folder)."""
    site = "/tmp/orig"
    env = dict(os.environ, PYTHONPATH=site, OMP_NUM_THREADS=str(max(1, os.cpu_count() // n)))
    work = "/tmp/orig_dist_run"
    os.makedirs(work, exist_ok=True)
    port = 7777
    procs = [subprocess.Popen(command(sid, n, a, orig=True, rank=r, port=port), cwd=work, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(n)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=a.timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            outs.append("timeout")
    text = "\n".join(outs)
    with open(os.path.join(a.out, f"orig-{sid}-{n}.txt"), "w") as f:
        f.write(text)
    # the original prints its block on the last rank, with 2 decimals
    return [p.returncode for p in procs], parse(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--comm-device", choices=["gpu", "cpu"], default=None)
    ap.add_argument("--async-comm", action="store_true")
    ap.add_argument("--extra", default="", help="more flags for every run")
    ap.add_argument("--orig", action="store_true", help="also the original FlexGen's dist_flex_opt (OPT only)")
    ap.add_argument("--timeout", type=int, default=540)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/dist_bench"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for sid in a.scenarios:
        base = None
        for n in [int(x) for x in a.ranks.split(",")]:
            rc, r = run_ours(sid, n, a)
            seqs = None
            m = re.search(r"--gpu-batch-size (\d+) --num-gpu-batches (\d+)", SCENARIOS[sid][1])
            if m:
                seqs = int(m.group(1)) * int(m.group(2)) * n
            step = r["decode"] / 31 if r["decode"] else None
            if n == 1 and r["total"]:
                base = r["total"]
            speed = f"{r['total'] / base:.2f}x" if base and r["total"] else "-"
            rows.append((f"ours {sid}", n, seqs, r["prefill"], step, r["total"], speed, r["gpu"], rc, r["ranks"]))
            if a.orig and SCENARIOS[sid][0] == "opt" and n > 1 and "auto" not in SCENARIOS[sid][1]:
                rcs, o = run_orig(sid, n, a)
                ostep = o["decode"] / 31 if o["decode"] else None
                rows.append((f"orig {sid}", n, seqs, o["prefill"], ostep, o["total"], "-", o["gpu"], rcs, []))
    print("\n| run | ranks | sequences | prefill s | decode step s | total tok/s | vs 1 rank | "
          "peak GPU GB (max rank) | rc |")
    print("|---|---|---|---|---|---|---|---|---|")
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for name, n, seqs, pre, step, tot, speed, gpu, rc, ranks in rows:
        print(f"| {name} | {n} | {seqs or '-'} | {f(pre)} | {f(step, 4)} | {f(tot, 2)} | {speed} | {f(gpu)} | {rc} |")
    for name, n, *_, ranks in rows:
        for rk, stage, gpu, held, rss, comp, wait in ranks:
            print(f"  {name} x{n} rank {rk} ({stage}): gpu {gpu} GB, host held {held}, RSS {rss} GB, "
                  f"computing {comp} s, waiting {wait} s")


if __name__ == "__main__":
    main()
