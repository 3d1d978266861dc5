"""The cost model: predicted prefill time, decode time per step, throughput and peak memory of a
policy on a profiled machine. Formulas: docs/cost_model.md.

Everything is computed on numpy arrays of candidate policies at once (the search evaluates
hundreds of thousands); `predict()` is the one-policy view of the same code. Layers of identical
shape are grouped (a transformer is a few layer types repeated), so the cost of a candidate does
not grow with the number of layers.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

from ..memory.packed_matmul import MAX_ROWS as PACKED_MM_ROWS, config_fits, layout_fits
from ..memory.placement import TIERS, assign_by_size, split_counts
from ..models.base import packs
from ..policy import Policy
from .memory_model import (MemoryEstimate, _layers, _packed_bytes, estimate_memory, graph_pool_bytes,
                           intermediate_elems)

GiB = 1 << 30

# Host time of a stage (layer) per GPU batch = the aten operations its forward issues (counted
# once per model: optimizer/op_count.py) x the host cost of one operation (the profile's
# `host_op_s`: dispatch, launch and the Python around it). For a profile that predates the
# measurement, the cost per operation is that of P4 (OPT-6.7B all on GPU, 8 x 1, H200,
# benchmarks/RESULTS.md: 22-26 ms per decode step, host-bound) over the operations of its decode
# step, counted the same way (REFERENCE_MODEL).
REFERENCE_DECODE_STEP_S = 0.024        # P4 on the H200
REFERENCE_CPU_STAGE_S = 0.15e-3        # a CPU-only decode stage of OPT, per GPU batch (session 1)
REFERENCE_MODEL = ("facebook/opt-6.7b", "opt")
# Share of the profile's best matmul rate that a prefill step reaches (layer norms, activations,
# attention and smaller shapes around the matmuls): 0.70-0.79 over eight policies on OPT-6.7B/13B/
# 30B, H100, benchmarks/RESULTS.md (2026-11-26, session 2).
PREFILL_EFFICIENCY = 0.75
GQA_CPU_SLOWDOWN_REP4 = 0.333 / 0.143   # see Rates.gqa_slowdown4
# Host cost of an operation on the compressed cache's paths (quantise, write the packed parts,
# unpack) over that of an operation in a layer's forward: the Python around them (packed
# dataclasses, per-part writes) is heavier. Profiles may carry it measured (`cache_op_s`);
# otherwise this ratio, fitted with the operations counted as the engine issued them then
# (check_cost_model.py --engine-before) on four host-bound runs of two machines: V6 (OPT-13B,
# 4-bit cache all on the GPU, 32 x 2, H100, sessions 2 and 3: +8% / +18% with it), P3x (H100,
# -12%), N4 (H200, session 4: -1%); L3A (+2%) was not in the fit.
CACHE_OP_RATIO = 1.8
# A decode step replayed from CUDA graphs (engine/graphs.py) has no host work to speak of, but its
# small kernels still run one after another between the big GEMMs: seconds per counted operation
# of a replayed step, added to its traffic and FLOPs. Fitted on P4 (OPT-6.7B, batch 8, all on the
# GPU, H200, 2026-12-02 session 7, benchmarks/cuda_graph_check.py): 5.78 ms a step for 1,225
# counted operations (the Triton decode attention counted as one), 3.78 ms of it traffic; the same
# constant gives V1 (batch 32) 7.40 ms for 7.47 measured and LLaMA-3-8B batch 8 6.33 for 6.20.
GRAPH_OP_S = (5.78e-3 - 3.78e-3) / 1225

# Used when no profile is given and none is cached: H100 figures from ../shared/DESIGN.md
# (copies, fp16 matmul, CPU matmul). HBM bandwidth, disk and CPU attention/dequantisation rates are
# not in DESIGN.md: nominal values, marked below.
DEFAULT_PROFILE = {
    "version": 1,
    "source": "default: H100 figures from DESIGN.md (no profile measured on this machine)",
    "gpu": {"name": "NVIDIA H100 80GB (DESIGN.md)", "mem_bytes": 80 * 10 ** 9,
            "h2d_pinned_gib_s": 51.5, "h2d_pageable_gib_s": 9.0,
            "d2h_pinned_gib_s": 51.4, "d2h_pageable_gib_s": 14.0,
            "mem_bw_gib_s": 3000.0,          # nominal (H100 SXM HBM3 ~3.35 TB/s)
            "fp16_tflops": {"8192x8192x8192": 755.0}, "fp16_tflops_best": 755.0,
            "dequant_gelem_s": 150.0},       # nominal
    "cpu": {"cores": 16, "threads": [16], "matmul_gflops": {"16": 1200.0},
            "attention_gib_s": {"16": 20.0},  # nominal
            "dequant_gelem_s": {"16": 10.0},  # nominal
            "mem_bw_gib_s": 40.0},            # nominal
    "disk": {"read_gib_s": 2.0, "write_gib_s": 1.5, "direct_io": True},  # nominal NVMe
}


@dataclass
class Workload:
    prompt_len: int
    gen_len: int
    num_prompts: int | None = None   # None: one block of the policy


@dataclass
class Prediction:
    prefill_s: float          # one block
    decode_step_s: float      # one block, mean over the decode steps
    total_s: float            # all blocks: prefill + (gen_len - 1) decode steps each
    throughput: float         # generated tokens / total_s (FlexGen's definition)
    memory: MemoryEstimate


def _best(d, threads: int | None = None) -> float:
    """A rate measured by thread count: the best one, or with `threads` given, the best one
    measured at a thread count not above it (the CPU work runs on that many threads, and a
    kernel is not slower on more threads than on fewer; single measurements per count are noisy:
    one lent H200 host's CPU attention ran 28.5 GiB/s at 4 threads, 19.9 at 8, 32.4 at 16, and the
    engine's at 15 threads matched the 4-thread figure, session 10)."""
    if isinstance(d, dict):
        if not d:
            return 0.0
        if threads is not None:
            below = [v for t, v in d.items() if int(t) <= threads]
            return max(below) if below else d[min(d, key=int)]
        return max(d.values())
    return float(d or 0.0)


class Rates:
    """The profile's figures in bytes/s, FLOP/s, elements/s for the compute device. cpu_threads:
    the torch thread count of the run (CPU attention and dequantisation rates at that count);
    None: the best measured."""

    def __init__(self, profile: dict, cpu_threads: int | None = None):
        g, c, d = profile.get("gpu"), profile["cpu"], profile["disk"]
        self.is_cuda = g is not None
        self.disk_read = d["read_gib_s"] * GiB
        self.disk_write = d["write_gib_s"] * GiB
        self.cpu_attn = _best(c.get("attention_gib_s"), cpu_threads) * GiB
        self.cpu_dequant = _best(c.get("dequant_gelem_s"), cpu_threads) * 1e9
        # CPU attention over a packed cache, K and V values per second (None: a profile that
        # predates it; the fp16 read plus the generic unpacking rate stand in)
        packed = c.get("packed_attention_gelem_s")
        self.cpu_packed_attn = _best(packed, cpu_threads) * 1e9 if packed else None
        # CPU attention with grouped-query attention: rep query heads per KV head make the kernel's
        # score matrices rep rows tall (softmax and the fp32 scores grow with rep, the cache bytes
        # do not). In the engine it costs more than the profile's microbenchmark at rep = 4
        # (`attention_rep4_gib_s`) shows: N10 (LLaMA-3-8B, 32 x 2) took 0.333 s of CPU attention
        # a step where the rep-1 rate gives 0.143 s (H200, session 4), and 0.29-0.33 s where it
        # gives 0.14 (three machines, session 10, weights streamed or resident), while those
        # profiles measured rep 4 at 1.0-1.1x rep 1. So the slowdown is the larger of the two.
        rep4 = c.get("attention_rep4_gib_s")
        profiled = self.cpu_attn / (_best(rep4, cpu_threads) * GiB) if rep4 and self.cpu_attn else 1.0
        self.gqa_slowdown4 = max(profiled, GQA_CPU_SLOWDOWN_REP4)
        # K/V rows written into a freshly allocated CPU cache: page faults set the rate (nominal
        # 8 GiB/s when the profile predates the measurement)
        self.fresh_write = c.get("fresh_write_gib_s", 8.0) * GiB
        if g:
            self.h2d_pinned = g["h2d_pinned_gib_s"] * GiB
            self.h2d_pageable = g["h2d_pageable_gib_s"] * GiB
            self.d2h = g["d2h_pinned_gib_s"] * GiB
            self.dev_bw = g["mem_bw_gib_s"] * GiB
            self.flops = g.get("fp16_tflops_best", _best(g.get("fp16_tflops"))) * 1e12
            self.dequant = g["dequant_gelem_s"] * 1e9
            # weights grouped along dim 1 (the CLI's default) where the profile measured that layout
            self.dequant_dim1 = g.get("dequant_dim1_gelem_s", g["dequant_gelem_s"]) * 1e9
            # packed bytes per second that F.linear over 4-bit weights reads at decode's row
            # counts (None where the profile predates it or had no kernel: weights unpack)
            self.packed_mm = (g.get("packed_matmul_gib_s") or 0) * GiB or None
            self.host_op = g.get("host_op_s") or reference_host_op_s(True)
            self.cache_op = g.get("cache_op_s") or CACHE_OP_RATIO * self.host_op
        else:  # the CPU is the compute device: its memory is the "gpu" and the "cpu" tier
            self.h2d_pinned = self.h2d_pageable = self.d2h = math.inf
            self.dev_bw = c.get("mem_bw_gib_s", 20.0) * GiB
            self.flops = _best(c.get("matmul_gflops")) * 1e9
            self.dequant = self.dequant_dim1 = self.cpu_dequant
            self.packed_mm = None   # the kernel runs on the GPU only
            self.host_op = c.get("host_op_s") or reference_host_op_s(False)
            self.cache_op = c.get("cache_op_s") or CACHE_OP_RATIO * self.host_op

    def gqa_factor(self, rep: int) -> float:
        """CPU attention time at rep query heads per KV head over its time at rep = 1 (linear in
        rep through the rep = 4 measurement)."""
        return 1.0 + (max(rep, 1) - 1) / 3.0 * (self.gqa_slowdown4 - 1.0)


_REFERENCE = {}


def reference_host_op_s(is_cuda: bool) -> float:
    """Host seconds per aten operation for a profile without `host_op_s`: the reference
    measurement over the reference model's counted operations (see REFERENCE_DECODE_STEP_S)."""
    if "ops" not in _REFERENCE:
        from ..models.registry import resolve_model
        family = resolve_model(*REFERENCE_MODEL).family
        ops = host_ops(family)
        _REFERENCE["ops"] = sum(n * c for (n, _), c in zip(_layer_types(family), ops["decode"])) + ops["decode_once"]
        _REFERENCE["stages"] = sum(n for n, _ in _layer_types(family))
    if is_cuda:
        return REFERENCE_DECODE_STEP_S / _REFERENCE["ops"]
    return REFERENCE_CPU_STAGE_S * _REFERENCE["stages"] / _REFERENCE["ops"]


def host_ops(family) -> dict:
    """Aten operations per layer type (aligned with _layer_types) of a decode step (`decode`) and
    a prefill (`prefill`) for one GPU batch, and those issued once per step and GPU batch
    (`decode_once`, `prefill_once`); `decode_graph` and `decode_graph_once` for a decode step as a
    CUDA graph records it (the Triton decode attention); counted once per family object
    (op_count.py). A layer whose forward cannot be counted (data-dependent routing) gets the mean
    of this model's counted layers."""
    cached = getattr(family, "_host_ops", None)
    if cached is not None:
        return cached
    from ..engine.triton_decode import for_graphs
    from .op_count import count_layer_ops
    layers = [layer for _, layer in _layer_types(family)]
    out = {}
    for phase, seq in (("decode", 1), ("prefill", 16), ("decode_graph", 1)):
        with for_graphs() if phase == "decode_graph" else contextlib.nullcontext():
            counts, once = count_layer_ops(layers, seq)
        out[phase], out[phase + "_once"] = counts, once
    known = [(n, c) for (n, _), c in zip(_layer_types(family), out["decode"]) if c is not None]
    if any(c is None for c in out["decode"] + out["prefill"] + out["decode_graph"]):
        mean = sum(n * c for n, c in known) / max(1, sum(n for n, _ in known))
        for phase in ("decode", "prefill", "decode_graph"):
            out[phase] = [mean if c is None else c for c in out[phase]]
    family._host_ops = out
    return out


def model_decode_ops(family, policy: Policy, is_cuda: bool) -> float:
    """The operations the model counts for one eager decode step of this policy: every layer's
    forward and a compressed cache's host work, per GPU batch (evaluate's host term, as a count)."""
    ops = host_ops(family)
    types = _layer_types(family)
    per_batch = sum(n * c for (n, _), c in zip(types, ops["decode"])) + ops["decode_once"]
    if policy.compress_cache:
        for n, layer in types:
            if layer.kind == "attention":
                co = cache_host_ops(layer.kv_heads, layer.head_dim, policy.comp_cache_config)
                counts = split_counts(layer.kv_heads, policy.percents("cache"))
                per_batch += n * float(compressed_cache_step_ops(co, counts, policy.cpu_cache_compute, is_cuda,
                                                                 prefill=False))
    return policy.num_gpu_batches * per_batch


def cache_host_ops(kv_heads: int, head_dim: int, config) -> dict:
    """A compressed cache's host operations per layer and GPU batch (op_count.py), by shape."""
    from .op_count import count_compressed_cache_ops
    key = (kv_heads, head_dim, config.num_bits, config.group_size, config.symmetric)
    if key not in _CACHE_OPS:
        _CACHE_OPS[key] = count_compressed_cache_ops(kv_heads, head_dim, config)
    return _CACHE_OPS[key]


_CACHE_OPS = {}


def compressed_cache_step_ops(co: dict, counts, on_cpu, is_cuda: bool, prefill: bool):
    """A compressed cache's host operations per layer and GPU batch, from cache_host_ops' counts
    `co`: quantise the new K/V rows once, write each segment's packed parts, and in a decode step
    unpack each segment that attention reads on the device. counts: the layer's heads on (device,
    cpu, disk); on_cpu: CPU attention reads the CPU heads in place (bool or array of them)."""
    hg, hc, hdk = counts
    ops = co["write"] + co["write_segment"] * sum(1 for x in counts if x)
    if not prefill:
        reads = (hg > 0) + np.where(on_cpu, 0, hc > 0) + (hdk > 0)
        ops = ops + reads * co["unpack_fused" if is_cuda else "unpack"]
    return ops


def graph_eligible(grid) -> np.ndarray:
    """Candidates whose decode step could replay a captured CUDA graph: weights, cache and
    activations all on the GPU (packed or not), no CPU attention (engine/graphs.ineligible says
    the same of a runner)."""
    allg = lambda opts, idx: np.array([o == (100, 0) for o in opts])[idx]  # noqa: E731
    return (allg(grid.w_opts, grid.wi) & allg(grid.c_opts, grid.ci) & allg(grid.a_opts, grid.ai)
            & (grid.ccc == 0))


# ------------------------------------------------------------------------------ per-layer tables
def _layer_key(layer):
    """What makes two layers the same type for the model: kind, weight shapes, heads."""
    return layer.kind, tuple(w.shape for w in layer.weights), layer.kv_heads, layer.head_dim


def _layer_types(family):
    """[(count, LayerSpec)] for each distinct layer (kind, shapes, heads), in first-seen order."""
    groups = {}
    for layer in _layers(family):
        key = _layer_key(layer)
        if key in groups:
            groups[key][0] += 1
        else:
            groups[key] = [1, layer]
    return [(n, l) for n, l in groups.values()]


def _successors(family) -> list[dict]:
    """For each layer type (_layer_types' order), the types of the layers that follow its layers,
    as {type: share of its layers} (the last layer is followed by the first: the next step). Each
    type's next load is the share-weighted mean, so that a step counts every layer's weights once:
    LLaMA's last MLP is followed by the head, the others by attention."""
    keys = [_layer_key(layer) for layer in _layers(family)]
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    follow = [dict() for _ in index]
    for a, b in zip(keys, keys[1:] + keys[:1]):
        f = follow[index[a]]
        f[index[b]] = f.get(index[b], 0) + 1
    return [{b: c / sum(f.values()) for b, c in f.items()} for f in follow]


def _weight_table(family, pct, compress, itemsize, cfg):
    """Per layer type, the numbers of one layer under weight percentages `pct` (as estimate_memory
    places them): bytes resident per tier, bytes moved per use from cpu / disk, the unpacked copy
    (the working set), elements dequantised per use, bytes read by its matmuls, FLOPs per token.

    Routed experts (WeightSpec.share < 1) move and unpack whole, but a token runs only its share
    of their FLOPs, and a GPU batch reads only the experts its tokens chose: `routed` maps a share
    to the bytes of the weights with that share (see _matmul_read)."""
    rows = []
    for n, layer in _layer_types(family):
        tier_b = dict.fromkeys(TIERS, 0)
        move = dict.fromkeys(TIERS, 0)
        stage = deq = read = flops = cpu_max = 0
        fused = dict(read=0, packed=0, deq=0)   # matrices a decode step's F.linear reads packed
        routed = {}
        sizes = [math.prod(w.shape) for w in layer.weights]
        for spec, size, tier in zip(layer.weights, sizes, assign_by_size(sizes, pct)):
            packed = compress and packs(layer, spec)
            nbytes = _packed_bytes(spec.shape, cfg) if packed else size * itemsize
            tier_b[tier] += nbytes
            move[tier] += nbytes
            if tier == "cpu":
                cpu_max = max(cpu_max, nbytes)
            if tier != "gpu" or packed:
                stage += size * itemsize
            deq += size if packed else 0
            if len(spec.shape) == 2 and layer.kind != "embed":
                if packed and spec.share == 1 and layout_fits(spec.shape, cfg):
                    fused["read"] += size * itemsize
                    fused["packed"] += nbytes
                    fused["deq"] += size
                if spec.share < 1:
                    routed[spec.share] = routed.get(spec.share, 0) + size * itemsize
                else:
                    read += size * itemsize
                flops += 2 * size * spec.share
        rows.append(dict(n=n, kind=layer.kind, tiers=tier_b, cpu=move["cpu"], cpu_max=cpu_max, disk=move["disk"],
                         stage=stage,
                         deq=deq, read=read, routed=routed, flops=flops, kv=layer.kv_heads, hd=layer.head_dim,
                         fused=fused))
    return rows


def _matmul_read(row, ntok):
    """Bytes a layer's matmuls read for one GPU batch of ntok tokens: every dense weight, and of
    the routed experts the expected share that at least one token chose, 1 - (1 - share)^ntok
    (tokens routed independently)."""
    return row["read"] + sum(b * (1 - (1 - share) ** ntok) for share, b in row["routed"].items())


@dataclass
class Grid:
    """Candidate policies as parallel arrays (one entry per candidate)."""
    w_opts: list            # [(gpu%, cpu%)] weight placements
    c_opts: list            # [(gpu%, cpu%)] cache placements
    a_opts: list            # [(gpu%, cpu%)] activation placements
    wi: np.ndarray
    ci: np.ndarray
    ai: np.ndarray
    gbs: np.ndarray
    ngb: np.ndarray
    cw: np.ndarray          # compress weights (0/1)
    cc: np.ndarray          # compress cache (0/1)
    ccc: np.ndarray         # cpu_cache_compute (0/1)
    pin_weight: bool = True
    overlap: bool = True
    base: Policy | None = None   # compression configs and other fields are taken from here

    def __len__(self):
        return len(self.wi)

    def subset(self, keep) -> "Grid":
        import dataclasses
        arrays = {f: getattr(self, f)[keep] for f in ("wi", "ci", "ai", "gbs", "ngb", "cw", "cc", "ccc")}
        return dataclasses.replace(self, **arrays)

    def policy(self, i) -> Policy:
        base = self.base or Policy(1, 1, 100, 0, 100, 0, 100, 0)
        (wg, wc), (cg, cc), (ag, ac) = self.w_opts[self.wi[i]], self.c_opts[self.ci[i]], self.a_opts[self.ai[i]]
        return base.replace(gpu_batch_size=int(self.gbs[i]), num_gpu_batches=int(self.ngb[i]),
                            w_gpu_percent=wg, w_cpu_percent=wc, cache_gpu_percent=cg, cache_cpu_percent=cc,
                            act_gpu_percent=ag, act_cpu_percent=ac, compress_weight=bool(self.cw[i]),
                            compress_cache=bool(self.cc[i]), cpu_cache_compute=bool(self.ccc[i]),
                            pin_weight=self.pin_weight, overlap=self.overlap)

    @classmethod
    def of_policy(cls, p: Policy) -> "Grid":
        one = lambda v: np.array([int(v)])  # noqa: E731
        return cls([p.percents("weight")[:2]], [p.percents("cache")[:2]], [p.percents("act")[:2]],
                   one(0), one(0), one(0), one(p.gpu_batch_size), one(p.num_gpu_batches),
                   one(p.compress_weight), one(p.compress_cache), one(p.cpu_cache_compute),
                   p.pin_weight, p.overlap, p)


def _tables(family, grid: Grid, prompt_len, gen_len, itemsize):
    base = grid.base or Policy(1, 1, 100, 0, 100, 0, 100, 0)
    wcfg = base.comp_weight_config
    import dataclasses
    ccfg = dataclasses.replace(base.comp_cache_config, group_dim=3)   # as LayerCache stores it
    W = {(wi, c): _weight_table(family, grid.w_opts[wi] + (100 - sum(grid.w_opts[wi]),), bool(c), itemsize, wcfg)
         for wi in np.unique(grid.wi) for c in np.unique(grid.cw)}
    types = _layer_types(family)
    attn = [(n, l) for n, l in types if l.kind == "attention"]
    seq = prompt_len + gen_len
    # cache per sequence of the block, per tier, in bytes (estimate_memory's sum, linear in gbs x ngb)
    C = {}
    for ci in np.unique(grid.ci):
        pct = grid.c_opts[ci] + (100 - sum(grid.c_opts[ci]),)
        for c in np.unique(grid.cc):
            per_tier, heads_t = [0, 0, 0], []
            for n, l in attn:
                counts = split_counts(l.kv_heads, pct)
                heads_t.append((n, l.head_dim, counts))
                for t, h in enumerate(counts):
                    if h:
                        nb = _packed_bytes((seq, 1, h, l.head_dim), ccfg) if c else seq * h * l.head_dim * itemsize
                        per_tier[t] += n * 2 * nb
            C[(ci, c)] = (per_tier, heads_t)
    one_cache = max((2 * seq * l.kv_heads * l.head_dim * itemsize for _, l in attn), default=0)
    # bytes per cached element (one position, one head-dim value) when packed / not
    rowb = {0: itemsize, 1: _packed_bytes((1, 1, 1, 64 * 16), ccfg) / (64 * 16)}
    return W, C, attn, one_cache, rowb, ccfg


def evaluate(family, grid: Grid, workload: Workload, profile: dict, is_cuda: bool | None = None,
             memory_only: bool = False, cpu_threads: int | None = None, graph_op_s: float | None = None,
             engine=None):
    """Predicted memory (per tier, bytes) and times (seconds) of every candidate in the grid.
    Returns a dict of arrays: gpu, pinned, pageable, disk, prefill, decode_step, total, throughput.
    graph_op_s: the host seconds per operation of a decode step that replays a captured CUDA graph,
    applied to the candidates that graph_eligible() accepts (None: every decode step is eager).
    engine: an engine_ops.EngineExtra, the engine's scheduling operations of an eager decode step
    (a one-policy grid; None: only the per-layer forwards and the compressed cache are counted)."""
    rates = Rates(profile, cpu_threads)
    is_cuda = rates.is_cuda if is_cuda is None else is_cuda
    itemsize = 2 if is_cuda else 4
    P, G = workload.prompt_len, workload.gen_len
    info = family.info()
    H, V = info.hidden_size, info.vocab_size
    W, C, attn, one_cache_1, rowb, ccfg = _tables(family, grid, P, G, itemsize)
    gbs = grid.gbs.astype(np.float64)
    ngb = grid.ngb.astype(np.float64)
    n = len(grid)
    z = lambda: np.zeros(n)  # noqa: E731

    # ---- memory (exactly estimate_memory's accounting, vectorised)
    mem = {k: z() for k in ("gpu", "pinned", "pageable", "disk")}
    host_key = "pinned" if is_cuda and grid.pin_weight else "pageable"

    staged = "pinned" if is_cuda else "pageable"

    def add(tier_idx, nbytes, host=host_key, pageable_where=None):
        """host: where CPU-tier bytes count; pageable_where: candidates whose bytes are pageable."""
        if tier_idx == 0:
            mem["gpu" if is_cuda else "pageable"] += nbytes
        elif tier_idx == 1 and pageable_where is not None:
            mem[host] += np.where(pageable_where, 0.0, nbytes)
            mem["pageable"] += np.where(pageable_where, nbytes, 0.0)
        elif tier_idx == 1:
            mem[host] += nbytes
        else:
            mem["disk"] += nbytes

    stage_max = z()
    w_arr = {}
    for (wi, c), rows in W.items():
        m = (grid.wi == wi) & (grid.cw == c)
        if not m.any():
            continue
        for t, tier in enumerate(TIERS):
            add(t, np.where(m, sum(r["n"] * r["tiers"][tier] for r in rows), 0.0))
        stage_max[m] = max(r["stage"] for r in rows)
        w_arr[(wi, c)] = m
    cache_heads = {}
    for (ci, c), (per_tier, heads_t) in C.items():
        m = (grid.ci == ci) & (grid.cc == c)
        for t in range(3):
            add(t, np.where(m, per_tier[t] * gbs * ngb, 0.0), staged, pageable_where=grid.ccc.astype(bool))
        cache_heads[(ci, c)] = (m, heads_t)
    act_n = np.zeros((n, 3))
    for ai, (ag, ac) in enumerate(grid.a_opts):
        for g in np.unique(grid.gbs):
            m = (grid.ai == ai) & (grid.gbs == g)
            if m.any():
                act_n[m] = split_counts(int(g), (ag, ac, 100 - ag - ac))
    for t in range(3):
        add(t, ngb * P * H * itemsize * act_n[:, t], staged)
    c_gpu = np.array([c[0] for c in grid.c_opts])[grid.ci]
    c_disk = np.array([100 - sum(c) for c in grid.c_opts])[grid.ci]
    w_disk = np.array([100 - sum(w) for w in grid.w_opts])[grid.wi]
    a_disk = np.array([100 - sum(a) for a in grid.a_opts])[grid.ai]
    one_cache = one_cache_1 * gbs
    w_gpu = np.array([w[0] for w in grid.w_opts])[grid.wi]
    work = np.where(w_gpu == 100, 1, 2) * stage_max + np.where(c_gpu < 100, 2 * one_cache, 0.0)
    work += gbs * P * intermediate_elems(_layers(family), H) * itemsize + gbs * V * 4 * 2
    if is_cuda:   # memory_model.graph_pool_bytes, per capturable candidate
        base = grid.base or Policy(1, 1, 100, 0, 100, 0, 100, 0)
        unpacked_w = (grid.cw == 1) & (not config_fits(base.comp_weight_config))
        work = work + np.where(graph_eligible(grid), graph_pool_bytes(one_cache, stage_max, grid.cc == 1, unpacked_w), 0.0)
    add(0, work)
    if is_cuda:
        mem["pinned"] += np.where((c_disk > 0) | (w_disk > 0) | (a_disk > 0),
                                  2 * np.maximum(stage_max, one_cache), 0.0)
        # memory_model.cpu_attention_relay: one layer's prompt rows of the CPU-tier heads
        for (ci, c_), (_, heads_t) in C.items():
            per_seq = max((_packed_bytes((P, 1, cnt[1], hd), ccfg) if c_ else P * cnt[1] * hd * itemsize)
                          for _, hd, cnt in heads_t) if heads_t else 0
            m = (grid.ci == ci) & (grid.cc == c_) & grid.ccc.astype(bool)
            mem["pinned"] += np.where(m, per_seq * gbs, 0.0)

    if memory_only:
        return mem

    # ---- time: per layer type, one prefill step and one decode step at the mean context
    h2d_w = rates.h2d_pinned if grid.pin_weight else rates.h2d_pageable
    ccc = grid.ccc.astype(bool)
    act_frac = act_n / np.maximum(gbs, 1)[:, None]
    act_off = (act_frac[:, 1] + act_frac[:, 2]) > 0
    ops = host_ops(family)
    cache_ops = {id(l): cache_host_ops(l.kv_heads, l.head_dim, ccfg) for _, l in attn}
    first_attn = next((i for i, (_, l) in enumerate(_layer_types(family)) if l.kind == "attention"), 0)
    # routed experts are never captured (engine/graphs.py: their shapes depend on the data)
    moe = any(layer.kind == "moe" for layer in _layers(family))
    graph = graph_eligible(grid) if graph_op_s is not None and not moe else np.zeros(n, dtype=bool)
    succ = _successors(family)
    w_dequant = rates.dequant_dim1 if (grid.base and grid.base.comp_weight_config.group_dim % 2 == 1) else rates.dequant

    def step_time(tokens: int, ctx_mean: float, prefill: bool):
        total = z()
        phase = "prefill" if prefill else "decode"
        op_s = rates.host_op if prefill else np.where(graph, graph_op_s or 0.0, rates.host_op)
        for (wi, c), m in w_arr.items():
            rows = W[(wi, c)]
            ai = 0
            op = op_s[m] if isinstance(op_s, np.ndarray) else op_s
            parts = []
            for ri, r in enumerate(rows):
                # host: this layer's operations, and once per step those kept in the step context
                def layer_ops(key):
                    return ops[key][ri] + (ops[key + "_once"] / r["n"] if ri == first_attn else 0.0)
                n_ops = layer_ops(phase)
                if not prefill:   # a replayed step's operations are those its graph recorded
                    n_ops = np.where(graph[m], layer_ops("decode_graph"), n_ops)
                g = gbs[m]
                k = ngb[m]
                host = k * n_ops * op
                if engine is not None and not prefill and r["kind"] == "attention":
                    # the engine's scheduling, counted per layer (all its GPU batches) and step
                    extra = engine.per_layer + (engine.per_step / r["n"] if ri == first_attn else 0.0)
                    host = host + np.where(graph[m], 0.0, extra * op)
                # weights: once per stage; from cpu over PCIe, from disk through a pinned relay
                w_h2d = r["cpu"] / h2d_w + r["disk"] / rates.h2d_pinned
                w_disk = r["disk"] / rates.disk_read
                h2d = np.zeros_like(g)   # this stage's cache traffic, per GPU batch summed
                disk = np.zeros_like(g)
                d2h = np.zeros_like(g)
                cpu_t = np.zeros_like(g)
                ntok = g if r["kind"] == "head" else g * tokens   # the head sees one position per sequence
                flops = rates.flops * (PREFILL_EFFICIENCY if prefill else 1.0)
                mm = np.maximum(ntok * r["flops"] / flops, _matmul_read(r, ntok) / rates.dev_bw)
                dev = k * mm + r["deq"] / w_dequant
                fz = r["fused"]
                if not prefill and fz["packed"] and rates.packed_mm:
                    # decode: F.linear reads those matrices packed (memory/packed_matmul.py) at the
                    # profiled rate instead of unpacking them; up to its row limit, in a replayed
                    # step or for one GPU batch (the engine's choice: schedule.py)
                    read_f = (_matmul_read(r, ntok) - fz["read"]) / rates.dev_bw + fz["packed"] / rates.packed_mm
                    dev_f = k * np.maximum(ntok * r["flops"] / flops, read_f) + (r["deq"] - fz["deq"]) / w_dequant
                    dev = np.where((ntok <= PACKED_MM_ROWS) & ((k == 1) | graph[m]), dev_f, dev)
                if r["kind"] == "attention":
                    hidx = ai
                    ai += 1
                    for (ci, cc_), (cm, heads_t) in cache_heads.items():
                        mm2 = cm[m]
                        if not mm2.any():
                            continue
                        _, hd, counts = heads_t[hidx]
                        l_kv = max(1, attn[hidx][1].kv_heads)
                        el = 2 * hd * g[mm2]   # cached K+V elements per position per head, whole GPU batch
                        rb = rowb[int(cc_)]
                        hg, hc, hdk = counts
                        on_cpu = ccc[m][mm2] & ~prefill
                        replay = graph[m][mm2] & (not prefill)
                        if cc_:   # a compressed cache's host work per GPU batch (op_count.py); none replayed
                            cache_host = compressed_cache_step_ops(cache_ops[id(attn[hidx][1])], counts,
                                                                   on_cpu, is_cuda, prefill)
                            host[np.flatnonzero(mm2)] += np.where(replay, 0.0, k[mm2] * cache_host * rates.cache_op)
                        if prefill:   # the prompt's K/V stored to their tiers, attention on the device
                            dev_a = 2 * 2 * g[mm2] * tokens * tokens / 2 * info.num_heads * hd / flops
                            st = el * tokens * rb
                            # with CPU attention the CPU heads' rows go out from the compute
                            # thread (relay, then into the fresh heads-major store): in series
                            ccc_p = ccc[m][mm2]
                            d2h_a = k[mm2] * st * (np.where(ccc_p, 0, hc) + hdk) / rates.d2h
                            disk_a = k[mm2] * st * hdk / rates.disk_write
                            h2d_a = 0.0
                            cpu_a = np.where(ccc_p, k[mm2] * st * hc * (1 / rates.d2h + 1 / rates.fresh_write), 0.0)
                        else:         # read the whole cache: on the device, over PCIe, or on the CPU
                            # a replayed step unpacks a packed cache's whole capacity (graphs.py)
                            ctx = np.where(replay, P + G, ctx_mean) if cc_ else ctx_mean
                            resident = el * ctx * hg
                            moved = el * ctx * (np.where(on_cpu, 0, hc) + hdk)
                            deq = (el * ctx * (hg + np.where(on_cpu, 0, hc) + hdk)) if cc_ else 0.0
                            # packed rows are unpacked once into the buffer attention reads, by
                            # the row kernel (groups along the head dim)
                            dev_a = k[mm2] * ((resident + moved) * itemsize / rates.dev_bw + deq / rates.dequant_dim1)
                            h2d_a = k[mm2] * moved * rb / rates.h2d_pinned
                            disk_a = k[mm2] * (el * ctx * hdk * rb / rates.disk_read + el * hdk * rb / rates.disk_write)
                            d2h_a = k[mm2] * el * (hc + hdk) * rb / rates.d2h
                            if cc_ and rates.cpu_packed_attn:
                                cpu_read = el * ctx * hc / rates.cpu_packed_attn
                            else:
                                cpu_read = el * ctx * hc * 2 / rates.cpu_attn + (el * ctx * hc / rates.cpu_dequant if cc_ else 0)
                            cpu_a = np.where(on_cpu, k[mm2] * cpu_read * rates.gqa_factor(info.num_heads // l_kv), 0.0)
                            if is_cuda:
                                # each GPU batch's attention output goes back host-to-device behind
                                # the next stage's weight copy in flight, on average half the
                                # largest one: N10 (weights streamed) spent 0.12 s a step more outside
                                # its CPU attention than with the weights resident (session 10)
                                nxt = max(rows[b]["cpu_max"] for b in succ[ri])
                                cpu_a = cpu_a + np.where(on_cpu, k[mm2] * 0.5 * nxt / h2d_w, 0.0)
                        idx = np.flatnonzero(mm2)
                        dev[idx] += dev_a
                        h2d[idx] += h2d_a
                        d2h[idx] += d2h_a
                        disk[idx] += disk_a
                        cpu_t[idx] += cpu_a
                # activations kept off the device: out and back in, per GPU batch, in order on the
                # compute stream (engine/schedule.ActivationStore), so in series with compute: the
                # LLaMA-3-70B-shaped run of issue 12 (64 x 16 sequences, activations on the CPU)
                # spent 52 s of its 183 s prefill moving 512 MB hidden states out and back
                hid = ntok / np.maximum(g, 1) * H * itemsize   # per sequence
                af = act_frac[m]
                act_t = k * g * hid * ((af[:, 1] + af[:, 2]) * (1 / rates.h2d_pinned + 1 / rates.d2h) +
                                       af[:, 2] * (1 / rates.disk_read + 1 / rates.disk_write))
                # a replayed graph's small kernels run between the big ones, not beside them
                replayed = graph[m] if not prefill else False
                compute = np.where(replayed, dev + host, np.maximum(dev, host)) + cpu_t + act_t
                parts.append((w_h2d, w_disk, h2d, d2h, disk, compute))
            # With overlap the next stage's weights load while this stage computes (and its GPU
            # batches' caches load one batch ahead, within the stage): a stage lasts as long as
            # the longest of its compute, its store stream, and the load stream's next weights +
            # its own cache. Pairing a stage's compute with its own weights instead over-counts
            # models whose stages alternate between bound by host work (attention) and bound by
            # transfers (the MLP): N2, LLaMA-3-8B weights on CPU, 16 x 8.
            # Activations kept off the device come back host-to-device on the compute stream,
            # behind whatever the load stream has in flight on the same copy engine: compute then
            # waits for the stage's loads instead of overlapping them. Measured: N3 (cache and
            # activations on the CPU) and N6 (weights and activations on the CPU) exceed the
            # overlapped sum by about their compute time; N9 (activations on the CPU, nothing
            # loaded) does not (benchmarks/RESULTS.md, session 4).
            serial = act_off[m]
            for ri, r in enumerate(rows):
                w_h2d, w_disk, h2d, d2h, disk, compute = parts[ri]
                if grid.overlap:
                    nw_h2d = sum(share * parts[b][0] for b, share in succ[ri].items())
                    nw_disk = sum(share * parts[b][1] for b, share in succ[ri].items())
                    loads = nw_h2d + h2d
                    t = np.maximum.reduce([np.where(serial, loads + compute, np.maximum(loads, compute)), d2h,
                                           nw_disk + disk])
                else:
                    t = w_h2d + h2d + d2h + w_disk + disk + compute
                total[m] += r["n"] * t
        return total

    prefill = step_time(P, P, True)
    decode = step_time(1, P + G / 2.0, False) if G > 1 else z()
    block = gbs * ngb
    prompts = block if workload.num_prompts is None else np.full(n, float(workload.num_prompts))
    blocks = np.ceil(prompts / block)
    total = blocks * (prefill + (G - 1) * decode)
    return dict(mem, prefill=prefill, decode_step=decode, total=total, throughput=prompts * G / total)


def predict(family, workload: Workload, policy: Policy, profile: dict, is_cuda: bool | None = None,
            cpu_threads: int | None = None, graph_op_s: float | None = None,
            count_on: str | None = None) -> Prediction:
    """One policy's predicted times, throughput and peak memory (memory_model.estimate_memory).
    count_on: a device to count the engine's own scheduling operations on (engine_ops.py: a
    miniature of the model runs there), normally the run's; None: not counted."""
    cuda = Rates(profile).is_cuda if is_cuda is None else is_cuda
    engine = None
    if count_on is not None:
        from .engine_ops import engine_extra
        engine = engine_extra(family, policy, count_on, cuda)
    r = evaluate(family, Grid.of_policy(policy), workload, profile, is_cuda, cpu_threads=cpu_threads,
                 graph_op_s=graph_op_s, engine=engine)
    est = estimate_memory(family, policy, workload.prompt_len, workload.gen_len, cuda)
    return Prediction(float(r["prefill"][0]), float(r["decode_step"][0]), float(r["total"][0]),
                      float(r["throughput"][0]), est)
