"""The KV cache of one attention layer for one GPU batch, split over tiers along the KV heads.

Storage layout per segment is (max_len, batch, kv_heads_in_segment, head_dim): positions are rows,
so the first n positions of a segment are one contiguous block to copy or read from disk, and a
split over heads keeps every head's attention exact on whichever device computes it. With CPU
attention the CPU segment is stored (batch, kv_heads, max_len, head_dim) behind a view of the same
shape: nothing reads it but the CPU, and there each head's positions are one contiguous matrix.
"""
from __future__ import annotations


import dataclasses

import torch

from ..memory.placement import Deferred, PackedBuffer, TieredBuffer


class LayerCache:
    def __init__(self, env, max_len, batch, kv_heads, head_dim, dtype, percents, name, cpu_compute,
                 compression=None):
        """compression: a CompressionConfig to store the cache group-wise quantised along the
        head dim (new rows are quantised as they are written), or None."""
        shape = (max_len, batch, kv_heads, head_dim)
        self.env = env
        # With CPU attention the CPU segment is stored heads-major (batch, heads, positions, d), the
        # layout its matrix products read without a copy (see cpu_attention.py).
        # It is then pageable too: only new rows cross PCIe into it, so pinning it would only take
        # page-locked memory from the machine.
        inner = bool(cpu_compute)
        if compression is None:
            make = lambda tag: TieredBuffer(env, shape, dtype, percents, split_dim=2, name=f"{name}.{tag}",  # noqa
                                            pin=not inner, cpu_rows_inner=inner, reuse=True)
        else:
            cfg = dataclasses.replace(compression, group_dim=3)  # our layout's head dim
            make = lambda tag: PackedBuffer(env, shape, dtype, cfg, percents, split_dim=2,  # noqa: E731
                                            name=f"{name}.{tag}", pin=not inner, cpu_rows_inner=inner,
                                            reuse=True)
        self.compressed = compression is not None
        if self.compressed and cpu_compute:
            # the native packed-attention kernel is built (once per machine) or loaded now, not
            # inside the first decode step's timing (cpu_packed.py; None: its PyTorch version)
            from . import cpu_packed
            cpu_packed.library()
        self.k, self.v = make("k"), make("v")
        # A segment is "resident" when attention runs right where it is stored: new rows are
        # written in place and the stored rows are read there without a transfer.
        self.resident = []
        for tier in self.k.tiers:
            on_compute = tier == "gpu" or (tier == "cpu" and not env.is_cuda)
            self.resident.append(on_compute or (tier == "cpu" and cpu_compute))
        self.cpu_compute = cpu_compute
        self.ranges = [(a, b) for _, _, a, b in self.k.segments]

    def load(self, rows: int):
        """The first `rows` positions of every non-resident segment, for attention (run ahead of
        compute). Resident segments return None: attention reads them in place."""
        to_compute = not self.cpu_compute
        # rows for the device arrive packed when compressed (placement.Deferred), to be unpacked
        # by compute, not on the copy stream
        defer = to_compute and self.env.is_cuda
        return [None if self.resident[i] else
                (self.k.read_rows(i, rows, to_compute, defer), self.v.read_rows(i, rows, to_compute, defer))
                for i in range(len(self.ranges))]

    def resident_rows(self, i: int, rows: int, start: int = 0):
        return self.k.view_rows(i, rows, start), self.v.view_rows(i, rows, start)

    def clear_rows(self, i: int, rows: int, start: int = 0):
        """Rows [start, rows) of segment i set to zeros in place (packed: their codes, scales and
        minimums, which unpack to zeros)."""
        for store in (self.k, self.v):
            for part in (store.parts if self.compressed else [store]):
                part.view_rows(i, rows, start).zero_()

    def new_rows(self, k_rows, v_rows) -> "NewRows":
        """The new rows (s, b, kv_heads, d) as the cache stores them. Compressed: K and V quantised
        together by one call over all heads (contiguous on the GPU: each by the fused kernel).
        Groups run along the head dim, inside one head, so each segment's slice of the result is
        byte for byte what quantising its heads alone gives (this was four calls per layer and GPU
        batch, ~15 small kernels each)."""
        if not self.compressed:
            return NewRows(k_rows, v_rows)
        from ..memory import triton_quant
        from ..memory.compression import compress
        cfg = self.k.config   # groups along the head dim (3)
        if triton_quant.usable(k_rows, cfg) and triton_quant.usable(v_rows, cfg):
            # the fused kernel, one launch each: no stacked copy (OPT's K and V, views of its fused
            # QKV output, are stacked: 28 ms of OPT-30B's 0.81 s prefill of 16 x 512 tokens)
            return NewRows(compress(k_rows, cfg).parts(), compress(v_rows, cfg).parts())
        stacked_cfg = dataclasses.replace(self.k.config, group_dim=4)   # the head dim, behind the new K/V dim
        parts = compress(torch.stack([k_rows, v_rows]), stacked_cfg).parts()
        return NewRows([t[0] for t in parts], [t[1] for t in parts])

    def write_resident(self, rows: "NewRows", start):
        """Write new rows into the resident segments, in place."""
        for i, (a, b) in enumerate(self.ranges):
            if self.resident[i]:
                self._write(i, rows, a, b, start, non_blocking=False)

    def store_rest(self, rows: "NewRows", start):
        """Write new rows into the non-resident segments (behind compute)."""
        for i, (a, b) in enumerate(self.ranges):
            if not self.resident[i]:
                self._write(i, rows, a, b, start, non_blocking=True)

    def _write(self, i, rows, a, b, start, non_blocking):
        if self.compressed:
            self.k.write_parts(i, [t[:, :, a:b] for t in rows.k], start, non_blocking)
            self.v.write_parts(i, [t[:, :, a:b] for t in rows.v], start, non_blocking)
        else:
            self.k.write_rows(i, rows.k[:, :, a:b], start, non_blocking=non_blocking)
            self.v.write_rows(i, rows.v[:, :, a:b], start, non_blocking=non_blocking)

    def past_and_new(self, i: int, rows: int, k_new, v_new, loaded=None):
        """(K, V) for attention over segment i: its first `rows` positions (resident ones read in
        place; `loaded`: the segment's load) followed by the new rows k_new, v_new (s, b, heads of
        the segment, d) at full precision. Packed rows are unpacked straight into a buffer that
        has room for the new rows, not unpacked and then concatenated (a second full copy)."""
        if loaded is None:
            loaded = (self.k.view_rows(i, rows, defer=True), self.v.view_rows(i, rows, defer=True))
        out = []
        for past, new in zip(loaded, (k_new, v_new)):
            if isinstance(past, Deferred):
                out.append(past.value_with(new))
            else:
                out.append(torch.cat([past, new.to(past.device, past.dtype)], dim=0))
        return tuple(out)

    @property
    def needs_store(self) -> bool:
        return not all(self.resident)

    @property
    def loads_from_disk(self) -> bool:
        return any(t == "disk" and not r for t, r in zip(self.k.tiers, self.resident))

    stores_to_disk = loads_from_disk

    def close(self, recycle: bool = False):
        """recycle: the CPU-tier memory goes back to the environment for the next block's cache
        (first touches of fresh pages are slow; see env.py)."""
        self.k.close(recycle)
        self.v.close(recycle)


class NewRows:
    """A step's new K/V rows as a cache stores them: two tensors (s, b, kv_heads, d), or when the
    cache is compressed, the packed parts (data, scale[, min]) of K and of V."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def tensors(self) -> list:
        """Every tensor a store of these rows reads (kept alive for the copy stream)."""
        if isinstance(self.k, torch.Tensor):
            return [self.k, self.v]
        return list(self.k) + list(self.v)
