"""The offloading policy and compression settings, with FlexGen's field names and order.

A policy says how big a block is (gpu_batch_size x num_gpu_batches sequences) and where each kind
of tensor lives: the percentages of weights, KV cache and activations on the compute device
("gpu"), in CPU memory and on disk (the remainder).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class PolicyError(ValueError):
    """A policy or command-line setting that cannot work, with a message meant for the user."""


@dataclass(frozen=True)
class CompressionConfig:
    """Group-wise quantisation settings (FlexGen's fields and order)."""
    num_bits: int = 4
    group_size: int = 64
    group_dim: int = 0
    symmetric: bool = False


@dataclass(frozen=True)
class Policy:
    gpu_batch_size: int
    num_gpu_batches: int

    # Percent of weights on the compute device / CPU memory; the rest is on disk.
    w_gpu_percent: float
    w_cpu_percent: float
    # Percent of the KV cache on the compute device / CPU memory.
    cache_gpu_percent: float
    cache_cpu_percent: float
    # Percent of activations (hidden states between layers) on the compute device / CPU memory.
    act_gpu_percent: float
    act_cpu_percent: float

    # Overlap I/O (weight, cache and activation transfers) with compute.
    overlap: bool = True
    # Schedule attention and MLP as separate layers (finer-grained weight streaming).
    sep_layer: bool = True
    # Keep CPU-resident weights in pinned memory.
    pin_weight: bool = True
    # Run decode attention on the CPU for the CPU-resident cache.
    cpu_cache_compute: bool = False
    # Fraction of cached positions attended in decode (1.0 = dense attention).
    attn_sparsity: float = 1.0

    compress_weight: bool = False
    comp_weight_config: CompressionConfig = field(default_factory=CompressionConfig)
    compress_cache: bool = False
    comp_cache_config: CompressionConfig = field(default_factory=lambda: CompressionConfig(group_dim=2))

    def __post_init__(self):
        validate_policy(self)

    @property
    def w_disk_percent(self):
        return 100 - self.w_gpu_percent - self.w_cpu_percent

    @property
    def cache_disk_percent(self):
        return 100 - self.cache_gpu_percent - self.cache_cpu_percent

    @property
    def act_disk_percent(self):
        return 100 - self.act_gpu_percent - self.act_cpu_percent

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    def percents(self, what: str) -> tuple[float, float, float]:
        """(compute device, cpu, disk) percentages for 'weight', 'cache' or 'act'."""
        prefix = {"weight": "w", "cache": "cache", "act": "act"}[what]
        gpu = getattr(self, f"{prefix}_gpu_percent")
        cpu = getattr(self, f"{prefix}_cpu_percent")
        return gpu, cpu, 100 - gpu - cpu

    def replace(self, **changes) -> "Policy":
        return dataclasses.replace(self, **changes)


def validate_policy(p: Policy) -> None:
    for name in ("gpu_batch_size", "num_gpu_batches"):
        value = getattr(p, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PolicyError(f"{name} must be a positive integer, got {value!r}")
    for what, label in (("w", "weights"), ("cache", "cache"), ("act", "activations")):
        gpu = getattr(p, f"{what}_gpu_percent")
        cpu = getattr(p, f"{what}_cpu_percent")
        for v in (gpu, cpu):
            if not isinstance(v, (int, float)) or v != v or v < 0 or v > 100:
                raise PolicyError(f"{label} percentages must be numbers in [0, 100], got gpu={gpu!r} cpu={cpu!r}")
        if gpu + cpu > 100 + 1e-9:
            raise PolicyError(f"{label}: gpu {gpu}% + cpu {cpu}% exceeds 100%")
    if not (0 < p.attn_sparsity <= 1):
        raise PolicyError(f"attn_sparsity must be in (0, 1], got {p.attn_sparsity!r}")
    for flag, cfg in (("compress_weight", p.comp_weight_config), ("compress_cache", p.comp_cache_config)):
        if getattr(p, flag) and (cfg.num_bits not in (4, 8) or cfg.group_size < 2 or cfg.group_size % 2):
            raise PolicyError(f"{flag}: unsupported compression config {cfg} "
                              "(num_bits 4 or 8, an even group_size)")
