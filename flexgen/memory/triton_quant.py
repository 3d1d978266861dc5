"""Fused packing (quantisation) of groups along the last dim on the GPU (Triton): one pass reads
each group, takes its min and max, and writes its packed bytes, fp16 scale and minimum.

compression.compress() takes it for a contiguous tensor grouped along its last dim without
padding (the KV cache's new rows: K and V stacked, or each when contiguous): its PyTorch sequence
is ~10 full passes (aminmax, sub, div, round, clamp, pairing, cast, copies), 0.15 s of OPT-30B's
0.9 s prefill of 16 x 512 tokens on the H200 (benchmarks/RESULTS.md, session 13). The bytes are
those of the PyTorch path: min and max are exact, the divisions are IEEE (div_rn), rounding is
half to even as torch.round. The kernel is checked against the PyTorch path once per process
(input dtype and bits) before it is trusted; a mismatch falls back, with a warning.
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

_STATE = {"checked": set(), "ok": set()}   # (dtype, bits) checked against the PyTorch path; those that agreed
_BLOCK_BYTES = 4096   # input bytes a program reads: whole groups

if triton is not None:
    @triton.jit
    def _pack_rows_kernel(x_ptr, data_ptr, scale_ptr, min_ptr, n_groups, GS: tl.constexpr, BITS: tl.constexpr,
                          BLOCK_G: tl.constexpr):
        # x: n_groups groups of GS values back to back
        levels: tl.constexpr = (1 << BITS) - 1
        g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
        gmask = g < n_groups
        j = tl.arange(0, GS)
        x = tl.load(x_ptr + g[:, None] * GS + j[None, :], mask=gmask[:, None], other=0.0)
        lo = tl.min(x, axis=1)
        hi = tl.max(x, axis=1)
        m16 = lo.to(tl.float16)
        mn = m16.to(tl.float32)
        s16 = tl.math.div_rn(hi.to(tl.float32) - mn, levels * 1.0).to(tl.float16)
        scale = tl.maximum(s16.to(tl.float32), 1e-8)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x.to(tl.float32) - mn[:, None], scale[:, None]), 0.0), levels * 1.0)
        # round half to even, as torch.round: adding 1.5 * 2^23 leaves no fraction bits in fp32
        # (exact for 0 <= q <= 255; clamping first gives what rounding first does)
        q = ((q + 12582912.0) - 12582912.0).to(tl.int32)
        if BITS == 4:   # low nibble first
            even, odd = tl.split(tl.reshape(q, (BLOCK_G, GS // 2, 2)))
            k = tl.arange(0, GS // 2)
            tl.store(data_ptr + g[:, None] * (GS // 2) + k[None, :], (even + odd * 16).to(tl.uint8),
                     mask=gmask[:, None])
        else:
            tl.store(data_ptr + g[:, None] * GS + j[None, :], q.to(tl.uint8), mask=gmask[:, None])
        tl.store(scale_ptr + g, s16, mask=gmask)
        tl.store(min_ptr + g, m16, mask=gmask)


def usable(x: torch.Tensor, cfg) -> bool:
    """A contiguous float tensor grouped along its last dim without padding, asymmetric 4 or 8 bits,
    power-of-two groups, on the GPU (or under Triton's interpreter)."""
    gs = cfg.group_size
    return (triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
            and x.dim() >= 1 and cfg.group_dim % x.dim() == x.dim() - 1 and not cfg.symmetric
            and cfg.num_bits in (4, 8) and gs & (gs - 1) == 0 and x.shape[-1] % gs == 0 and x.numel() > 0
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.is_contiguous()
            and x.numel() < 2 ** 31)   # the kernel's offsets are 32-bit


def _launch(x: torch.Tensor, cfg):
    gs, bits = cfg.group_size, cfg.num_bits
    lead = tuple(x.shape[:-1]) + (x.shape[-1] // gs,)
    n_groups = x.numel() // gs
    data = torch.empty(lead + (gs * bits // 8,), dtype=torch.uint8, device=x.device)
    scale = torch.empty(lead + (1,), dtype=torch.float16, device=x.device)
    mn = torch.empty(lead + (1,), dtype=torch.float16, device=x.device)
    block_g = max(1, _BLOCK_BYTES // (gs * x.element_size()))
    _pack_rows_kernel[(triton.cdiv(n_groups, block_g),)](x, data, scale, mn, n_groups, GS=gs, BITS=bits,
                                                        BLOCK_G=block_g)
    return data, scale, mn


def pack(x: torch.Tensor, cfg, reference):
    """(data, scale, min) of x by the kernel, or by `reference(x, cfg)` (the PyTorch path, which
    also checks the kernel the first time a dtype and width run) when it is not trusted."""
    key = (x.dtype, cfg.num_bits)
    if key not in _STATE["checked"]:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return reference(x, cfg)   # the check synchronises: never inside a CUDA graph capture
        _STATE["checked"].add(key)
        want = reference(x, cfg)
        try:
            got = _launch(x, cfg)
        except Exception as e:  # a Triton or driver problem must not stop a run
            warnings.warn(f"fused packing kernel unavailable ({type(e).__name__}: {e}); using PyTorch ops")
            return want
        if all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, want)):
            _STATE["ok"].add(key)
        else:
            warnings.warn(f"fused packing kernel ({x.dtype}, {cfg.num_bits} bits) disagrees with the "
                          "PyTorch path; using PyTorch ops")
        return want
    return _launch(x, cfg) if key in _STATE["ok"] else reference(x, cfg)
