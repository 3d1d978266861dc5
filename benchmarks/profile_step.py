"""Profile one generate() call of a dummy model (any family): Python hot spots (cProfile) and kernels
(torch.profiler). Usage: PYTHONPATH=. python3 benchmarks/profile_step.py facebook/opt-6.7b 8 1 100 0 100 0 100 0
[overlap] [compress-weight] [compress-cache] [cpu-cache-compute] [prefill] [no-kernels] [flexgen-grouping]
prefill: first the hot spots of a prefill alone (generate of one token, reusing the warm-up's
cache memory; the next call's cache is fresh); no-kernels: no torch.profiler."""
import cProfile
import os
import pstats
import sys
import tempfile

import numpy as np
import torch

from flexgen.cli import DEFAULT_CACHE_GROUP, DEFAULT_WEIGHT_GROUPING, lm_class_for
from flexgen.flex_opt import ExecutionEnv, Policy
from flexgen.policy import CompressionConfig

model, gbs, ngb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pct = [float(x) for x in sys.argv[4:10]]
flags = set(sys.argv[10:])
env = ExecutionEnv.create(tempfile.mkdtemp())
# the CLI's default compression grouping (weights in groups along dim 1, since issue 12 item 8), as a
# user's run has it; `flexgen-grouping` keeps FlexGen's CompressionConfig (groups along dim 0)
grouping = {} if "flexgen-grouping" in flags else dict(
    comp_weight_config=CompressionConfig(4, DEFAULT_WEIGHT_GROUPING[0], DEFAULT_WEIGHT_GROUPING[1], False),
    comp_cache_config=CompressionConfig(4, DEFAULT_CACHE_GROUP, 2, False))
policy = Policy(gbs, ngb, *pct, overlap="overlap" in flags, compress_weight="compress-weight" in flags,
                compress_cache="compress-cache" in flags, cpu_cache_compute="cpu-cache-compute" in flags, **grouping)
lm = lm_class_for(model)(model, env, "_DUMMY_", policy, progress=False)
ids = np.random.default_rng(0).integers(100, 1000, size=(gbs * ngb, 512))
# with `prefill`, the warm-up's cache has the prefill-alone call's shape: that call reuses its host memory
lm.generate(ids, max_new_tokens=1 if "prefill" in flags else 2)


def hot_spots(new_tokens):
    pr = cProfile.Profile()
    pr.enable()
    lm.generate(ids, max_new_tokens=new_tokens)
    pr.disable()
    print("timings", {k: [round(x, 4) for x in v] for k, v in lm.timings.items()})
    pstats.Stats(pr).sort_stats("tottime").print_stats(18)


if "prefill" in flags:
    hot_spots(1)
hot_spots(8)
if "no-kernels" in flags:
    sys.exit(0)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    lm.generate(ids, max_new_tokens=4)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=int(os.environ.get("ROWS", "15"))))
