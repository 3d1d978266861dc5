"""The stage split: the family's layer list cut into contiguous ranges, one per pipeline rank,
balanced by weight bytes (the embedding stays on the first stage, the head on the last)."""
from __future__ import annotations

import math

from ..models.base import ModelFamily


class StageError(ValueError):
    """The model cannot be cut into that many stages (a user error)."""


def layer_bytes(layer) -> int:
    return sum(math.prod(w.shape) for w in layer.weights)


def split_stages(layers, num_stages: int) -> list[tuple[int, int]]:
    """[(lo, hi)] for each stage: contiguous, covering every layer, none empty, minimising the
    largest stage's weight bytes (every stage streams its own weights each step, so the largest
    one sets the pipeline's pace). Cuts fall only between transformer blocks, never between a
    block's attention and its MLP (the schedule moves those together without --sep-layer)."""
    # units: [embed + block 0], block 1, ..., [block n-1 + head]; a block starts at an attention layer
    starts = [i for i, layer in enumerate(layers) if layer.kind == "attention"]
    bounds = [0] + starts[1:] + [len(layers)]
    units = [sum(layer_bytes(layer) for layer in layers[a:b]) for a, b in zip(bounds, bounds[1:])]
    n = len(units)
    if num_stages > n:
        raise StageError(f"{num_stages} pipeline stages need at least {num_stages} transformer blocks; "
                         f"this model has {n}")
    prefix = [0]
    for u in units:
        prefix.append(prefix[-1] + u)
    # best[s][i]: the smallest possible largest stage for units[:i] in s stages (n, stages are small)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for s in range(1, num_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                v = max(best[s - 1][j], prefix[i] - prefix[j])
                if v < best[s][i]:
                    best[s][i], cut[s][i] = v, j
    ends, i = [], n
    for s in range(num_stages, 0, -1):
        ends.append(i)
        i = cut[s][i]
    ends.reverse()
    unit_ranges = list(zip([0] + ends[:-1], ends))
    return [(bounds[a], bounds[b]) for a, b in unit_ranges]


class StageFamily(ModelFamily):
    """A family seen through one stage: its layers are the stage's, so the memory model and the
    performance model (pre-flight check, --percent auto) count only this rank's share."""

    def __init__(self, family: ModelFamily, layer_range: tuple[int, int]):
        super().__init__(family.config)
        self.inner, self.layer_range = family, layer_range
        self.family = family.family
        self._layers = family.layers()[layer_range[0]:layer_range[1]]

    def info(self):
        import dataclasses
        i = self.inner.info()
        n = sum(1 for layer in self._layers if layer.kind == "attention")
        return dataclasses.replace(i, num_layers=n)

    def layers(self):
        return list(self._layers)

    def miniature(self, num_layers: int) -> ModelFamily:
        """The whole model's miniature (optimizer/engine_ops.py): a stage's layers issue the same
        engine operations per layer; its once-per-step ones are those of the whole model (the
        embedding and the head's, which a middle stage lacks: a small overcount)."""
        return self.inner.miniature(num_layers)


def describe_stage(layers, layer_range) -> str:
    """e.g. "embed + blocks 0-5" for the header of each rank."""
    lo, hi = layer_range
    part = layers[lo:hi]
    blocks = [i for i, layer in enumerate(layers) if layer.kind == "attention"]
    mine = [blocks.index(lo + j) for j, layer in enumerate(part) if layer.kind == "attention"]
    words = []
    if part and part[0].kind == "embed":
        words.append("embed")
    if mine:
        words.append(f"blocks {mine[0]}-{mine[-1]}" if len(mine) > 1 else f"block {mine[0]}")
    if part and part[-1].kind == "head":
        words.append("head")
    return " + ".join(words)
