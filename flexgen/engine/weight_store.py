"""Each layer's weights, placed across tiers by the policy and brought to the compute device."""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from ..memory.placement import PackedBuffer, TieredBuffer, assign_by_size
from ..models.base import packs

_POOL = {}


def _dummy_pool(dtype, device):
    """A fixed block of random values (std 0.02) that dummy weights are tiled from: fast to make
    for a 175B model, and not degenerate like all-ones."""
    key = (dtype, str(device))
    if key not in _POOL:
        g = torch.Generator().manual_seed(0)
        _POOL[key] = (torch.randn(1 << 20 | 7, generator=g) * 0.02).to(dtype=dtype, device=device)
    return _POOL[key]


def fill_dummy(dst: torch.Tensor, init: str):
    if init == "ones":
        dst.fill_(1)
    elif init == "zeros":
        dst.zero_()
    else:
        pool, flat = _dummy_pool(dst.dtype, dst.device), dst.view(-1)
        for start in range(0, flat.numel(), pool.numel()):
            n = min(pool.numel(), flat.numel() - start)
            flat[start:start + n].copy_(pool[:n])


class WeightStore:
    """homes[j][key] is a TieredBuffer holding one weight tensor of layer j on one tier."""

    def __init__(self, env, layers, percents, pin: bool, dtype, read_tensor=None, progress=True,
                 compression=None):
        """read_tensor(file, shape) -> numpy array, or None for dummy weights. With compression
        (a CompressionConfig), every matrix is stored group-wise quantised on its tier, moved
        packed, and unpacked on the compute device when its layer runs; vectors stay as they are."""
        self.env = env
        self.compressed = compression is not None
        self.homes = []
        for j, layer in enumerate(tqdm(layers, desc="loading weights", disable=not progress, unit="layer")):
            tiers = assign_by_size([math.prod(w.shape) for w in layer.weights], percents)
            home = {}
            for spec, tier in zip(layer.weights, tiers):
                onehot = tuple(100 if t == tier else 0 for t in ("gpu", "cpu", "disk"))
                if compression is not None and packs(layer, spec):
                    buf = PackedBuffer(env, spec.shape, dtype, compression, onehot, name=spec.key, pin=pin)
                else:
                    buf = TieredBuffer(env, spec.shape, dtype, onehot, name=spec.key, pin=pin)
                if read_tensor is None:
                    self._fill_dummy(buf, spec)
                else:
                    arrs = [read_tensor(f, shape) for f, shape in spec.files()]
                    arr = arrs[0] if len(arrs) == 1 else np.concatenate(arrs, axis=0)
                    buf.fill_from(torch.from_numpy(np.array(arr)).to(dtype))
                home[spec.key] = buf
            self.homes.append(home)
        # Layers whose weights all live on the compute device are served as the same views
        # every time: build those dicts once (the decode loop is bound by host overhead).
        compute = {"gpu"} if env.is_cuda else {"gpu", "cpu"}
        self._views = {j: self._load(j) for j, home in enumerate(self.homes)
                       if all(set(buf.tiers) <= compute and not isinstance(buf, PackedBuffer)
                              for buf in home.values())}

    @staticmethod
    def _fill_dummy(buf, spec):
        tier, storage = buf.segments[0][0], buf.segments[0][1]
        if tier == "disk" or isinstance(buf, PackedBuffer):
            # packed weights are quantised where the compute is (fast for a 175B dummy model)
            dev = buf.env.device if isinstance(buf, PackedBuffer) else "cpu"
            tmp = torch.empty(spec.shape, dtype=buf.dtype, device=dev)
            fill_dummy(tmp, spec.init)
            buf.fill_from(tmp)
        else:
            fill_dummy(storage, spec.init)

    def load(self, j: int, defer: bool = False) -> dict:
        """Layer j's weights on the compute device (views for what already lives there). With
        defer, packed weights arrive packed (placement.Deferred): the caller unpacks them with
        `unpacked` where it computes."""
        views = self._views.get(j)
        return views if views is not None else self._load(j, defer)

    def _load(self, j: int, defer: bool = False) -> dict:
        return {key: buf.load_joined(defer) for key, buf in self.homes[j].items()}

    def resident(self, j: int) -> bool:
        """Whether all of layer j's weights already live, unpacked, on the compute device."""
        return j in self._views

    def on_disk(self, j: int) -> bool:
        return any("disk" in buf.tiers for buf in self.homes[j].values())

    def nbytes_on(self, tier: str) -> int:
        return sum(buf.nbytes_on(tier) for home in self.homes for buf in home.values())

    def close(self):
        for home in self.homes:
            for buf in home.values():
                buf.close()
        self.homes, self._views = [], {}
