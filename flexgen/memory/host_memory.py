"""Host memory for the CPU tier, in mappings of its own: page-locked of exactly the size asked for.

PyTorch's pinned allocator rounds every allocation up to a power of two (measured on the H100
machine: a 103 MiB pinned tensor took 225 MiB of RSS, a 600 MiB one 1024 MiB), so OPT-30B's
56 GiB of weights would lock ~70 GiB. Here the memory is an anonymous mapping of the exact size,
page-locked with cudaHostRegister; PyTorch sees it as pinned (asynchronous copies work). The
registration is dropped just before the mapping goes away, i.e. when the last tensor viewing it
is freed. Falls back to PyTorch's allocator if registration fails.

Pageable CPU-tier memory comes from mappings of their own too: fresh anonymous pages are zero, so
a KV cache store's unwritten rows are finite (CPU attention reads over a store's whole capacity
and masks them), and a NUMA memory policy bound to the pages ends with the mapping.
"""
from __future__ import annotations

import math
import mmap
import weakref

import torch


class _Mapping(mmap.mmap):
    """An anonymous mapping that unregisters itself from CUDA before it is unmapped."""

    registered = 0

    def __del__(self):
        if self.registered:
            try:
                torch.cuda.cudart().cudaHostUnregister(self.registered)
            except Exception:  # interpreter shutdown: the process is going away anyway
                pass


def empty(shape, dtype, pin: bool = True, prepare=None, on_free=None) -> torch.Tensor:
    """An uninitialised host tensor in a mapping of its own, pinned if pin. prepare(tensor), if
    given, runs on the pageable memory before it is locked (NUMA placement binds and faults its
    pages there; a memory policy bound to a mapping of its own dies with it, while one bound to
    heap pages would outlive the tensor). on_free() runs when the memory goes away: when the last
    view of it is freed (the mapping lives exactly as long as the tensors' storage)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return _fallback(shape, dtype, pin, on_free)
    m = _Mapping(-1, nbytes)
    flat = torch.frombuffer(m, dtype=torch.uint8)  # holds the mapping while any view of it lives
    t = flat.view(dtype).view(shape)
    if prepare is not None:
        prepare(t)
    if pin:
        rc = torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), nbytes, 0)
        if int(getattr(rc, "value", rc)) != 0:
            return _fallback(shape, dtype, pin, on_free)
        m.registered = flat.data_ptr()
    if on_free is not None:
        weakref.finalize(m, on_free)
    return t


def _fallback(shape, dtype, pin, on_free):
    t = torch.empty(shape, dtype=dtype, pin_memory=pin)
    if on_free is not None:   # the tensor object's lifetime: the nearest there is for torch's memory
        weakref.finalize(t, on_free)
    return t
