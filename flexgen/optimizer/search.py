"""Search for the highest-throughput policy that fits given memory limits.

The space: weight and cache percentages in steps of 20 (gpu, cpu; the rest
on disk), activations on the device or in CPU memory, gpu_batch_size 1..64 (powers of two),
num_gpu_batches 1..16, 4-bit weight compression on/off, 4-bit cache compression on/off, CPU
attention on/off (only where some cache is in CPU memory). Every candidate's memory is predicted
with memory_model's accounting (vectorised in cost_model.evaluate); those that fit are timed by the
cost model; the best are re-checked one by one with estimate_memory + shortfalls.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..policy import Policy
from .cost_model import Grid, Prediction, Workload, evaluate, predict
from .memory_model import MachineMemory, estimate_memory, shortfalls

GBS = (1, 2, 4, 8, 16, 32, 64)
# with the engine's own operations counted (count_on), the best candidates of the vectorised model
# are re-predicted with them and re-ranked: the count runs the engine, so only this many
RERANK = 6
NGB = (1, 2, 3, 4, 6, 8, 12, 16)


class NoPolicyFits(ValueError):
    """No policy in the search space fits the memory limits."""


@dataclass
class Candidate:
    policy: Policy
    prediction: Prediction


def _pairs(step):
    return [(g, c) for g in range(0, 101, step) for c in range(0, 101 - g, step)]


def build_grid(base: Policy | None = None, w_step=20, c_step=20, gbs=GBS, ngb=NGB,
               compress=(False, True), cpu_attention=(False, True)) -> Grid:
    w_opts, c_opts, a_opts = _pairs(w_step), _pairs(c_step), [(100, 0), (0, 100)]
    flags = [int(x) for x in compress]
    axes = [range(len(w_opts)), range(len(c_opts)), range(len(a_opts)), gbs, ngb, flags, flags,
            [int(x) for x in cpu_attention]]
    arr = np.array(list(itertools.product(*axes)), dtype=np.int64).T
    wi, ci, ai, g, k, cw, cc, ccc = arr
    c_cpu = np.array([c[1] for c in c_opts])[ci]
    keep = ~((ccc == 1) & (c_cpu == 0))     # CPU attention only where some cache is on the CPU
    grid = Grid(w_opts, c_opts, a_opts, wi, ci, ai, g, k, cw, cc, ccc,
                pin_weight=True if base is None else base.pin_weight,
                overlap=True if base is None else base.overlap, base=base)
    return grid.subset(keep)


def _fits(mem_arrays, limits: MachineMemory, margin=0.95):
    """shortfalls()'s rule on arrays."""
    gpu, host = mem_arrays["gpu"], mem_arrays["pinned"] + mem_arrays["pageable"]
    ok = np.ones(len(gpu), dtype=bool)
    if limits.gpu is not None:
        ok &= gpu <= limits.gpu * margin
    else:
        host = host + gpu
    ok &= host <= limits.host * margin
    ok &= mem_arrays["disk"] <= limits.disk * margin
    return ok


def search(family, workload: Workload, limits: MachineMemory, profile: dict, top: int = 5,
           base: Policy | None = None, grid: Grid | None = None, graph_op_s: float | None = None,
           count_on: str | None = None) -> list[Candidate]:
    """The `top` best policies (highest predicted throughput first) that fit `limits`.
    graph_op_s: host seconds per operation of a decode step replayed from a CUDA graph, for the
    policies that can (cost_model.graph_eligible); None: all decode steps eager. count_on: the
    device to count the engine's scheduling operations on (cost_model.predict), for the best
    max(top, RERANK) candidates, which are then ranked again; None: not counted."""
    is_cuda = limits.gpu is not None
    grid = grid or build_grid(base)
    mem = evaluate(family, grid, workload, profile, is_cuda, memory_only=True)
    fit = grid.subset(_fits(mem, limits))
    if not len(fit):
        raise NoPolicyFits("no policy fits")
    res = evaluate(family, fit, workload, profile, is_cuda, graph_op_s=graph_op_s)
    # highest throughput first; among equals the smaller memory footprint, then simpler policies
    footprint = res["gpu"] + res["pinned"] + res["pageable"]
    order = np.lexsort((fit.cw + fit.cc + fit.ccc, footprint, -np.round(res["throughput"], 6)))
    out, seen = [], set()
    for i in order:
        pol = fit.policy(i)
        if pol in seen:
            continue
        seen.add(pol)
        est = estimate_memory(family, pol, workload.prompt_len, workload.gen_len, is_cuda)
        if shortfalls(est, limits):   # the vectorised estimate disagrees: trust the exact one
            continue
        out.append(Candidate(pol, predict(family, workload, pol, profile, is_cuda, graph_op_s=graph_op_s,
                                          count_on=count_on)))
        if len(out) >= (top if count_on is None else max(top, RERANK)):
            break
    if not out:
        raise NoPolicyFits("no policy fits")
    out.sort(key=lambda c: -round(c.prediction.throughput, 6))   # stable: ties keep the order above
    return out[:top]


def choose_policy(family, prompt_len: int, gen_len: int, limits: MachineMemory, profile: dict | None = None,
                  base: Policy | None = None, gpu_batch_size: int | None = None,
                  num_gpu_batches: int | None = None, graph_op_s: float | None = None,
                  count_on: str | None = None) -> Candidate:
    """The best policy for one block that fits `limits` (FlexGen's `--percent auto`), with its
    prediction. Batch sizes given are kept; None lets the search choose. Profile: this machine's
    saved one, else the built-in default. Raises NoPolicyFits."""
    if profile is None:
        from ..profile import load_profile
        from .cost_model import DEFAULT_PROFILE
        profile = load_profile() or DEFAULT_PROFILE
    grid = build_grid(base, gbs=GBS if gpu_batch_size is None else (gpu_batch_size,),
                      ngb=NGB if num_gpu_batches is None else (num_gpu_batches,))
    return search(family, Workload(prompt_len, gen_len), limits, profile, top=1, base=base, grid=grid,
                  graph_op_s=graph_op_s, count_on=count_on)[0]
