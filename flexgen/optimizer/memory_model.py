"""What a policy will allocate, predicted before anything is allocated, and the pre-flight check
that refuses a run that cannot fit (instead of being killed by the OS or CUDA minutes later).

Counted exactly the way the engine places tensors: each layer's weights by FlexGen's size rule
(memory/placement.assign_by_size), the KV cache split over heads (split_counts), packed sizes
when compressed. On top of what stays resident, the compute device holds a working set: the
layers in flight (current and prefetched), one GPU batch's cache brought in, and the
activations of the widest step.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import math
import os
import shutil
from dataclasses import dataclass

from ..memory.packed_matmul import config_fits
from ..memory.placement import TIERS, assign_by_size, split_counts
from ..models.base import packs
from ..policy import Policy, PolicyError

GiB = 1 << 30


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10 ** 3, "kib": 1 << 10, "m": 1 << 20, "mb": 10 ** 6,
          "mib": 1 << 20, "g": GiB, "gb": 10 ** 9, "gib": GiB, "t": 1 << 40, "tb": 10 ** 12, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'24GiB', '24G', '110 GB', '512MiB', '1e9' -> bytes (a bare number is GiB)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 24GiB, 110GB, 512MiB)")
    unit = _UNITS[m.group(2).lower()] if m.group(2) else GiB
    return int(float(m.group(1)) * unit)


class MemoryFitError(PolicyError):
    """The policy cannot fit this machine's memory."""


@dataclass
class MemoryEstimate:
    gpu: int = 0        # compute-device memory (on a CPU-only machine: counted as host memory)
    pinned: int = 0     # page-locked host memory
    pageable: int = 0   # ordinary host memory
    disk: int = 0       # offload files
    # what the totals are made of: {"weights"|"cache"|"act"|"work": {tier: bytes}}
    parts: dict = None

    def host(self) -> int:
        return self.pinned + self.pageable


def _layers(family):
    """The family's layer specs, built once per family object (the search calls this a lot)."""
    cached = getattr(family, "_layer_specs", None)
    if cached is None:
        cached = family.layers()
        family._layer_specs = cached
    return cached


def _packed_bytes(shape, cfg) -> int:
    from ..memory.compression import packed_shapes
    data, meta, mn = packed_shapes(shape, cfg)
    return math.prod(data) + 2 * math.prod(meta) + (2 * math.prod(mn) if mn else 0)


