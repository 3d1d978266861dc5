"""Kernels launched per decode step (aten ops reaching the backend), a deterministic proxy for the
host overhead that bounds small-batch GPU decoding (P4). Runs on the CPU with dummy weights.
Usage: PYTHONPATH=. python3 benchmarks/count_ops.py [opt|llama]"""
import sys
import tempfile
from collections import Counter

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flexgen.flex_llama import LlamaConfig, LlamaLM
from flexgen.flex_opt import ExecutionEnv, OptConfig, OptLM, Policy


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def main():
    family = sys.argv[1] if len(sys.argv) > 1 else "opt"
    if family == "opt":
        cfg = OptConfig(name="toy", num_hidden_layers=4, hidden_size=64, n_head=4, input_dim=64, ffn_embed_dim=128,
                        vocab_size=512, max_seq_len=256)
        cls = OptLM
    else:
        cfg = LlamaConfig(name="toy", num_hidden_layers=4, hidden_size=64, n_head=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=512, max_seq_len=256)
        cls = LlamaLM
    env = ExecutionEnv.create(tempfile.mkdtemp(), device="cpu")
    lm = cls(cfg, env, "_DUMMY_", Policy(8, 1, 100, 0, 100, 0, 100, 0), progress=False)
    ids = np.random.default_rng(0).integers(3, 500, size=(8, 16))
    counts = []

    def on_step(i):
        counts.append(sum(mode.ops.values()))

    with Count() as mode:
        lm.generate(ids, max_new_tokens=4, on_step=on_step)
    per_step = counts[-1] - counts[-2]
    print(f"{family}: {per_step} ops per decode step, {per_step / cfg.num_hidden_layers:.1f} per layer")
    lm.close()
    env.close_copy_threads()


if __name__ == "__main__":
    main()
