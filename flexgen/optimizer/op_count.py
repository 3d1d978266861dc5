"""How many operations each layer's forward issues: the host work that bounds small-batch decoding.

A decode step at small batch is host-bound: every aten operation costs the host its dispatch and,
for most, a kernel launch, whatever its size. The count depends on the family (LLaMA's RMSNorm,
rotary angles and SwiGLU issue more than OPT's LayerNorm and ReLU), so it is measured, not assumed:
each distinct layer of the model runs its LayerSpec forward once on meta tensors (no memory, no
compute) under a TorchDispatchMode that counts what reaches the backend, with an attend that does
what the engine's decode attention does for an uncompressed resident cache (write the new rows,
attend over the past). The engine stays family-blind: it is only the LayerSpec forwards that run.

The compressed cache's extra host work is counted the same way, from the engine's own functions:
quantising a step's new K/V rows (memory.compression.compress over K and V stacked), writing the
packed parts of each segment, and unpacking a packed segment for attention.
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..models.base import StepContext

LAST_NAMES: list = []   # count_layer_ops's last pass: operators counted per layer
_B, _PAST = 2, 8     # the count does not depend on sizes; small ones keep shape checks cheap


class _Counter(TorchDispatchMode):
    active = []   # the counters in use, innermost last

    def __init__(self):
        super().__init__()
        self.n = 0
        self.paused = False
        self.names = Counter()   # what was counted, by operator (a test shows it when counts differ)

    def __enter__(self):
        _Counter.active.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _Counter.active.pop()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.n += 1
            self.names[str(func)] += 1
        return func(*args, **(kwargs or {}))


# Functions an accelerator runs as one kernel that meta tensors (and the CPU) decompose into
# their math: counted once where they are called (models/llama.rms_norm takes F.rms_norm off the CPU)
_ONE_KERNEL = (F.rms_norm,)


class _OneKernel(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        outer = _Counter.active[-1] if _Counter.active else None
        if func not in _ONE_KERNEL or outer is None or outer.paused:
            return func(*args, **(kwargs or {}))
        outer.paused = True
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            outer.paused = False
        outer.n += 1
        return out


_PREFILL_CORE = {}


def _prefill_core_on_cpu(q, k, v, scale, window):
    """The attention core of a prefill on meta tensors, counted as a real backend issues it: on
    meta, scaled_dot_product_attention decomposes into its math (~25 operations) where CPU and
    CUDA run one fused kernel. The count comes from the same call on small CPU tensors of the
    same shapes (memoised), the result is a meta tensor; nothing of it is counted twice."""
    from ..engine.attention import attend as core
    outer = _Counter.active[-1] if _Counter.active else None
    if outer is not None:
        outer.paused = True
    try:
        key = (tuple(q.shape), tuple(k.shape), q.dtype, window)
        if key not in _PREFILL_CORE:
            qc, kc, vc = (torch.zeros(x.shape, dtype=x.dtype) for x in (q, k, v))
            valid = torch.ones(k.shape[:2], dtype=torch.bool)
            inner = _Counter()
            with inner:
                core(qc, kc, vc, valid, scale, window=window)
            _PREFILL_CORE[key] = inner.n
        out = core(q, k, v, torch.ones(k.shape[:2], dtype=torch.bool, device="meta"), scale, window=window)
    finally:
        if outer is not None:
            outer.paused = False
    if outer is not None:
        outer.n += _PREFILL_CORE[key]
    return out


def _weights(layer, device, dtype):
    return {w.key: torch.randn(w.shape, dtype=dtype, device=device) * 0.02 if device != "meta"
            else torch.empty(w.shape, dtype=dtype, device=device) for w in layer.weights}


def _attend_like_the_engine(seq: int, device="meta"):
    """ctx.attend for counting: the engine's uncompressed resident path (two row writes, then the
    attention core over past + new positions)."""
    from ..engine.attention import attend as core

    def attend(q, k, v, scale, window=None):
        b, s, kv, d = k.shape
        total = _PAST + s if s == 1 else s
        store = [torch.zeros((total, b, kv, d), dtype=k.dtype, device=device) for _ in range(2)]
        store[0][total - s:].copy_(k.transpose(0, 1))
        store[1][total - s:].copy_(v.transpose(0, 1))
        if s > 1 and device == "meta":
            return _prefill_core_on_cpu(q, k, v, scale, window)
        valid = torch.ones((b, total), dtype=torch.bool, device=device)
        if s > 1:
            return core(q, k, v, valid, scale, window=window)
        ks, vs = (x.permute(1, 0, 2, 3) for x in store)
        return core(q, ks, vs, valid, scale, invalid=~valid, window=window)
    return attend


def count_layer_ops(layers, seq: int = 1, device="meta", dtype=torch.float16,
                    fused_as_one: bool = True) -> tuple[list[int | None], int]:
    """(per layer, once per step): aten operations of one forward of each layer in `layers` for
    one GPU batch at `seq` new positions (1: a decode step), and the operations a step issues once
    for all its layers (values a family computes in the first layer and keeps in the shared step
    context, like rotary angles). The layers run in order as the engine runs them: once to warm
    what a family keeps across steps, then twice with one shared context: the last pass is the
    per-layer count, its difference to the one before the once-per-step count. None for a layer whose forward cannot run on meta tensors (data-dependent control flow,
    e.g. a mixture of experts' routing). device / dtype: where the tensors live (meta: no
    memory, no compute; a real device gives the same count, tests check it). fused_as_one=False
    counts what reaches the backend also inside _ONE_KERNEL functions (a GPU test: they are one)."""
    def new_ctx():
        return StepContext(input_ids=torch.zeros((_B, seq), dtype=torch.long, device=device),
                           positions=torch.arange(seq, device=device).repeat(_B, 1),
                           attend=_attend_like_the_engine(seq, device))
    passes, names = [], []
    # a first step fills what a family keeps across steps (tables moved to the device once), then
    # a step's first pass (with its once-per-step values) and a second pass in the same context
    for ctx in (new_ctx(),) + (new_ctx(),) * 2:
        counts, hidden = [], None
        for layer in layers:
            w = _weights(layer, device, dtype)
            h = hidden
            if layer.kind != "embed" and h is None:
                width = next((x.shape[-1] for x in layer.weights if len(x.shape) == 2), 1)
                h = torch.zeros((_B, seq, width), dtype=dtype, device=device)
            if layer.kind == "head" and h is not None:
                h = h[:, -1:]
            mode = _Counter()
            try:
                with mode, (_OneKernel() if fused_as_one else contextlib.nullcontext()):
                    out = layer.forward(w, h, ctx)
            except Exception:   # data-dependent ops (.item(), .tolist()) have no meta value
                counts.append(None)
                continue
            counts.append(mode.n)
            names.append(mode.names)
            if layer.kind != "head" and isinstance(out, torch.Tensor):
                hidden = out
        passes.append(counts)
    _, first, steady = passes
    LAST_NAMES[:] = names[-len(steady):]
    once = sum(a - b for a, b in zip(first, steady) if a is not None and b is not None)
    return steady, once


def count_compressed_cache_ops_before(kv_heads: int, head_dim: int, config) -> dict:
    """count_compressed_cache_ops for the engine before its fused write (runs recorded until
    2026-12-02): each segment quantised K and V apart (the plain sequence, compression.
    _compress_reference, on a slice of the rows) and each read unpacked the past rows, then
    concatenated the new row. For checking the model against those runs only."""
    import dataclasses

    from ..memory.compression import _compress_reference, decompress, packed_shapes
    cfg = dataclasses.replace(config, group_dim=3)
    row = torch.empty((1, _B, kv_heads, head_dim), dtype=torch.float16, device="meta")
    shapes = [s for s in packed_shapes((_PAST + 1, _B, kv_heads, head_dim), cfg) if s is not None]
    stores = [torch.empty(s, dtype=torch.uint8 if i == 0 else torch.float16, device="meta")
              for i, s in enumerate(shapes)]
    mode = _Counter()
    with mode:
        for _ in range(2):
            parts = _compress_reference(row[:, :, 0:kv_heads], cfg).parts()
            for st, t in zip(stores, parts):
                st[_PAST:_PAST + 1].copy_(t)
    write_segment = mode.n
    mode = _Counter()
    with mode:
        for _ in range(2):
            past = decompress(_past_rows(stores, kv_heads, head_dim, cfg), torch.float16)
            torch.cat([past, row.to(past.device, past.dtype)], dim=0)
    unpack = mode.n
    unpack_fused = 2 * (len(stores) + 1 + 1 + 1)   # views, output, launch, the concatenation
    return {"write": 0, "write_segment": write_segment, "unpack": unpack, "unpack_fused": unpack_fused}


def _past_rows(stores, kv_heads, head_dim, cfg):
    """The packed past rows of a cache store (views of its parts), as the engine reads them."""
    from ..memory.compression import Packed
    views = [st[:_PAST] for st in stores]
    return Packed(views[0], views[1], views[2] if len(views) == 3 else None, (_PAST, _B, kv_heads, head_dim), cfg)


def count_compressed_cache_ops(kv_heads: int, head_dim: int, config) -> dict:
    """Host operations of a compressed cache per layer and GPU batch of a decode step: `write`,
    quantising the new K/V rows (one call, K and V stacked; engine/kv_cache.new_rows);
    `write_segment`, writing one segment's packed parts of K and V; `unpack`, unpacking one
    segment's past rows of K and V into a buffer with room for the new row (torch path; the CUDA
    path unpacks a cache through one fused kernel, counted by `unpack_fused`)."""
    import dataclasses

    from ..memory.compression import compress, packed_shapes
    from ..memory.placement import Deferred
    cfg = dataclasses.replace(config, group_dim=3)
    rows = [torch.empty((1, _B, kv_heads, head_dim), dtype=torch.float16, device="meta") for _ in range(2)]
    mode = _Counter()
    with mode:
        parts = compress(torch.stack(rows), dataclasses.replace(cfg, group_dim=4)).parts()
    write = mode.n
    shapes = [s for s in packed_shapes((_PAST + 1, _B, kv_heads, head_dim), cfg) if s is not None]
    stores = [torch.empty(s, dtype=t.dtype, device="meta") for s, t in zip(shapes, parts)]
    mode = _Counter()
    with mode:
        for kv in range(2):
            for st, t in zip(stores, parts):
                st[_PAST:_PAST + 1].copy_(t[kv][:, :, 0:kv_heads])
    write_segment = mode.n
    mode = _Counter()
    with mode:
        for _ in range(2):
            Deferred(_past_rows(stores, kv_heads, head_dim, cfg), torch.float16).value_with(rows[0])
    unpack = mode.n
    # the fused path: per K and V, the row views, one output buffer, one launch, the new row's copy
    unpack_fused = 2 * (len(stores) + 1 + 1 + 2)
    return {"write": write, "write_segment": write_segment, "unpack": unpack, "unpack_fused": unpack_fused}
