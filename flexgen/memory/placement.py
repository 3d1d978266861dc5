"""Where tensors live: splitting by percentages across the compute device, CPU memory and disk.

Three tiers, in FlexGen's order: "gpu" (the compute device, whatever it is), "cpu" (host memory,
pinned when it feeds a GPU) and "disk" (files under the offload directory).
"""
from __future__ import annotations

import math
import threading

import torch


TIERS = ("gpu", "cpu", "disk")


def split_counts(n: int, percents) -> list[int]:
    """Split n items into three counts proportional to percents (largest remainder rounding)."""
    total = sum(percents)
    exact = [n * p / total if total else 0 for p in percents]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(3), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def assign_by_size(sizes, percents) -> list[str]:
    """FlexGen's rule for one layer's tensors: a tensor goes to the tier in whose percentage band
    the middle of its byte range falls, so a layer's weights are mixed across tiers by size."""
    total = sum(sizes) or 1
    bounds, acc = [], 0.0
    for p in percents:
        acc += p
        bounds.append(acc)
    tiers, cum = [], 0
    for s in sizes:
        mid = (cum + s / 2) / total * 100
        cum += s
        idx = next((i for i, b in enumerate(bounds) if mid < b), 2)
        while percents[idx] == 0:  # never land on an empty tier through rounding at a band edge
            idx = max(i for i in range(3) if percents[i] > 0) if idx > 0 else next(i for i in range(3) if percents[i] > 0)
        tiers.append(TIERS[idx])
    return tiers


class Staging(threading.local):
    """One reusable pinned host buffer per thread, for disk <-> GPU relays.

    Pinning is slow and finite, so each I/O thread keeps one buffer and grows it on demand
    instead of pinning per transfer: the relays hold at most (threads using them) x (the largest
    transfer). `alloc(nbytes, pin)`, shared by every thread's instance, makes the buffer: the
    environment passes its own, which places it on the CPU tier's NUMA nodes and counts its bytes.
    """

    def __init__(self, alloc=None):
        self.buf = None
        self.alloc = alloc

    def get(self, nbytes: int, pin: bool) -> torch.Tensor:
        if self.buf is None or self.buf.numel() < nbytes:
            self.buf = None  # free the smaller buffer before making the larger one
            if self.alloc is not None:
                self.buf = self.alloc(nbytes, pin)
            else:
                self.buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        return self.buf[:nbytes]


