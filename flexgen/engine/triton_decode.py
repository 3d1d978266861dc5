"""Decode attention on the GPU in one pass over the cache (Triton, split along the positions).

A decode step's attention reads every cached K and V row once; as plain PyTorch it is five kernels
(scale, scores matmul, mask, softmax, output matmul) whose matmuls see a (d, S) operand strided by
the whole cache row, and on the H200 they reach ~1.8 TB/s of the ~4 TB/s the weights' GEMMs do
(P4: ~1.2 ms of a 6.2 ms step). Here each program reads a range of positions of one sequence's KV
group once, for all the group's query heads (grouped-query attention reads the cache once), keeps
an online softmax in float32, and a second kernel merges the ranges: two kernels, the cache read
at streaming speed whatever its strides (the CUDA-graph path attends over (capacity, b, kv, d)
rows in place).

It serves CUDA-graph decode steps only (inside `for_graphs()`, engine/graphs.py): a replay pays
nothing per launch, while an eager step would pay Triton's Python launcher (~78 us a call on the
H200, more than the matmul path's five operators) and, in its first step, a JIT compile of several
seconds (measured 2026-12-03: N9's first decode step 5.6 s against 0.32). Eager steps, and the cost
model's operation count on meta tensors, take the PyTorch path.

It is one operator (`flexgen::decode_attention`) with a meta implementation (tests count it on
meta tensors inside `for_graphs()`). The PyTorch path stays the reference:
the kernel is checked against it once per process before it is trusted (a mismatch or a Triton
failure falls back, with a warning); tests run it under Triton's CPU interpreter.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path serves
    triton = None

_STATE = {"checked": False, "ok": triton is not None, "graphs": False}
BLOCK_S = 32         # positions per iteration: measured on the H200 (benchmarks/decode_attention_bench.py)
_ROWS = 16           # query rows of a program, padded: tl.dot wants at least 16
_PROGRAMS = 528      # ~4 per SM of an H100/H200: enough ranges to keep every SM reading
_WARPS = 4

if triton is not None:
    @triton.jit
    def _ranges_kernel(q_ptr, k_ptr, v_ptr, inv_ptr, acc_ptr, m_ptr, l_ptr, S, G, scale,
                       sqb, sqh, skb, sks, skg, svb, svs, svg, sib,
                       REP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK: tl.constexpr, PER_SPLIT: tl.constexpr, SPLITS: tl.constexpr):
        bg = tl.program_id(0)
        split = tl.program_id(1)
        b = bg // G
        g = bg % G
        r = tl.arange(0, ROWS)
        d = tl.arange(0, DP)
        dmask = d < D
        q = tl.load(q_ptr + b * sqb + (g * REP + r[:, None]) * sqh + d[None, :],
                    mask=(r[:, None] < REP) & dmask[None, :], other=0.0)
        m = tl.full((ROWS,), -1.0e38, tl.float32)   # finite: a range of padding only leaves weights 0
        l = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, DP), tl.float32)
        for j in range(PER_SPLIT):
            s = (split * PER_SPLIT + j) * BLOCK + tl.arange(0, BLOCK)
            smask = s < S
            kv_mask = smask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + b * skb + s[:, None] * sks + g * skg + d[None, :], mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale                       # (ROWS, BLOCK), float32
            bad = tl.load(inv_ptr + b * sib + s, mask=smask, other=1)
            scores = tl.where((bad == 0)[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + b * svb + s[:, None] * svs + g * svg + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        row = (bg * SPLITS + split) * ROWS + r
        tl.store(m_ptr + row, m)
        tl.store(l_ptr + row, l)
        tl.store(acc_ptr + row[:, None] * DP + d[None, :], acc)

    @triton.jit
    def _merge_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, G, sob, soh,
                      REP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, ROWS: tl.constexpr,
                      SPLITS: tl.constexpr):
        bg = tl.program_id(0)
        b = bg // G
        g = bg % G
        r = tl.arange(0, ROWS)
        d = tl.arange(0, DP)
        top = tl.full((ROWS,), -1.0e38, tl.float32)
        for s in range(SPLITS):
            top = tl.maximum(top, tl.load(m_ptr + (bg * SPLITS + s) * ROWS + r))
        total = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, DP), tl.float32)
        for s in range(SPLITS):
            row = (bg * SPLITS + s) * ROWS + r
            w = tl.exp(tl.load(m_ptr + row) - top)
            total += w * tl.load(l_ptr + row)
            acc += w[:, None] * tl.load(acc_ptr + row[:, None] * DP + d[None, :])
        out = acc / total[:, None]
        tl.store(out_ptr + b * sob + (g * REP + r[:, None]) * soh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(r[:, None] < REP) & (d[None, :] < D))


def _splits(bg: int, blocks: int) -> tuple[int, int]:
    """(ranges per sequence group, blocks per range): enough programs to fill the GPU."""
    want = max(1, min(blocks, -(-_PROGRAMS // bg)))
    per = -(-blocks // want)
    return -(-blocks // per), per


def _launch(q, k, v, invalid, scale):
    b, _, heads, d = q.shape
    S, g = k.shape[1], k.shape[2]
    rep = heads // g
    if rep > _ROWS:
        raise ValueError(f"{rep} query heads per KV head: more than the kernel's {_ROWS} rows")
    dp = max(16, triton.next_power_of_2(d))   # tl.dot's inner dimension: at least 16
    splits, per = _splits(b * g, triton.cdiv(S, BLOCK_S))
    dev = q.device
    acc = torch.empty((b * g * splits * _ROWS, dp), dtype=torch.float32, device=dev)
    m = torch.empty(b * g * splits * _ROWS, dtype=torch.float32, device=dev)
    l = torch.empty_like(m)
    out = torch.empty((b, 1, heads, d), dtype=q.dtype, device=dev)
    q3 = q[:, 0]
    inv = invalid.view(torch.uint8) if invalid.dtype == torch.bool else invalid
    _ranges_kernel[(b * g, splits)](
        q3, k, v, inv, acc, m, l, S, g, float(scale),
        q3.stride(0), q3.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        inv.stride(0), REP=rep, D=d, DP=dp, ROWS=_ROWS, BLOCK=BLOCK_S, PER_SPLIT=per, SPLITS=splits,
        num_warps=_WARPS)
    _merge_kernel[(b * g,)](acc, m, l, out, g, out.stride(0), out.stride(2),
                            REP=rep, D=d, DP=dp, ROWS=_ROWS, SPLITS=splits)
    return out


@torch.library.custom_op("flexgen::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, invalid: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q (b, 1, heads, d); k, v (b, S, kv_heads, d), any strides with d contiguous; invalid (b, S)
    True at padding. Returns (b, 1, heads, d) in q's dtype."""
    return _launch(q, k, v, invalid, scale)


