"""Peak GPU memory allocated in each generation step (prefill, then every decode step), with and
without overlap, beside the memory model's estimate for the same policy (issue 6): shows whether
a run's peak comes from prefill or grows while decoding, and what stays allocated afterwards.

Usage: PYTHONPATH=. python3 benchmarks/gpu_memory_steps.py facebook/opt-30b 64 6 60 40 0 100 100 0
       [compress-weight] [compress-cache] [--gen-len 12] [--prompt-len 512] [--layers N]
--layers N: a dummy model with only N layers (the working set is per layer; loads faster).
"""
import argparse
import tempfile

import numpy as np
import torch

from flexgen.flex_opt import ExecutionEnv, OptLM, Policy
from flexgen.models.opt import get_opt_config
from flexgen.models.registry import resolve_model
from flexgen.optimizer.memory_model import estimate_memory

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("gbs", type=int)
ap.add_argument("ngb", type=int)
ap.add_argument("percent", type=float, nargs=6)
ap.add_argument("flags", nargs="*")
ap.add_argument("--gen-len", type=int, default=12)
ap.add_argument("--prompt-len", type=int, default=512)
ap.add_argument("--layers", type=int, default=None)
a = ap.parse_args()
cfg = get_opt_config(a.model, **({"num_hidden_layers": a.layers} if a.layers else {}))
env = ExecutionEnv.create(tempfile.mkdtemp())
ids = np.random.default_rng(0).integers(100, 1000, size=(a.gbs * a.ngb, a.prompt_len))
lm = None
for overlap in (True, False):
    policy = Policy(a.gbs, a.ngb, *a.percent, overlap=overlap, compress_weight="compress-weight" in a.flags,
                    compress_cache="compress-cache" in a.flags)
    if lm is None:
        lm = OptLM(cfg, env, "_DUMMY_", policy, progress=False)
        est = estimate_memory(resolve_model(cfg).family, policy, a.prompt_len, a.gen_len, True)
        print(f"memory model: gpu {est.gpu / 1e9:.2f} GB = " + ", ".join(
            f"{k} {v.get('gpu', 0) / 1e9:.2f}" for k, v in est.parts.items()))
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