def estimate_memory(family, policy: Policy, prompt_len: int, gen_len: int, is_cuda: bool,
                    itemsize: int | None = None) -> MemoryEstimate:
    itemsize = itemsize or (2 if is_cuda else 4)
    layers = _layers(family)
    est = MemoryEstimate(parts={})
    host_key = "pinned" if is_cuda and policy.pin_weight else "pageable"

    # Host memory is pinned where it crosses PCIe: weights when pin_weight, a cache that is
    # loaded to the device (not one that CPU attention reads in place), activations.
    staged = "pinned" if is_cuda else "pageable"

    def add(tier, nbytes, host=host_key, what="weights"):
        part = est.parts.setdefault(what, {})
        part[tier] = part.get(tier, 0) + nbytes
        if tier == "gpu":
            if is_cuda:
                est.gpu += nbytes
            else:
                est.pageable += nbytes
        elif tier == "cpu":
            setattr(est, host, getattr(est, host) + nbytes)
        else:
            est.disk += nbytes

    # weights, per layer as WeightStore places them
    w_pct = policy.percents("weight")
    stage_bytes = []
    for layer in layers:
        sizes = [math.prod(w.shape) for w in layer.weights]
        layer_bytes = 0
        for spec, tier in zip(layer.weights, assign_by_size(sizes, w_pct)):
            packed = policy.compress_weight and packs(layer, spec)
            nbytes = _packed_bytes(spec.shape, policy.comp_weight_config) if packed else \
                math.prod(spec.shape) * itemsize
            add(tier, nbytes)
            if tier != "gpu" or packed:
                layer_bytes += math.prod(spec.shape) * itemsize  # unpacked / transferred copy
        stage_bytes.append(layer_bytes)

    # KV cache: every attention layer x GPU batch, split over heads
    seq = prompt_len + gen_len
    gbs, ngb = policy.gpu_batch_size, policy.num_gpu_batches
    c_pct = policy.percents("cache")
    cache_cfg = dataclasses.replace(policy.comp_cache_config, group_dim=3)  # as LayerCache stores it
    one_cache = 0
    for layer in layers:
        if layer.kind != "attention":
            continue
        counts = split_counts(layer.kv_heads, c_pct)
        for tier, heads in zip(TIERS, counts):
            shape = (seq, gbs, heads, layer.head_dim)
            nbytes = (_packed_bytes(shape, cache_cfg) if policy.compress_cache
                      else math.prod(shape) * itemsize) if heads else 0
            add(tier, 2 * ngb * nbytes, host="pageable" if policy.cpu_cache_compute else staged, what="cache")
        one_cache = max(one_cache, 2 * seq * gbs * layer.kv_heads * layer.head_dim * itemsize)

    # activations between layers, one slot per GPU batch, on their tier (prefill is the widest)
    info = family.info()
    hidden = gbs * prompt_len * info.hidden_size * itemsize
    for tier, n in zip(TIERS, split_counts(gbs, policy.percents("act"))):
        add(tier, ngb * hidden * n // gbs, host=staged, what="act")

    # working set on the compute device: two layers in flight (one unpacked where all weights
    # live on the device packed: nothing arrives while a layer computes, and each unpacks where it
    # is used; OPT-30B at 4 bits, 16 x 1 on the H200: 21.73 GB at its peak, 21.66 counted), a
    # cache brought in (and next), and the intermediates of the widest layer (MLP up-projection,
    # logits of one batch)
    inflight = 1 if w_pct[0] == 100 else 2
    work = inflight * max(stage_bytes, default=0) + (2 * one_cache if c_pct[0] < 100 else 0)
    work += gbs * prompt_len * intermediate_elems(layers, info.hidden_size) * itemsize
    work += gbs * info.vocab_size * 4 * 2
    all_gpu = all(policy.percents(x)[0] == 100 for x in ("weight", "cache", "act"))
    if is_cuda and all_gpu and not policy.cpu_cache_compute:
        unpacked_weights = policy.compress_weight and not config_fits(policy.comp_weight_config)
        work += graph_pool_bytes(one_cache, max(stage_bytes, default=0), policy.compress_cache, unpacked_weights)
    add("gpu", work, what="work")
    if is_cuda and (c_pct[2] > 0 or w_pct[2] > 0 or policy.percents("act")[2] > 0):
        est.pinned += 2 * max(max(stage_bytes, default=0), one_cache)  # disk relay buffers
    if is_cuda and policy.cpu_cache_compute and c_pct[1] > 0:
        est.pinned += cpu_attention_relay(layers, policy, prompt_len, itemsize)
    return est


def graph_pool_bytes(one_cache, stage_max, compress_cache, unpacked_weights):
    """What the CUDA graphs of a packed decode step (engine/graphs.py, captured by default where
    everything is on the GPU) keep in their private pool across blocks, beside the next block's
    prefill: a packed cache's layer unpacked, K and V, and the copies attention may make of them
    (OPT-30B, 16 x 1, 4 bits: 1.1 GB more at its peak than eagerly, 4 x 250 MB counted here), and
    an unpacked layer where F.linear cannot read the weights packed. Unpacked steps keep a few MiB
    (graphs.py), not counted. Works on numbers and on arrays of candidates (cost_model): the two
    flags are bools or bool arrays."""
    return 4 * one_cache * compress_cache + stage_max * unpacked_weights


def intermediate_elems(layers, hidden: int) -> int:
    """Values per prefill token that the widest layer holds at once beyond its input: four of
    max(widest matrix / 4, hidden) for a dense layer (the MLP up-projection); for a routed
    mixture of experts, the top_k copies of each token gathered for its experts and their outputs,
    the output and residual, and one expert's up-projection and activation over at most every
    token (one expert may get them all)."""
    widest = max((max(w.shape) for l in layers for w in l.weights if len(w.shape) == 2), default=0)
    out = 4 * max(widest // 4, hidden)
    for layer in layers:
        if layer.kind == "moe":
            rows = max((w.shape[0] for w in layer.weights if w.share < 1 and len(w.shape) == 2), default=0)
            out = max(out, hidden * (3 + 2 * layer.top_k) + rows * 3 // 2)
    return out


def cpu_attention_relay(layers, policy: Policy, prompt_len: int, itemsize: int) -> int:
    """The compute thread's pinned relay for new K/V rows going into a heads-major CPU cache: the
    largest is one layer's prompt rows for one GPU batch (stored packed when compressed)."""
    rows = 0
    for layer in layers:
        if layer.kind == "attention":
            heads = split_counts(layer.kv_heads, policy.percents("cache"))[1]
            shape = (prompt_len, policy.gpu_batch_size, heads, layer.head_dim)
            rows = max(rows, _packed_bytes(shape, dataclasses.replace(policy.comp_cache_config, group_dim=3))
                       if policy.compress_cache else math.prod(shape) * itemsize)
    return rows


@dataclass
class MachineMemory:
    gpu: int | None     # free bytes on the compute device, None on a CPU-only machine
    host: int
    disk: int


def available_memory(env) -> MachineMemory:
    """Free memory now, within the environment's caps (--gpu-mem, --cpu-mem)."""
    host = _host_available()
    cap = getattr(env.host_bytes, "cap", None)
    if cap is not None:
        host = min(host, max(0, cap - env.host_bytes.pinned - env.host_bytes.pageable))
    return MachineMemory(env.gpu_budget(), host, shutil.disk_usage(env.offload_dir).free)


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def shortfalls(est: MemoryEstimate, mem: MachineMemory, margin: float = 0.95) -> list[str]:
    out = []
    if mem.gpu is not None and est.gpu > mem.gpu * margin:
        out.append(f"GPU memory: needs {est.gpu / GiB:.1f} GiB, {mem.gpu / GiB:.1f} GiB free")
    host = est.host() + (est.gpu if mem.gpu is None else 0)
    if host > mem.host * margin:
        out.append(f"host memory: needs {host / GiB:.1f} GiB, {mem.host / GiB:.1f} GiB available")
    if est.disk > mem.disk * margin:
        out.append(f"disk ({'offload dir'}): needs {est.disk / GiB:.1f} GiB, {mem.disk / GiB:.1f} GiB free")
    return out


def _fits(family, policy, prompt_len, gen_len, is_cuda, mem) -> bool:
    return not shortfalls(estimate_memory(family, policy, prompt_len, gen_len, is_cuda), mem)


def suggest_policy(family, policy: Policy, prompt_len, gen_len, is_cuda, mem) -> Policy | None:
    """A nearby policy that fits: weights and cache moved down the hierarchy (GPU -> CPU -> disk)
    in steps of 25%, then smaller GPU batches, then 4-bit weights."""
    def moves(gpu, cpu):
        for g in sorted({int(gpu), *range(0, int(gpu), 25)}, reverse=True):
            for c in sorted({100 - g, *range(0, 100 - g, 25)}, reverse=True):
                yield g, c

    floor = policy.replace(gpu_batch_size=1, w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0,
                           cache_cpu_percent=0, compress_weight=True)
    need = estimate_memory(family, floor, prompt_len, gen_len, is_cuda)
    if need.gpu + need.host() + need.disk > (mem.gpu or 0) + mem.host + mem.disk:  # no room anywhere
        return None
    batches = [policy.gpu_batch_size]
    while batches[-1] > 1:
        batches.append(batches[-1] // 2)
    for compress in (policy.compress_weight, True):
        for gbs in batches:
            for wg, wc in moves(*policy.percents("weight")[:2]):
                for cg, cc in moves(*policy.percents("cache")[:2]):
                    cand = policy.replace(gpu_batch_size=gbs, w_gpu_percent=wg, w_cpu_percent=wc,
                                          cache_gpu_percent=cg, cache_cpu_percent=cc,
                                          compress_weight=compress)
                    if _fits(family, cand, prompt_len, gen_len, is_cuda, mem):
                        return cand
    return None


def policy_flags(p: Policy) -> str:
    flags = (f"--percent {p.w_gpu_percent:g} {p.w_cpu_percent:g} {p.cache_gpu_percent:g} {p.cache_cpu_percent:g} "
             f"{p.act_gpu_percent:g} {p.act_cpu_percent:g} --gpu-batch-size {p.gpu_batch_size} "
             f"--num-gpu-batches {p.num_gpu_batches}")
    return flags + (" --compress-weight" if p.compress_weight else "") + (" --compress-cache" if p.compress_cache else "")


def preflight(family, policy: Policy, prompt_len: int, gen_len: int, env) -> MemoryEstimate:
    """Raise MemoryFitError, naming the shortfall and a policy that would fit, when the policy's
    predicted peak memory exceeds what this machine has."""
    est = estimate_memory(family, policy, prompt_len, gen_len, env.is_cuda)
    env.release_spares()   # a previous model's cache memory kept for reuse is not this run's
    mem = available_memory(env)
    short = shortfalls(est, mem)
    if short:
        fit = suggest_policy(family, policy, prompt_len, gen_len, env.is_cuda, mem)
        hint = (f"a policy that would fit: {policy_flags(fit)}" if fit else
                "no placement of this model fits this machine's memory and disk, even compressed")
        raise MemoryFitError(f"{family.info().name} with {policy_flags(policy)} does not fit: "
                             f"{'; '.join(short)}. {hint} (or pass --force to try anyway)")
    return est
