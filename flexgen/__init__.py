"""FlexGen, rebuilt: high-throughput generation with GPU/CPU/disk offloading."""
from .env import ExecutionEnv
from .policy import CompressionConfig, Policy, PolicyError

__all__ = ["ExecutionEnv", "Policy", "PolicyError", "CompressionConfig"]
