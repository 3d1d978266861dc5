"""The KV cache of one attention layer for one GPU batch, split over tiers along the KV heads.

Storage layout per segment is (max_len, batch, kv_heads_in_segment, head_dim): positions are rows,
so the first n positions of a segment are one contiguous block to copy or read from disk, and a
split over heads keeps every head's attention exact on whichever device computes it.
"""
from __future__ import annotations


from ..memory.placement import TieredBuffer


class LayerCache:
    def __init__(self, env, max_len, batch, kv_heads, head_dim, dtype, percents, name, cpu_compute):
        shape = (max_len, batch, kv_heads, head_dim)
        self.env = env
        self.k = TieredBuffer(env, shape, dtype, percents, split_dim=2, name=f"{name}.k")
        self.v = TieredBuffer(env, shape, dtype, percents, split_dim=2, name=f"{name}.v")
        # A segment is "resident" when attention runs right where it is stored: new rows are
        # written in place and the stored rows are used without a copy.
        self.resident = []
        for tier, st, _, _ in self.k.segments:
            on_compute = tier == "gpu" or (tier == "cpu" and not env.is_cuda)
            self.resident.append(on_compute or (tier == "cpu" and cpu_compute))
        self.cpu_compute = cpu_compute
        self.ranges = [(a, b) for _, _, a, b in self.k.segments]

    def load(self, rows: int):
        """The first `rows` positions of every non-resident segment, for attention (run in the
        prefetch thread). Resident segments return None: attention reads them in place."""
        out = []
        keep_cpu = self.cpu_compute
        for i, ((tier, kst, _, _), (_, vst, _, _)) in enumerate(zip(self.k.segments, self.v.segments)):
            if self.resident[i]:
                out.append(None)
                continue
            out.append((self._load_one(tier, kst, rows, keep_cpu), self._load_one(tier, vst, rows, keep_cpu)))
        return out

    def _load_one(self, tier, st, rows, keep_cpu):
        if tier == "disk":
            return self.env.read_disk(st, 0, rows, to_compute=not keep_cpu)
        return self.env.to_compute(st[:rows])

    def write_resident(self, k_rows, v_rows, start):
        """Write new rows (s, b, kv_heads, d) into the resident segments, in place."""
        for i, (a, b) in enumerate(self.ranges):
            if self.resident[i]:
                n = k_rows.shape[0]
                kst, vst = self.k.segments[i][1], self.v.segments[i][1]
                kst[start:start + n].copy_(k_rows[:, :, a:b])
                vst[start:start + n].copy_(v_rows[:, :, a:b])

    def store_rest(self, k_rows, v_rows, start):
        """Write new rows into the non-resident segments (run in the store thread)."""
        for i, (a, b) in enumerate(self.ranges):
            if not self.resident[i]:
                tier, kst = self.k.segments[i][0], self.k.segments[i][1]
                vst = self.v.segments[i][1]
                for st, rows in ((kst, k_rows), (vst, v_rows)):
                    part = rows[:, :, a:b]
                    if tier == "disk":
                        self.env.write_disk(st, part.contiguous(), start)
                    else:
                        st[start:start + part.shape[0]].copy_(part, non_blocking=True)

    @property
    def needs_store(self) -> bool:
        return not all(self.resident)

    @property
    def loads_from_disk(self) -> bool:
        return any(t == "disk" and not r for t, r in zip(self.k.tiers, self.resident))

    stores_to_disk = loads_from_disk

    def close(self):
        self.k.close()
        self.v.close()
