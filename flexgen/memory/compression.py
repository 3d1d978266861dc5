"""Group-wise quantisation (FlexGen's 4-bit compression, and 8-bit): pack and unpack.

A tensor is cut into groups of `group_size` consecutive values along `group_dim` (padded at the
end of that dim). Asymmetric: per group min and scale = (max - min) / (2^bits - 1), value =
min + q * scale. Symmetric: scale = max|x| / (2^(bits-1) - 1), value = (q - 2^(bits-1)) * scale.
4-bit values are packed two per byte. The packed form is (data uint8, scale fp16, min fp16) with
the groups on the last axis, so the first dims keep their meaning (rows of a KV cache stay rows).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..policy import CompressionConfig


@dataclass
class Packed:
    data: torch.Tensor          # (..., groups, group_size * bits / 8) uint8
    scale: torch.Tensor         # (..., groups, 1) fp16
    mn: torch.Tensor | None     # (..., groups, 1) fp16; None when symmetric
    shape: tuple                # the original shape
    config: CompressionConfig

    def parts(self):
        return [t for t in (self.data, self.scale, self.mn) if t is not None]

    def with_parts(self, parts) -> "Packed":
        mn = parts[2] if self.mn is not None else None
        return Packed(parts[0], parts[1], mn, self.shape, self.config)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts())


def packed_shapes(shape, cfg: CompressionConfig):
    """Shapes of (data, scale, min) for a tensor of `shape` (group dim moved last)."""
    dim = cfg.group_dim % len(shape)
    rest = [s for i, s in enumerate(shape) if i != dim]
    groups = -(-shape[dim] // cfg.group_size)
    per_byte = 8 // cfg.num_bits
    data = tuple(rest) + (groups, cfg.group_size // per_byte)
    meta = tuple(rest) + (groups, 1)
    return data, meta, (None if cfg.symmetric else meta)


def check_config(cfg: CompressionConfig):
    if cfg.num_bits not in (4, 8):
        raise ValueError(f"num_bits must be 4 or 8, got {cfg.num_bits}")
    if cfg.group_size < 2 or cfg.group_size % 2:
        raise ValueError(f"group_size must be an even number >= 2, got {cfg.group_size}")


def _grouped(x: torch.Tensor, cfg: CompressionConfig):
    dim = cfg.group_dim % x.dim()
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    pad = (-n) % cfg.group_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, cfg.group_size)


def compress(x: torch.Tensor, cfg: CompressionConfig) -> Packed:
    """Quantise x (any float dtype) on its own device.

    Few kernels, because the KV cache quantises its new rows at every layer of every decode step
    (host time per launch, not bandwidth, is what that costs): one min/max pass, in-place
    arithmetic, and the two 4-bit values of a byte packed by one add. The bytes are exactly those
    of the plain sequence (`_compress_reference`): min and max of float16/bfloat16/float32 values
    are exact in any of them, and the stored fp16 scale and minimum are the rounded values the
    quantisation used (a scale clamped to 1e-8 is 0 in fp16 either way)."""
    from . import triton_quant
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        x = x.float()   # min/max after the cast, as the reference takes them
    if triton_quant.usable(x, cfg):   # one fused pass on the GPU, the same bytes
        data, scale, mn = triton_quant.pack(x, cfg, _pack_torch)
    else:
        data, scale, mn = _pack_torch(x, cfg)
    return Packed(data, scale, mn, tuple(x.shape), cfg)


def _pack_torch(x: torch.Tensor, cfg: CompressionConfig):
    """compress()'s (data, scale, min) by PyTorch ops."""
    g = _grouped(x, cfg)
    levels = (1 << cfg.num_bits) - 1
    if cfg.symmetric:
        half = 1 << (cfg.num_bits - 1)
        s16 = g.abs().amax(-1, keepdim=True).float().div_(half - 1).to(torch.float16)
        scale = s16.float().clamp_min_(1e-8)
        q = torch.div(g, scale).round_().add_(half).clamp_(0, levels)   # a new float32 tensor: g may view x
        m16 = None
    else:
        lo, hi = torch.aminmax(g, dim=-1, keepdim=True)
        m16 = lo.to(torch.float16)
        mn = m16.float()
        s16 = hi.float().sub_(mn).div_(levels).to(torch.float16)
        scale = s16.float().clamp_min_(1e-8)
        q = torch.sub(g, mn).div_(scale).round_().clamp_(0, levels)   # float32 (g promoted)
    if cfg.num_bits == 4:   # low nibble first; q holds whole numbers 0..15, so the sum is exact
        q = q[..., 0::2].add(q[..., 1::2], alpha=16)
    # contiguous: elementwise results keep the layout of a grouped view (groups along dim 0)
    return q.to(torch.uint8).contiguous(), s16.contiguous(), None if m16 is None else m16.contiguous()


