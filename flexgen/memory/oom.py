"""Running out of memory, as a user error: which memory ran out, and the allocator set up so
that what the memory model counts is what the process holds.

PyTorch's caching allocator keeps freed blocks for reuse; with the engine's mix of large,
differently sized buffers (layers in flight, a GPU batch's cache, activations) the reserved but
unused part grew to 7-8.5 GiB under a 24 GiB cap on the H200 (issue 12) and the run died with
16 GiB allocated. Expandable segments map memory in pages and grow one segment instead of
carving fixed blocks, so reserved stays close to allocated. It must be chosen before CUDA's
allocator starts, hence at import of flexgen; a user's own PYTORCH_CUDA_ALLOC_CONF (or
PYTORCH_ALLOC_CONF) is left alone.
"""
from __future__ import annotations

import errno
import os

ALLOCATOR_DEFAULT = "expandable_segments:True"


def configure_allocator() -> None:
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_DEFAULT


class OutOfMemory(RuntimeError):
    """A run ran out of GPU or host memory; the message names which and what would fit."""


class HostMemoryCapExceeded(MemoryError):
    """An allocation of the CPU tier would pass --cpu-mem."""


def is_out_of_memory(e: BaseException) -> bool:
    import torch
    if isinstance(e, (torch.OutOfMemoryError, MemoryError, OutOfMemory)):
        return True
    if isinstance(e, OSError) and e.errno == errno.ENOMEM:
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def which_memory(e: BaseException) -> str:
    import torch
    if isinstance(e, torch.OutOfMemoryError) or "CUDA out of memory" in str(e):
        return "GPU"
    if "pinned" in str(e).lower() or "cudaHostRegister" in str(e) or "cudaHostAlloc" in str(e):
        return "pinned host"
    return "host"


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
