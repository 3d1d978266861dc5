"""FlexGen, rebuilt: high-throughput generation with GPU/CPU/disk offloading."""
from .memory.oom import configure_allocator

configure_allocator()   # before anything starts CUDA's allocator

from .env import ExecutionEnv
from .policy import CompressionConfig, Policy, PolicyError

__all__ = ["ExecutionEnv", "Policy", "PolicyError", "CompressionConfig"]