class TieredBuffer:
    """A tensor split along `split_dim` into up to three contiguous segments, one per tier.

    Rows (dim 0) can be loaded and stored partially when split_dim > 0 (the KV cache:
    rows are positions, the split is over heads)."""

    def __init__(self, env, shape, dtype, percents=(100, 0, 0), split_dim=0, name="t", pin=True,
                 cpu_rows_inner=False, reuse=False):
        """cpu_rows_inner: the CPU-tier segment is stored with rows inside the split dims, e.g. a KV
        cache segment (positions, batch, heads, d) as (batch, heads, positions, d), and exposed as
        a permuted view of the usual shape; CPU attention then reads each head's positions as one
        contiguous matrix. reuse: the CPU-tier segment takes memory a closed buffer handed back
        (zeroed), and close(recycle=True) hands its own back (env.allocate, env.recycle)."""
        self.env = env
        self.pin = pin
        self.shape = tuple(shape)
        self.dtype = dtype
        self.split_dim = split_dim
        self.segments = []  # (tier, storage, start, end) along split_dim
        counts = split_counts(self.shape[split_dim], percents)
        start = 0
        for tier, count in zip(TIERS, counts):
            if count == 0:
                continue
            seg_shape = list(self.shape)
            seg_shape[split_dim] = count
            if tier == "cpu" and cpu_rows_inner and split_dim > 0:
                stored = seg_shape[1:split_dim + 1] + seg_shape[:1] + seg_shape[split_dim + 1:]
                st = env.allocate(tier, stored, dtype, name=name, pin=pin, reuse=reuse).movedim(split_dim, 0)
            else:
                st = env.allocate(tier, seg_shape, dtype, name=name, pin=pin, reuse=reuse)
            self.segments.append((tier, st, start, start + count))
            start += count

    @property
    def tiers(self):
        return [s[0] for s in self.segments]

    def nbytes_on(self, tier: str) -> int:
        return sum(math.prod(_shape(st)) * _itemsize(self.dtype)
                   for t, st, _, _ in self.segments if t == tier)

    def fill_from(self, src: torch.Tensor):
        """Initialise the whole buffer from a CPU tensor of the full shape."""
        for tier, st, a, b in self.segments:
            part = src.narrow(self.split_dim, a, b - a)
            if tier == "disk":
                st.write(part.contiguous())
            else:
                st.copy_(part)

    def load_joined(self, defer: bool = False) -> torch.Tensor:
        """The whole tensor on the compute device (the stored tensor itself where it lives there)."""
        parts = [self.read_rows(i, st.shape[0]) for i, (_, st, _, _) in enumerate(self.segments)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.split_dim)

    def store(self, src: torch.Tensor, row_start: int = 0):
        """Write src (rows [row_start, row_start + len(src)) of the full split_dim) into place."""
        for tier, st, a, b in self.segments:
            part = src.narrow(self.split_dim, a, b - a) if len(self.segments) > 1 else src
            n = part.shape[0]
            if tier == "disk":
                self.env.write_disk(st, part, row_start)
            elif self.split_dim == 0 and row_start == 0 and n == st.shape[0]:
                st.copy_(part, non_blocking=True)
            else:
                st[row_start:row_start + n].copy_(part, non_blocking=True)

    # ---- per-segment row access (the KV cache) ------------------------------------------------
    def read_rows(self, i: int, rows: int, to_compute: bool = True, defer: bool = False) -> torch.Tensor:
        """Rows [0, rows) of segment i, on the compute device (or in host memory). (defer: for
        PackedBuffer's signature; nothing to unpack here.)"""
        tier, st = self.segments[i][:2]
        if tier == "disk":
            return self.env.read_disk(st, 0, rows, to_compute=to_compute)
        t = st[:rows]
        return self.env.to_compute(t) if tier == "cpu" and to_compute else t

    def view_rows(self, i: int, rows: int, start: int = 0) -> torch.Tensor:
        """Rows [start, rows) of a segment held in memory, without a copy."""
        return self.segments[i][1][start:rows]

    def write_rows(self, i: int, x: torch.Tensor, start: int, non_blocking: bool = True):
        tier, st = self.segments[i][:2]
        if tier == "disk":
            self.env.write_disk(st, x.contiguous(), start)
            return
        dst = st[start:start + x.shape[0]]
        if x.device != dst.device and not dst.is_contiguous():   # rows into a heads-major CPU store
            self.env.copy_to_host(dst, x)
        else:
            dst.copy_(x, non_blocking=non_blocking)

    def close(self, recycle: bool = False):
        """recycle: hand the CPU-tier memory back for reuse (nothing may read it afterwards, and no
        copy into it may be in flight)."""
        for tier, st, _, _ in self.segments:
            if tier == "disk":
                st.close()
            elif tier == "cpu" and recycle:
                self.env.recycle(st, self.pin)
        self.segments = []


