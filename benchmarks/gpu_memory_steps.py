"""Peak GPU memory allocated in each generation step (prefill, then every decode step), with and
without overlap, for a dummy OPT model: shows whether a run's peak comes from prefill or grows
while decoding. Usage: PYTHONPATH=. python3 benchmarks/gpu_memory_steps.py facebook/opt-30b 64 6
60 40 0 100 100 0 [compress-weight] [compress-cache] [--gen-len 12]"""
import argparse
import tempfile

import numpy as np
import torch

from flexgen.flex_opt import ExecutionEnv, OptLM, Policy

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("gbs", type=int)
ap.add_argument("ngb", type=int)
ap.add_argument("percent", type=float, nargs=6)
ap.add_argument("flags", nargs="*")
ap.add_argument("--gen-len", type=int, default=12)
a = ap.parse_args()
env = ExecutionEnv.create(tempfile.mkdtemp())
ids = np.random.default_rng(0).integers(100, 1000, size=(a.gbs * a.ngb, 512))
lm = None
for overlap in (True, False):
    policy = Policy(a.gbs, a.ngb, *a.percent, overlap=overlap, compress_weight="compress-weight" in a.flags,
                    compress_cache="compress-cache" in a.flags)
    if lm is None:
        lm = OptLM(a.model, env, "_DUMMY_", policy, progress=False)
    lm.policy = lm.runner.policy = policy
    lm.runner.io.overlap = overlap
    peaks = []

    def step(i):
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() / 1e9)
        torch.cuda.reset_peak_memory_stats()

    torch.cuda.reset_peak_memory_stats()
    lm.generate(ids, max_new_tokens=a.gen_len, on_step=step)
    print(f"overlap={overlap}: peak GB per step: " + " ".join(f"{p:.2f}" for p in peaks)
          + f"; held after: {torch.cuda.memory_allocated() / 1e9:.2f}")
lm.close()
