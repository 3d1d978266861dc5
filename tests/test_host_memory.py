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


class _FakeCudart:
    """Records page-locking calls (cudaHostRegister needs a GPU; the bookkeeping does not)."""

    def __init__(self):
        self.registered, self.unregistered = [], []

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.registered.append((ptr, nbytes))
        return 0

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0


def test_recycled_pinned_cache_memory_stays_registered(tmp_path, monkeypatch):
    """A block's pinned CPU cache handed back (env.recycle) keeps its mapping, and with it its
    registration: the next block of the same shape takes it without registering again (pinning
    fresh pages cost N4 ~0.7 ms per MiB-sized part, 1,536 parts a block). Memory of another size
    is unregistered when the spares are dropped, once."""
    from flexgen.env import ExecutionEnv
    fake = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    env = ExecutionEnv.create(str(tmp_path), device="cpu")
    env.is_cuda = True   # the CPU tier is pinned as on a GPU machine (only allocate/recycle run)
    try:
        parts = [env.allocate("cpu", (64, 4, 2, 8), torch.uint8, reuse=True) for _ in range(3)]
        assert len(fake.registered) == 3 and env.host_bytes.pinned == 3 * 4096
        ptrs = {p.data_ptr() for p in parts}
        for p in parts:
            env.recycle(p)
        del parts, p
        gc.collect()
        assert fake.unregistered == []             # spares keep their mappings registered
        again = [env.allocate("cpu", (64, 4, 2, 8), torch.uint8, reuse=True) for _ in range(3)]
        assert len(fake.registered) == 3 and {p.data_ptr() for p in again} == ptrs
        for p in again:
            env.recycle(p)
        del again, p
        other = env.allocate("cpu", (10,), torch.uint8, reuse=True)   # another shape: spares dropped
        gc.collect()
        assert len(fake.registered) == 4 and len(fake.unregistered) == 3 and other.numel() == 10
    finally:
        env.close_copy_threads()
