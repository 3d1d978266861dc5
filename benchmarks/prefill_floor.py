"""P3's prefill against its compute floor (issue 17 item 2): cuBLAS on one OPT layer's matmul shapes at
the prefill's token count, then one prefill of the dummy model with its kernels by GPU time.
Usage: PYTHONPATH=. python3 benchmarks/prefill_floor.py [flex_opt's flags: --model, --percent,
--gpu-batch-size, --num-gpu-batches, --prompt-len, --compress-weight, --compress-cache ...] [--rows 25]
(default: P3g's policy, OPT-30B, 100 0 100 0 100 0, 16 x 1)"""
import argparse
import tempfile
import time

import numpy as np
import torch

from dequant_bench import timed   # this folder: the script's own directory is on sys.path
from flexgen.cli import add_arguments, env_from_args, lm_class_for, policy_from_args
from flexgen.models.opt import get_opt_config

ap = argparse.ArgumentParser()
add_arguments(ap, "facebook/opt-30b", "_DUMMY_")
ap.set_defaults(gpu_batch_size=16, num_gpu_batches=1, offload_dir=None)
ap.add_argument("--rows", type=int, default=25, help="rows of the kernel table")
a = ap.parse_args()
policy = policy_from_args(a)   # the policy a flex_opt run of these flags builds
cfg = get_opt_config(a.model.split("/")[-1])  # OPT only: the layer's six matmuls below are OPT's
h, f, L = cfg.hidden_size, cfg.ffn_embed_dim, cfg.num_hidden_layers
seqs = policy.gpu_batch_size * policy.num_gpu_batches
tokens = seqs * a.prompt_len


# the floor: the layer's matmuls (q, k, v, out, fc1, fc2) at the prefill's tokens, cuBLAS fp16
x = torch.randn(tokens, h, dtype=torch.float16, device="cuda")
y = torch.randn(tokens, f, dtype=torch.float16, device="cuda")
shapes = [("qkvo", x, torch.randn(h, h, dtype=torch.float16, device="cuda"), 4),
          ("fc1", x, torch.randn(f, h, dtype=torch.float16, device="cuda"), 1),
          ("fc2", y, torch.randn(h, f, dtype=torch.float16, device="cuda"), 1)]
layer_s, layer_flop = 0.0, 0.0
for name, inp, w, n in shapes:
    s = timed(lambda: torch.nn.functional.linear(inp, w)) * n
    fl = 2.0 * tokens * w.shape[0] * w.shape[1] * n
    layer_s += s; layer_flop += fl
    print(f"{name:5s} {tokens} x {w.shape[1]} x {w.shape[0]} (x{n}): {s * 1e3:.2f} ms, {fl / s / 1e12:.0f} TFLOP/s")
attn_flop = 2 * 2 * a.prompt_len ** 2 * h * seqs / 2  # causal: half of QK^T and AV
print(f"floor: {L} layers x {layer_s * 1e3:.2f} ms = {L * layer_s:.3f} s of matmuls "
      f"({L * layer_flop / 1e15:.3f} PFLOP at {layer_flop / layer_s / 1e12:.0f} TFLOP/s), attention "
      f"{L * attn_flop / 1e15:.3f} PFLOP causal")
del x, y, shapes
torch.cuda.empty_cache()

a.offload_dir = a.offload_dir or tempfile.mkdtemp()
lm = lm_class_for(a.model)(a.model, env_from_args(a), a.path, policy, progress=False)
ids = np.random.default_rng(0).integers(100, 1000, size=(seqs, a.prompt_len))
lm.generate(ids, max_new_tokens=1)
for _ in range(2):
    torch.cuda.synchronize(); t = time.perf_counter()
    lm.generate(ids, max_new_tokens=1)
    torch.cuda.synchronize()
    print(f"prefill (generate of 1 token): {time.perf_counter() - t:.3f} s; timings "
          f"{ {k: [round(v, 4) for v in vs] for k, vs in lm.timings.items()} }")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    lm.generate(ids, max_new_tokens=1)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows))
