"""The engine's own host operations per decode step, counted by running it: what op_count.py's
per-layer forwards leave out.

op_count.py counts each layer's forward and a compressed cache's quantising and unpacking. Around
them the engine issues its scheduling: per weight moved to the device (is_pinned, the copy,
record_stream), per cache segment loaded or written, the attention core once per device-held
segment and a concatenation of their outputs, activations out and back, the CPU attention path's
copies. Their number depends on the policy's structure (which tiers hold what, compression, CPU
attention, GPU batches), not on the model's sizes. Measured on the lent H200 (benchmarks/
count_ops.py --device cuda, session 9), the per-layer model counted 0.92x of an all-GPU step's
operations but 0.71x of LLaMA-3-8B's 50/50 split with 4-bit weights and cache and 0.44x of CPU
attention's: at 32 layers x 8 GPU batches the missing operations are about half of the step.

So the count is taken from the engine itself: a miniature of the family (ModelFamily.miniature:
the same heads, small widths) generates a few tokens under the same policy on the device the run
uses, at 1 and at 3 layers, under a dispatch mode that counts what reaches the backend from the
compute thread. The difference of the two depths over two layers is one layer's operations for all
GPU batches; what the model's per-layer count (cost_model.model_decode_ops) already covers is
subtracted. Counts are memoised per family shape, policy structure and device.
"""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

DEPTHS = (1, 3)
_MINI_BATCH = 2     # the count does not depend on the GPU batch's size
_MEMO: dict = {}


@dataclass(frozen=True)
class EngineExtra:
    """Operations per decode step the model's per-layer count does not hold: per layer (all GPU
    batches of it) and once per step."""
    per_layer: float
    per_step: float


def _mini_policy(policy, head_dim: int):
    """The policy for the miniature: small GPU batches, the cache's groups no wider than its heads
    (the real heads hold whole groups; padding would add operations the run does not issue)."""
    cc = policy.comp_cache_config
    return policy.replace(gpu_batch_size=_MINI_BATCH,
                          comp_cache_config=dataclasses.replace(cc, group_size=min(cc.group_size, head_dim)))


def _structure(family, policy) -> tuple:
    return (type(family).__name__, repr(family.config.miniature(1)), policy.replace(gpu_batch_size=1))


def _count_step(family, policy, device) -> int:
    """Operations the compute thread issues in one steady decode step of `family` under `policy`."""
    from ..engine.generate import LM
    from ..env import ExecutionEnv
    from .op_count import _Counter
    with tempfile.TemporaryDirectory(prefix="flexgen-engine-ops-") as offload:
        env = ExecutionEnv.create(offload, device=device, cpu_threads=torch.get_num_threads(), io_threads=1)
        env.cuda_graphs = False    # eager steps: a replayed step's host work is counted apart
        lm = None
        try:
            lm = LM(family.config, env, "_DUMMY_", policy, progress=False)
            ids = np.random.default_rng(0).integers(3, family.info().vocab_size - 1,
                                                    size=(policy.gpu_batch_size * policy.num_gpu_batches, 8))
            marks = []
            with _Counter() as mode:
                lm.generate(ids, max_new_tokens=4, on_step=lambda i: marks.append(mode.n))
            return marks[-1] - marks[-2]
        finally:
            if lm is not None:
                lm.close()
            env.close_copy_threads()


def engine_extra(family, policy, device, is_cuda: bool) -> EngineExtra:
    """The engine's operations per decode step beyond cost_model.model_decode_ops, for this policy
    on `device` (a torch device string: where the run computes)."""
    from .cost_model import model_decode_ops
    key = (_structure(family, policy), str(device))
    if key not in _MEMO:
        threads = torch.get_num_threads()
        extra = []
        try:
            for depth in DEPTHS:
                mini = family.miniature(depth)
                pol = _mini_policy(policy, mini.info().head_dim)
                extra.append(_count_step(mini, pol, device) - model_decode_ops(mini, pol, is_cuda))
        finally:
            torch.set_num_threads(threads)
        per_layer = (extra[1] - extra[0]) / (DEPTHS[1] - DEPTHS[0])
        _MEMO[key] = EngineExtra(max(per_layer, 0.0), max(extra[0] - DEPTHS[0] * per_layer, 0.0))
    return _MEMO[key]