class PackedBuffer:
    """A TieredBuffer of group-wise quantised values: the packed data and its scales (and
    minimums) are split alike and stored on the same tiers, so only packed bytes are moved; values
    are unpacked on whatever device reads them."""

    def __init__(self, env, shape, dtype, config, percents=(100, 0, 0), split_dim=0, name="t", pin=True,
                 cpu_rows_inner=False, reuse=False):
        from .compression import check_config, packed_shapes
        check_config(config)
        self.env, self.shape, self.dtype, self.config, self.split_dim = env, tuple(shape), dtype, config, split_dim
        dims = packed_shapes(shape, config)
        kinds = (torch.uint8, torch.float16, torch.float16)
        self.parts = [TieredBuffer(env, s, k, percents, split_dim, f"{name}.{tag}", pin, cpu_rows_inner, reuse)
                      for s, k, tag in zip(dims, kinds, ("q", "scale", "min")) if s is not None]
        self.segments = self.parts[0].segments
        self._seg_shapes = []
        for _, _, a, b in self.segments:
            seg = list(self.shape)
            seg[split_dim] = b - a
            self._seg_shapes.append(seg)

    @property
    def tiers(self):
        return self.parts[0].tiers

    def nbytes_on(self, tier: str) -> int:
        return sum(p.nbytes_on(tier) for p in self.parts)

    def _unpack(self, parts, shape, defer: bool = False):
        from .compression import Packed
        mn = parts[2] if len(parts) == 3 else None
        packed = Deferred(Packed(parts[0], parts[1], mn, tuple(shape), self.config), self.dtype)
        return packed if defer else packed.value()

    def fill_from(self, src: torch.Tensor):
        from .compression import compress
        for part, t in zip(self.parts, compress(src.to(self.env.device), self.config).parts()):
            part.fill_from(t)

    def load_joined(self, defer: bool = False):
        """The tensor on the compute device; with defer, the packed parts moved there, to unpack
        later (Deferred.value) on the stream that uses them."""
        return self._unpack([p.load_joined() for p in self.parts], self.shape, defer)

    def read_rows(self, i: int, rows: int, to_compute: bool = True, defer: bool = False):
        shape = [rows] + self._seg_shapes[i][1:]
        return self._unpack([p.read_rows(i, rows, to_compute) for p in self.parts], shape, defer)

    def view_rows(self, i: int, rows: int, start: int = 0, defer: bool = False):
        """Rows [start, rows) of a segment held in memory, unpacked (with defer: the packed views,
        to unpack with Deferred.value, e.g. into a buffer with room for more rows)."""
        shape = [rows - start] + self._seg_shapes[i][1:]
        return self._unpack([p.view_rows(i, rows, start) for p in self.parts], shape, defer)

    def write_rows(self, i: int, x: torch.Tensor, start: int, non_blocking: bool = True):
        from .compression import compress
        self.write_parts(i, compress(x, self.config).parts(), start, non_blocking)

    def write_parts(self, i: int, parts, start: int, non_blocking: bool = True):
        """Rows already quantised with this buffer's config (data, scale[, min] of segment i's
        heads), written into place."""
        for part, t in zip(self.parts, parts):
            part.write_rows(i, t, start, non_blocking)

    def close(self, recycle: bool = False):
        for p in self.parts:
            p.close(recycle)
        self.segments = []


class Deferred:
    """Packed values moved to where they are used but not unpacked yet: a transfer on the copy
    stream stays a transfer, and the unpacking runs on the stream that consumes the values (on
    the copy stream it would delay the next layer's copy by the unpacking time)."""

    def __init__(self, packed, dtype):
        self.packed, self.dtype = packed, dtype

    def tensors(self):
        return self.packed.parts()

    def value(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The values (unpacked into `out` when given: contiguous, of the packed shape)."""
        from .compression import decompress
        return decompress(self.packed, self.dtype, out=out)

    def value_with(self, rows: torch.Tensor) -> torch.Tensor:
        """The values followed by `rows` along dim 0, unpacked straight into one buffer with room
        for them: the same tensor as torch.cat([value(), rows]) without its second full copy."""
        shape = tuple(self.packed.shape)
        n = shape[0]
        buf = torch.empty((n + rows.shape[0],) + shape[1:], dtype=self.dtype, device=self.packed.data.device)
        self.value(out=buf[:n])
        buf[n:].copy_(rows)
        return buf


def _shape(st):
    return st.shape


def _itemsize(dtype):
    return torch.empty((), dtype=dtype).element_size()
