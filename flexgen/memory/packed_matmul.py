"""F.linear over a 4-bit packed weight without unpacking it first (decode steps, Triton).

A decode step multiplies a few rows of activations (one per sequence of the GPU batch) by every
weight matrix: it is bound by the bytes of the weights it reads. Unpacked first, a 4-bit matrix
costs its packed bytes read, four times as many fp16 bytes written, and those read again by the
matmul: OPT-30B at 4 bits, all on the GPU, spent 42 ms of each decode step on that (16 x 1, H200,
benchmarks/RESULTS.md session 12) for 16.6 GB of packed weights that read in ~4 ms; this kernel
takes 22 ms (fp16 weights with cuBLAS: 16 ms). Here the matmul reads the packed bytes, its
group's scale and minimum, forms each weight exactly as the unpacking kernel does (q * scale +
min in float32, rounded to the activations' dtype) and feeds the tensor cores: the same weights,
only the order of the fp32 sums differs from cuBLAS's.

The families call F.linear(x, w) as always: the engine hands them a PackedMatrix for each packed
matrix on the compute device, whose __torch_function__ takes F.linear with few rows here and
unpacks (once) for anything else, prefill's many rows included (there the matmul is bound by
FLOPs and cuBLAS is the faster one). Like the unpacking kernels, the kernel is checked against
the PyTorch path once per process before it is trusted, and falls back with a warning.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from .placement import Deferred

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: weights are unpacked as before
    triton = None

ENV_VAR = "FLEXGEN_PACKED_MATMUL"
# rows of activations up to which F.linear reads the packed weight (decode: one row per sequence)
MAX_ROWS = 64
_STATE = {"checked": False, "ok": False}
# tile: weight rows, packed bytes per step, num_warps, whether w is tl.dot's first operand
# (benchmarks/packed_matmul_bench.py --tiles times the alternatives)
_TILE = {"block_n": 64, "block_b": 64, "warps": 4, "w_first": True}

if triton is not None:
    @triton.jit
    def _w4_linear_kernel(x_ptr, data_ptr, scale_ptr, min_ptr, y_ptr, M, N, K, G, bytes_per_split,
                          GS: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, W_FIRST: tl.constexpr):
        # y[split, m, n] = sum over this split's k of x[m, k] * w[n, k]. Row n of w is G groups of
        # GS values packed two per byte (low nibble = even k): a step reads BLOCK_B consecutive
        # bytes of each of BLOCK_N rows (whole groups, one scale and minimum each), forms the
        # weights of the low nibbles and of the high ones, and multiplies them by the even and
        # the odd columns of x.
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        HG: tl.constexpr = GS // 2            # bytes per group
        NG: tl.constexpr = BLOCK_B // HG      # groups per step
        row_bytes = G * HG
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n[:, None] < N
        if W_FIRST:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        b0 = pid_s * bytes_per_split
        for step in range(0, bytes_per_split, BLOCK_B):
            b = b0 + step + tl.arange(0, BLOCK_B)
            byte = tl.load(data_ptr + n[:, None] * row_bytes + b[None, :], mask=nmask & (b[None, :] < row_bytes),
                           other=0)
            gi = (b0 + step) // HG + tl.arange(0, NG)
            gmask = nmask & (gi[None, :] < G)
            s = tl.load(scale_ptr + n[:, None] * G + gi[None, :], mask=gmask, other=0.0).to(tl.float32)[:, :, None]
            lo = tl.reshape((byte & 0xF).to(tl.float32), (BLOCK_N, NG, HG))
            hi = tl.reshape((byte >> 4).to(tl.float32), (BLOCK_N, NG, HG))
            if SYMMETRIC:
                w_lo = (lo - 8) * s
                w_hi = (hi - 8) * s
            else:
                mn = tl.load(min_ptr + n[:, None] * G + gi[None, :], mask=gmask, other=0.0).to(tl.float32)[:, :, None]
                w_lo = lo * s + mn
                w_hi = hi * s + mn
            dt = x_ptr.dtype.element_ty
            w_lo = tl.reshape(w_lo, (BLOCK_N, BLOCK_B)).to(dt)
            w_hi = tl.reshape(w_hi, (BLOCK_N, BLOCK_B)).to(dt)
            k = 2 * (b0 + step) + tl.arange(0, 2 * BLOCK_B)
            xt = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
            x_e, x_o = tl.split(tl.reshape(xt, (BLOCK_M, BLOCK_B, 2)))
            if W_FIRST:
                acc += tl.dot(w_lo, tl.trans(x_e))
                acc += tl.dot(w_hi, tl.trans(x_o))
            else:
                acc += tl.dot(x_e, tl.trans(w_lo))
                acc += tl.dot(x_o, tl.trans(w_hi))
        if W_FIRST:
            out = y_ptr + pid_s * M * N + m[None, :] * N + n[:, None]
            tl.store(out, acc, mask=(m[None, :] < M) & (n[:, None] < N))
        else:
            out = y_ptr + pid_s * M * N + m[:, None] * N + n[None, :]
            tl.store(out, acc, mask=(m[:, None] < M) & (n[None, :] < N))


def _launch(x2, p, N, K):
    """x2 (M, K) contiguous fp16/bf16/fp32 times the packed (N, K) matrix p transposed: (M, N) fp32."""
    cfg = p.config
    M = x2.shape[0]
    G = p.scale.shape[-2]
    bn, warps = _TILE["block_n"], _TILE["warps"]
    bb = max(_TILE["block_b"], cfg.group_size // 2)   # whole groups per step
    # all rows in one tile (16 to 64, tl.dot's minimum to MAX_ROWS): each weight byte is read once
    bm = min(64, max(16, triton.next_power_of_2(M)))
    tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
    steps = triton.cdiv(G * cfg.group_size // 2, bb)
    # split K until there are about two programs per multiprocessor (o and fc2 of OPT-30B have
    # only 112 tiles of 64 rows for the H200's 132); partial sums add up outside, deterministically
    sms = torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 4
    split = max(1, min(steps, -(-2 * sms // tiles)))
    per_split = triton.cdiv(steps, split) * bb
    split = triton.cdiv(steps * bb, per_split)
    y = torch.empty((split, M, N), dtype=torch.float32, device=x2.device)
    mn = p.mn if p.mn is not None else p.scale
    _w4_linear_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm), split)](
        x2, p.data, p.scale, mn, y, M, N, K, G, per_split, GS=cfg.group_size, SYMMETRIC=cfg.symmetric,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_B=bb, W_FIRST=_TILE["w_first"], num_warps=warps)
    return y[0] if split == 1 else y.sum(0)


def _fused(x, p, bias):
    N, K = p.shape
    x2 = x.reshape(-1, K).contiguous()
    y = _launch(x2, p, N, K)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def enabled() -> bool:
    flag = os.environ.get(ENV_VAR, "1").strip()
    if flag not in ("", "0", "1"):
        raise ValueError(f"{ENV_VAR} must be 1 (on) or 0 (off), got {flag!r}")
    return flag != "0" and triton is not None


def config_fits(cfg) -> bool:
    """Whether the kernel reads matrices packed with `cfg`: 4 bits, groups of a power of two along
    the input dim (whole groups per step). The cost and memory models ask this too."""
    return (cfg.num_bits == 4 and cfg.group_dim % 2 == 1
            and cfg.group_size >= 4 and cfg.group_size & (cfg.group_size - 1) == 0)


def layout_fits(shape, cfg) -> bool:
    """Whether the kernel reads a matrix of `shape` packed with `cfg`."""
    return len(shape) == 2 and config_fits(cfg)


def fits(p) -> bool:
    """Whether F.linear can read packed matrix p in place (on the GPU, or under the interpreter)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return (layout_fits(p.shape, p.config) and (p.data.is_cuda or interpret)
            and all(t.is_contiguous() for t in p.parts()))


