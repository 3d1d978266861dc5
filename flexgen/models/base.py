"""The small interface a model family implements.

A family describes its model as a sequence of layers (embedding, attention, MLP, head), each with
the weights it needs and a pure forward function. Forward functions get their weights already on
the compute device, in the compute dtype; attention asks the engine for the attention core through
`ctx.attend`, so a family never sees the KV cache or where any tensor lives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class WeightSpec:
    key: str          # name the forward function uses
    file: str | tuple  # tensor name in the weight cache (HF name without the "model." prefix), or
                       # several, stacked along dim 0 (q, k and v as one matrix: one matmul, not three)
    shape: tuple
    # How dummy weights are drawn: "normal" (scaled random), "ones" (norm gains), "zeros" (biases)
    init: str = "normal"
    split: tuple = ()  # rows of each stacked file
    # The share of tokens that use this weight: 1 for dense weights, top_k / num_experts for one
    # routed expert of a mixture of experts (all of its bytes move; only this share of its FLOPs run)
    share: float = 1.0
    packable: bool = True  # False: kept at full precision under weight compression (a router)

    def files(self):
        """[(file, shape)] of what this weight is read from."""
        if isinstance(self.file, str):
            return [(self.file, self.shape)]
        return [(f, (rows,) + tuple(self.shape[1:])) for f, rows in zip(self.file, self.split)]


def stacked(key, files, rows, rest=(), init="normal", share=1.0) -> WeightSpec:
    """A weight made of several cache tensors stacked along dim 0."""
    return WeightSpec(key, tuple(files), (sum(rows),) + tuple(rest), init, tuple(rows), share)


# Layer kinds: "embed", "attention", "mlp" (dense feed-forward), "moe" (a routed mixture of experts:
# its weights are the router and every expert, placed, compressed and moved like any layer's), "head".
LAYER_KINDS = ("embed", "attention", "mlp", "moe", "head")
FEED_FORWARD_KINDS = ("mlp", "moe")
# the transformer-block kinds whose matrices weight compression packs (embedding and head stay fp16)
BLOCK_KINDS = ("attention", "mlp", "moe")


def packs(layer, spec) -> bool:
    """Whether weight compression stores this weight packed: the matrices of transformer blocks
    (embedding tables and the head stay fp16: a small share of a large model's bytes, and
    quantising the head costs the most accuracy), except those marked not packable."""
    return len(spec.shape) >= 2 and layer.kind in BLOCK_KINDS and spec.packable


@dataclass
class LayerSpec:
    kind: str                           # one of LAYER_KINDS
    weights: list[WeightSpec]
    forward: Callable                   # forward(w: dict, h, ctx) -> tensor
    kv_heads: int = 0                   # attention layers: heads in the KV cache
    head_dim: int = 0
    top_k: int = 0                      # moe layers: the experts each token is routed to


@dataclass
class StepContext:
    """What one forward step of one GPU batch knows, beyond its hidden states."""
    input_ids: torch.Tensor             # (b, s) tokens of this step
    positions: torch.Tensor             # (b, s) position of each token (from the attention mask)
    # attend(q, k, v, scale, window=None) -> (b, s, heads, head_dim); window: sliding-window attention
    attend: Callable | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class ModelInfo:
    """What the engine and CLI need to know about any model, whatever its family."""
    name: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_seq_len: int
    pad_token_id: int
    eos_token_id: int | list[int] | None
    bos_token_id: int | None = None


class ModelFamily:
    """Base for a family bound to one config."""
    family = "base"

    def __init__(self, config):
        self.config = config

    def info(self) -> ModelInfo:
        raise NotImplementedError

    def layers(self) -> list[LayerSpec]:
        raise NotImplementedError

    def miniature(self, num_layers: int) -> "ModelFamily":
        """The same family with num_layers layers and every width small, the head counts (hence the
        split of heads over tiers) and the ratios of weight sizes kept: what the cost model runs
        through the engine to count its operations (optimizer/engine_ops.py)."""
        return type(self)(self.config.miniature(num_layers))

    # Sizes for the benchmark header (FlexGen prints these).
    def model_bytes(self, itemsize: int = 2) -> int:
        import math
        unique = {f: shape for layer in self.layers() for w in layer.weights for f, shape in w.files()}
        return sum(math.prod(shape) for shape in unique.values()) * itemsize  # tied weights once

    def cache_bytes(self, batch: int, seq_len: int, itemsize: int = 2) -> int:
        i = self.info()
        return 2 * batch * seq_len * i.num_layers * i.num_kv_heads * i.head_dim * itemsize

    def hidden_bytes(self, batch: int, seq_len: int, itemsize: int = 2) -> int:
        return batch * seq_len * self.info().hidden_size * itemsize


def require_sizes(d: dict, family: str, fields) -> dict:
    """The size fields a family's config must have, as positive integers: {field: int}. A missing
    or malformed one raises ValueError naming every such field (from_hf's callers add the file)."""
    missing = [f for f in fields if d.get(f) is None]
    if missing:
        raise ValueError(f"the config lacks {', '.join(missing)}, which a {family} model needs")
    out = {}
    for f in fields:
        v = d[f]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1:
            raise ValueError(f"config field {f} must be a positive integer, got {v!r}")
        out[f] = int(v)
    return out