@decode_attention.register_fake
def _(q, k, v, invalid, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@contextlib.contextmanager
def for_graphs():
    """Decode attention inside runs the kernel: a CUDA-graph step's warm-up and its capture."""
    before = _STATE["graphs"]
    _STATE["graphs"] = True
    try:
        yield
    finally:
        _STATE["graphs"] = before


def usable(q, k, v) -> bool:
    """The kernel serves this call: inside `for_graphs()`, Triton present, not found wrong in this
    process, a GPU (or meta tensors; or the interpreter in tests), and layouts it reads."""
    dev = q.device.type
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return (_STATE["ok"] and _STATE["graphs"] and (dev in ("cuda", "meta") or interpret) and q.shape[1] == 1
            and k.stride(-1) == 1 and v.stride(-1) == 1 and q.stride(-1) == 1
            and q.shape[2] // k.shape[2] <= _ROWS and os.environ.get("FLEXGEN_TRITON_DECODE", "1") != "0")


def attend(q, k, v, invalid, scale, reference):
    """The kernel's answer; `reference(q, k, v, invalid, scale)` is the PyTorch path that checks
    it the first time it runs on real tensors (and serves from then on if they disagree)."""
    if not _STATE["checked"] and q.device.type != "meta":
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            return reference(q, k, v, invalid, scale)   # a check syncs: not inside a graph capture
        _STATE["checked"] = True
        try:
            got = decode_attention(q, k, v, invalid, float(scale))
            want = reference(q, k, v, invalid, scale)
            # float32 softmax and accumulation against the reference's half precision ones
            _STATE["ok"] = bool(torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2))
            if not _STATE["ok"]:
                warnings.warn("Triton decode attention disagrees with the reference; using PyTorch ops")
        except Exception as e:  # a Triton or driver problem must not stop a run
            _STATE["ok"] = False
            warnings.warn(f"Triton decode attention unavailable ({type(e).__name__}: {e}); using PyTorch ops")
        return got if _STATE["ok"] else want
    return decode_attention(q, k, v, invalid, float(scale))
