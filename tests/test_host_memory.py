"""Host memory in mappings of its own: exact size, pinned through cudaHostRegister on CUDA."""
import gc

import pytest
import torch

from flexgen.memory import host_memory


def _available():
    """The machine's MemAvailable in bytes (what pinning takes from everyone)."""
    with open("/proc/meminfo") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable"))


def test_mapping_lives_as_long_as_any_view():
    t = host_memory.empty((300, 7), torch.float16, pin=False)
    t.fill_(2)
    view = t.movedim(1, 0)[2:]
    del t
    gc.collect()
    assert view.float().sum().item() == 2 * 5 * 300   # still mapped through the view


def test_prepare_sees_the_memory_before_it_is_handed_out():
    seen = []
    t = host_memory.empty((4, 5), torch.float32, pin=False, prepare=lambda x: seen.append(x.shape))
    assert seen == [torch.Size([4, 5])] and t.shape == (4, 5)


@pytest.mark.gpu
def test_pinned_tensor_is_exact_size_and_copies_asynchronously():
    n = 600 << 20     # torch's pinned allocator takes 1 GiB for this (a power of two)
    torch.cuda.init()
    before = _available()
    t = host_memory.empty((n,), torch.uint8)
    grown = before - _available()
    assert t.is_pinned()
    assert grown < n * 1.1, grown
    t.fill_(7)
    d = t.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert int(d[-1]) == 7