def _compress_reference(x: torch.Tensor, cfg: CompressionConfig) -> Packed:
    """The plain quantisation sequence that compress() must match byte for byte (tests)."""
    g = _grouped(x.float(), cfg)
    levels = (1 << cfg.num_bits) - 1
    if cfg.symmetric:
        half = 1 << (cfg.num_bits - 1)
        scale = g.abs().amax(-1, keepdim=True) / (half - 1)
        scale = scale.to(torch.float16).float().clamp_min(1e-8)
        q = (torch.round(g / scale) + half).clamp(0, levels)
        mn = None
    else:
        mn = g.amin(-1, keepdim=True).to(torch.float16).float()
        scale = ((g.amax(-1, keepdim=True) - mn) / levels).to(torch.float16).float().clamp_min(1e-8)
        q = torch.round((g - mn) / scale).clamp(0, levels)
    q = q.to(torch.uint8)
    if cfg.num_bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return Packed(q.contiguous(), scale.to(torch.float16), None if mn is None else mn.to(torch.float16),
                  tuple(x.shape), cfg)


def decompress(p: Packed, dtype=None, shape=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The values back, in `dtype`, on the device of p.data. `shape` overrides the leading dims
    (a row slice of a packed KV cache). Weight matrices on the GPU go through one fused kernel.
    out: a contiguous tensor of that shape and dtype to unpack into (the first rows of a buffer
    that has room for more: the KV cache's new rows follow without a second copy); returned."""
    from . import triton_dequant
    dtype = dtype or torch.float16
    shape = tuple(p.shape if shape is None else shape)
    if out is not None and (tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"decompress out= must be a contiguous {dtype} tensor of shape {shape}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    if triton_dequant.usable(p, shape):
        return triton_dequant.unpack(p, dtype, shape, _decompress_torch, out)
    flat = _as_matrix(p, shape)   # a KV cache (groups along its last dim) is a matrix of rows
    if flat is not None and triton_dequant.usable(*flat):
        res = triton_dequant.unpack(flat[0], dtype, flat[1], _decompress_torch,
                                    None if out is None else out.view(flat[1]))
        return res.view(shape) if out is None else out
    return _decompress_torch(p, dtype, shape, out)


def _as_matrix(p: Packed, shape):
    """(Packed, shape) of a tensor grouped along its last dim seen as a 2-D (rows, last dim) matrix
    grouped along dim 1, or None."""
    if len(shape) <= 2 or p.config.group_dim % len(shape) != len(shape) - 1:
        return None
    rows, n = math.prod(shape[:-1]), shape[-1]
    if any(not t.is_contiguous() for t in p.parts()):
        return None
    # A cache row is one head's d values (64 packed bytes at d = 128): the row kernel's tiles
    # would be mostly masked (150 G values/s on the H200 for OPT-30B's cache, session 12). Rows
    # without padding are whole groups back to back, so f consecutive rows are one row of f * n
    # values with the same groups: merge them into rows of up to 4096 values.
    f = 1
    if n % p.config.group_size == 0:
        while f * 2 * n <= 4096 and rows % (f * 2) == 0:
            f *= 2
    rows, n = rows // f, n * f
    parts = [t.reshape(rows, -1, t.shape[-1]) for t in p.parts()]
    m = Packed(parts[0], parts[1], parts[2] if p.mn is not None else None, (rows, n),
               dataclasses.replace(p.config, group_dim=1))
    return m, (rows, n)


def _decompress_torch(p: Packed, dtype, shape, out: torch.Tensor | None = None) -> torch.Tensor:
    cfg = p.config
    q = p.data
    if cfg.num_bits == 4:
        q = torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(*q.shape[:-1], q.shape[-1] * 2)
    scale = p.scale.float()
    if cfg.symmetric:
        x = (q.float() - (1 << (cfg.num_bits - 1))) * scale
    else:
        x = q.float() * scale + p.mn.float()
    dim = cfg.group_dim % len(shape)
    moved = [s for i, s in enumerate(shape) if i != dim] + [shape[dim]]
    x = x.reshape(*x.shape[:-2], -1)[..., :shape[dim]].reshape(moved).movedim(-1, dim)
    return x.to(dtype) if out is None else out.copy_(x)   # copy_ rounds as .to does
