"""Aten operations per decode step (those reaching the backend from the compute thread): the
engine's real count beside the cost model's (optimizer/op_count.py's per-layer counts plus a
compressed cache's), per policy. A deterministic proxy for the host time that bounds small-batch
GPU decoding, and the check that the model counts what the engine issues.
Usage: PYTHONPATH=. python3 benchmarks/count_ops.py [opt|llama] [--percent W C K K A A] [--ngb N]
       [--gbs N] [--compress-weight] [--compress-cache] [--cpu-cache-compute] [--device cuda]
       [--top N] [--by-caller]"""
import argparse
import sys
import tempfile
from collections import Counter

import numpy as np
from torch.utils._python_dispatch import TorchDispatchMode

from flexgen.flex_llama import LlamaConfig, LlamaLM
from flexgen.flex_opt import ExecutionEnv, OptConfig, OptLM, Policy


class Count(TorchDispatchMode):
    """Operations by name, and by the innermost flexgen function that issued them (by_caller)."""
    def __init__(self, by_caller=False):
        super().__init__()
        self.ops = Counter()
        self.callers = Counter()
        self.by_caller = by_caller

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        if self.by_caller:
            f = sys._getframe(1)
            while f is not None and "/flexgen/" not in f.f_code.co_filename:
                f = f.f_back
            where = "?" if f is None else f"{f.f_code.co_filename.split('/flexgen/')[-1]}:{f.f_code.co_name}"
            self.callers[where] += 1
        return func(*args, **(kwargs or {}))


def model_count(lm, policy):
    """The cost model's operations for one eager decode step of this policy."""
    from flexgen.optimizer.cost_model import model_decode_ops
    return int(model_decode_ops(lm.family, policy, lm.env.is_cuda))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("family", nargs="?", default="opt", choices=["opt", "llama"])
    ap.add_argument("--percent", nargs=6, type=float, default=[100, 0, 100, 0, 100, 0])
    ap.add_argument("--gbs", type=int, default=8)
    ap.add_argument("--ngb", type=int, default=1)
    ap.add_argument("--compress-weight", action="store_true")
    ap.add_argument("--compress-cache", action="store_true")
    ap.add_argument("--cpu-cache-compute", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--by-caller", action="store_true", help="also the operations per issuing flexgen function")
    a = ap.parse_args()
    L = 4
    if a.family == "opt":
        cfg = OptConfig(name="toy", num_hidden_layers=L, hidden_size=128, n_head=4, input_dim=128, ffn_embed_dim=256,
                        vocab_size=512, max_seq_len=256)
        cls = OptLM
    else:
        cfg = LlamaConfig(name="toy", num_hidden_layers=L, hidden_size=128, n_head=4, num_key_value_heads=2,
                          intermediate_size=256, vocab_size=512, max_seq_len=256)
        cls = LlamaLM
    env = ExecutionEnv.create(tempfile.mkdtemp(), device=a.device)
    env.cuda_graphs = False   # eager steps: what the per-operation host cost multiplies
    policy = Policy(a.gbs, a.ngb, *a.percent, overlap=True, compress_weight=a.compress_weight,
                    compress_cache=a.compress_cache, cpu_cache_compute=a.cpu_cache_compute)
    lm = cls(cfg, env, "_DUMMY_", policy, progress=False)
    ids = np.random.default_rng(0).integers(3, 500, size=(a.gbs * a.ngb, 16))
    snaps = []
    with Count(a.by_caller) as mode:
        lm.generate(ids, max_new_tokens=4, on_step=lambda i: snaps.append((Counter(mode.ops), Counter(mode.callers))))
    step = snaps[-1][0] - snaps[-2][0]
    n, predicted = sum(step.values()), model_count(lm, policy)
    print(f"{a.family} {' '.join(f'{p:g}' for p in a.percent)} {a.gbs}x{a.ngb} on {a.device}: {n} ops per decode "
          f"step ({n / (L * a.ngb):.1f} per layer and GPU batch), cost model {predicted} ({predicted / n:.2f}x)")
    print("  most issued:", ", ".join(f"{k.removeprefix('aten.')} {v}" for k, v in step.most_common(a.top)))
    if a.by_caller:
        where = snaps[-1][1] - snaps[-2][1]
        print("  by caller:", ", ".join(f"{k} {v}" for k, v in where.most_common(a.top)))
    lm.close()
    env.close_copy_threads()


if __name__ == "__main__":
    main()
