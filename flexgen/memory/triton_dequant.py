"""Fused unpacking of a group-wise quantised weight matrix on the GPU (Triton).

One pass: each output value reads its packed byte, its group's scale and minimum, and is written
straight into the (out, in) layout of the weight, whichever dim the groups run along; no float32
intermediate and no transpose copy. Two kernels: groups along the last dim (the CLI's weight
grouping, and a KV cache's rows) take `_unpack_rows_kernel`, which reads each row's bytes in
order; groups along dim 0 (FlexGen's) the generic `_unpack_kernel`. The PyTorch path in
compression.py stays the reference: each kernel is checked against it once per process before it
is trusted (a mismatch falls back, with a warning), and tests run both under Triton's CPU
interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path serves
    triton = None

_STATE = {"checked": set(), "ok": set()}   # kernels checked against the reference; those that agreed
# groups along the last dim take _unpack_rows_kernel with this tile (rows, packed bytes per row);
# benchmarks/dequant_bench.py times the alternatives
_ROWS = {"on": True, "block": (2, 1024)}

if triton is not None:
    @triton.jit
    def _unpack_kernel(data_ptr, scale_ptr, min_ptr, out_ptr, R, N, G, GS: tl.constexpr, BITS: tl.constexpr,
                       SYMMETRIC: tl.constexpr, GROUP_DIM_LAST: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        # R: size of the ungrouped dim; N: size of the grouped dim (unpadded); G groups of GS values
        pid_r = tl.program_id(0)
        pid_n = tl.program_id(1)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        mask = (r < R) & (n < N)
        g = n // GS
        within = n % GS
        per_byte = 8 // BITS
        byte_idx = (r * G + g) * (GS // per_byte) + within // per_byte
        byte = tl.load(data_ptr + byte_idx, mask=mask, other=0).to(tl.int32)
        if BITS == 4:
            q = (byte >> ((within % 2) * 4)) & 0xF
        else:
            q = byte
        scale = tl.load(scale_ptr + r * G + g, mask=mask, other=0.0).to(tl.float32)
        if SYMMETRIC:
            val = (q.to(tl.float32) - (1 << (BITS - 1))) * scale
        else:
            mn = tl.load(min_ptr + r * G + g, mask=mask, other=0.0).to(tl.float32)
            val = q.to(tl.float32) * scale + mn
        if GROUP_DIM_LAST:
            offs = r * N + n
        else:
            offs = n * R + r
        tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _unpack_rows_kernel(data_ptr, scale_ptr, min_ptr, out_ptr, R, N, G, GS: tl.constexpr, BITS: tl.constexpr,
                            SYMMETRIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
        # Groups along the last dim: each row's packed bytes are its values in order, so a tile
        # reads BLOCK_B consecutive bytes per row and, for 4 bits, writes their low and high
        # nibbles interleaved. _unpack_kernel's per-value index arithmetic (n // GS, n % GS, one
        # byte load per value) ran this layout at 78 G values/s on the H200, against 421 along
        # dim 0; this one at ~1,000 (benchmarks/RESULTS.md, session 11).
        pid_r = tl.program_id(0)
        pid_b = tl.program_id(1)
        per_byte: tl.constexpr = 8 // BITS
        row_bytes = G * (GS // per_byte)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)[None, :]
        lmask = (r < R) & (b < row_bytes)
        byte = tl.load(data_ptr + r * row_bytes + b, mask=lmask, other=0).to(tl.int32)
        g = b // (GS // per_byte)
        scale = tl.load(scale_ptr + r * G + g, mask=lmask, other=0.0).to(tl.float32)
        if not SYMMETRIC:
            mn = tl.load(min_ptr + r * G + g, mask=lmask, other=0.0).to(tl.float32)
        if BITS == 4:
            lo = byte & 0xF
            hi = byte >> 4
            if SYMMETRIC:
                v_lo = (lo.to(tl.float32) - 8) * scale
                v_hi = (hi.to(tl.float32) - 8) * scale
            else:
                v_lo = lo.to(tl.float32) * scale + mn
                v_hi = hi.to(tl.float32) * scale + mn
            val = tl.interleave(v_lo, v_hi)
            n = pid_b * (2 * BLOCK_B) + tl.arange(0, 2 * BLOCK_B)[None, :]
        else:
            if SYMMETRIC:
                val = (byte.to(tl.float32) - (1 << (BITS - 1))) * scale
            else:
                val = byte.to(tl.float32) * scale + mn
            n = b
        tl.store(out_ptr + r * N + n, val.to(out_ptr.dtype.element_ty), mask=(r < R) & (n < N))


def _kernel_for(p) -> str:
    cfg = p.config
    return "rows" if cfg.group_dim % 2 == 1 and cfg.num_bits in (4, 8) and _ROWS["on"] else "generic"


def _launch(p, dtype, shape, out=None):
    cfg = p.config
    dim = cfg.group_dim % 2
    R, N = shape[1 - dim], shape[dim]
    G = p.scale.shape[-2]
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=p.data.device)
    mn = p.mn if p.mn is not None else p.scale
    if _kernel_for(p) == "rows":
        br, bb = _ROWS["block"]
        grid = (triton.cdiv(R, br), triton.cdiv(G * cfg.group_size * cfg.num_bits // 8, bb))
        _unpack_rows_kernel[grid](p.data, p.scale, mn, out, R, N, G, GS=cfg.group_size, BITS=cfg.num_bits,
                                  SYMMETRIC=cfg.symmetric, BLOCK_R=br, BLOCK_B=bb)
        return out
    grid = (triton.cdiv(R, 32), triton.cdiv(N, 64))
    _unpack_kernel[grid](p.data, p.scale, mn, out, R, N, G, GS=cfg.group_size, BITS=cfg.num_bits,
                         SYMMETRIC=cfg.symmetric, GROUP_DIM_LAST=dim == 1, BLOCK_R=32, BLOCK_N=64)
    return out


def usable(p, shape) -> bool:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return (triton is not None and len(shape) == 2 and (p.data.is_cuda or interpret)
            and p.data.is_contiguous() and p.scale.is_contiguous())


def unpack(p, dtype, shape, reference, out=None):
    """The matrix unpacked by the kernel (into `out`, a contiguous tensor of that shape, when
    given); `reference(p, dtype, shape)` is the PyTorch path used to check the kernel once and as
    the fallback."""
    kernel = _kernel_for(p)
    if kernel not in _STATE["checked"]:
        _STATE["checked"].add(kernel)
        try:
            got = _launch(p, dtype, shape, out)
            want = reference(p, dtype, shape)
            # equal up to rounding: the kernel may fuse q * scale + min into one FMA
            if got.shape == want.shape and bool(torch.allclose(got.float(), want.float(), rtol=2 ** -10, atol=1e-7)):
                _STATE["ok"].add(kernel)
            else:
                warnings.warn(f"fused dequantisation kernel ({kernel}) disagrees with the reference; "
                              "using PyTorch ops")
        except Exception as e:  # a Triton or driver problem must not stop a run
            warnings.warn(f"fused dequantisation kernel ({kernel}) unavailable ({type(e).__name__}: {e}); "
                          "using PyTorch ops")
        if kernel not in _STATE["ok"]:
            return _into(reference(p, dtype, shape), out)
        return got
    return _launch(p, dtype, shape, out) if kernel in _STATE["ok"] else _into(reference(p, dtype, shape), out)


def _into(x, out):
    return x if out is None else out.copy_(x)
