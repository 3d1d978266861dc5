"""Where a run's peak GPU memory goes, against the memory model's estimate (issue 6).

Runs a dummy OPT model (optionally with fewer layers: the working set is per layer) under
torch.cuda.memory._record_memory_history, replays the allocation trace to find the peak, and
prints the allocations live at the peak grouped by the innermost flexgen source line, beside
the memory model's parts. Prefill (one new token) and a decode run are measured apart.

Usage: PYTHONPATH=. python3 benchmarks/gpu_memory_peak.py facebook/opt-30b 64 6 60 40 0 100 100 0
       [--layers 4] [--prompt-len 512] [--gen-len 4] [compress-weight] [compress-cache] [cpu-cache-compute]
"""
import argparse
import collections
import tempfile

import numpy as np
import torch

from flexgen.flex_opt import ExecutionEnv, OptLM, Policy
from flexgen.models.opt import get_opt_config
from flexgen.models.registry import resolve_model
from flexgen.optimizer.memory_model import estimate_memory

GB = 1e9


def where(frames):
    """The innermost frame in flexgen's own code (file:line function)."""
    for f in frames:
        name = f.get("filename", "")
        if "/flexgen/" in name and "benchmarks" not in name:
            return f"{name.split('/flexgen/')[-1]}:{f.get('line')} {f.get('name')}"
    return "(outside flexgen)"


def peak_breakdown(snapshot, base_bytes):
    """Replay the trace: the peak of live bytes and what was live then, by source line."""
    live, total, peak, at_peak = {}, 0, 0, {}
    actions = collections.Counter(e["action"] for trace in snapshot["device_traces"] for e in trace)
    # a block counts until its free completes (after the streams that used it pass that point)
    free = "free_completed" if actions["free_completed"] else "free_requested"
    for trace in snapshot["device_traces"]:
        for e in trace:
            if e["action"] == "alloc":
                live[e["addr"]] = (e["size"], where(e.get("frames", [])))
                total += e["size"]
                if total > peak:
                    peak, at_peak = total, dict(live)
            elif e["action"] == free and e["addr"] in live:
                total -= live.pop(e["addr"])[0]
    print("trace:", dict(actions))
    by_line = collections.Counter()
    for size, w in at_peak.values():
        by_line[w] += size
    return base_bytes + peak, by_line


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("gbs", type=int)
    ap.add_argument("ngb", type=int)
    ap.add_argument("percent", type=float, nargs=6)
    ap.add_argument("flags", nargs="*")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=4)
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill-alone call")
    a = ap.parse_args()
    cfg = get_opt_config(a.model, num_hidden_layers=a.layers)
    flags = set(a.flags)
    policy = Policy(a.gbs, a.ngb, *a.percent, overlap=True, compress_weight="compress-weight" in flags,
                    compress_cache="compress-cache" in flags, cpu_cache_compute="cpu-cache-compute" in flags)
    fam = resolve_model(cfg).family
    env = ExecutionEnv.create(tempfile.mkdtemp())
    lm = OptLM(cfg, env, "_DUMMY_", policy, progress=False)
    ids = np.random.default_rng(0).integers(100, 1000, size=(a.gbs * a.ngb, a.prompt_len))
    lm.generate(ids, max_new_tokens=2)   # warm-up: kernels, the Triton check, staging buffers
    runs = (("prefill + decode", a.gen_len),) if a.no_prefill else (("prefill", 1), ("prefill + decode", a.gen_len))
    for label, new in runs:
        est = estimate_memory(fam, policy, a.prompt_len, new, True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        lm.generate(ids, max_new_tokens=new)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        peak, by_line = peak_breakdown(snap, base)
        print(f"== {label}: {a.layers} layers, {a.gbs} x {a.ngb}, {a.prompt_len} + {new}")
        print(f"peak allocated {torch.cuda.max_memory_allocated() / GB:.2f} GB (trace replay {peak / GB:.2f}), "
              f"held before the call {base / GB:.2f} GB")
        print(f"memory model: gpu {est.gpu / GB:.2f} GB = " + ", ".join(
            f"{k} {v.get('gpu', 0) / GB:.2f}" for k, v in est.parts.items()))
        for w, size in by_line.most_common(14):
            print(f"  {size / GB:7.3f} GB  {w}")
    lm.close()


if __name__ == "__main__":
    main()