class PackedMatrix:
    """A packed weight matrix on the compute device, as the families' F.linear sees it."""

    def __init__(self, deferred: Deferred):
        self.deferred = deferred
        self._value = None

    @property
    def packed(self):
        return self.deferred.packed

    @property
    def shape(self):
        return torch.Size(self.packed.shape)

    @property
    def dtype(self):
        return self.deferred.dtype

    def __getattr__(self, name):   # any other tensor method or attribute: on the unpacked matrix
        if name.startswith("_") or name in ("deferred",):
            raise AttributeError(name)
        return getattr(self.value(), name)

    def value(self) -> torch.Tensor:
        """The unpacked matrix, unpacked once and kept for the matrix's other uses."""
        if self._value is None:
            self._value = self.deferred.value()
        return self._value

    def linear(self, x, bias=None):
        if x.shape[-1] != self.packed.shape[1] or x.numel() // x.shape[-1] > MAX_ROWS \
                or x.dtype != self.deferred.dtype or not _trusted(x, self, bias):
            return F.linear(x, self.value(), bias)
        return _fused(x, self.packed, bias)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and isinstance(args[1], cls) and not isinstance(args[0], cls):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return args[1].linear(args[0], None if isinstance(bias, cls) else bias)

        def plain(a):
            if isinstance(a, cls):
                return a.value()
            if isinstance(a, (list, tuple)):
                return type(a)(plain(e) for e in a)
            return a
        return func(*plain(tuple(args)), **{k: plain(v) for k, v in kwargs.items()})


def _trusted(x, w, bias) -> bool:
    """Whether the kernel agrees with unpack-then-F.linear (checked on its first call)."""
    if not _STATE["checked"]:
        _STATE["checked"] = True
        try:
            got = _fused(x, w.packed, bias)
            want = F.linear(x.float(), w.value().float(), None if bias is None else bias.float())
            err = (got.float() - want).abs().max().item()
            bound = 2e-2 * want.abs().max().item() + 1e-3   # fp16 inputs, fp32 sums in another order
            _STATE["ok"] = bool(err <= bound)
            if not _STATE["ok"]:
                warnings.warn(f"packed-weight matmul kernel disagrees with unpack + F.linear (max error {err:.3g}); "
                              "unpacking weights instead")
        except Exception as e:  # a Triton or driver problem must not stop a run
            warnings.warn(f"packed-weight matmul kernel unavailable ({type(e).__name__}: {e}); unpacking weights instead")
    return _STATE["ok"]


def for_compute(w, packed: bool = True):
    """What a layer's forward gets for weight w: a PackedMatrix for a packed matrix the kernel can
    read in place (unless `packed` is false), else the values (unpacked when w is Deferred)."""
    if packed and isinstance(w, Deferred) and fits(w.packed) and enabled():
        return PackedMatrix(w)
    return w.value() if isinstance(w, Deferred) else w
