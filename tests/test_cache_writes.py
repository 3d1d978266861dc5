"""The compressed KV cache's write and read paths: one quantise call per layer and GPU batch (K
and V together, all segments) stores exactly the bytes of the per-segment writes it replaced, and
attention reads exactly the tensors of unpack-then-concatenate."""
import itertools
import tempfile

import pytest
import torch

from flexgen.engine.kv_cache import LayerCache
from flexgen.env import ExecutionEnv
from flexgen.memory.compression import _compress_reference, compress, decompress
from flexgen.memory.placement import Deferred
from flexgen.policy import CompressionConfig


@pytest.fixture
def env():
    e = ExecutionEnv.create(tempfile.mkdtemp(), device="cpu")
    yield e
    e.close_copy_threads()


@pytest.mark.parametrize("dtype,bits,sym", list(itertools.product(
    [torch.float16, torch.bfloat16, torch.float32, torch.float64], [4, 8], [False, True])))
def test_compress_matches_the_reference_byte_for_byte(dtype, bits, sym):
    g = torch.Generator().manual_seed(bits + sym)
    for shape, gs, dim in [((6, 3, 4, 100), 64, 3), ((9, 40), 16, 0), ((96, 40), 16, 0), ((5, 7), 8, 1)]:
        x = (torch.randn(shape, generator=g) * 4).to(dtype)
        x.view(-1)[: x.numel() // 3] = 1.5     # whole groups constant: a zero scale clamped
        cfg = CompressionConfig(bits, gs, dim, sym)
        before = x.clone()
        got, want = compress(x, cfg), _compress_reference(x, cfg)
        assert torch.equal(x, before)          # the input is never modified in place
        assert got.shape == want.shape
        for a, b in zip(got.parts(), want.parts(), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous()
            assert torch.equal(a, b), (shape, dtype, bits, sym)


def _stored(buf, seg, rows):
    """The bytes of segment seg's first `rows` positions, part by part (whatever the tier)."""
    out = []
    for part in buf.parts:
        tier, st = part.segments[seg][:2]
        t = st.read(0, rows) if tier == "disk" else st[:rows]
        out.append(t.contiguous().clone())
    return out


@pytest.mark.parametrize("percents,cpu_compute", [((30, 30, 40), False), ((0, 100, 0), True),
                                                  ((50, 50, 0), True), ((100, 0, 0), False)])
@pytest.mark.parametrize("sym", [False, True])
def test_fused_write_stores_the_bytes_of_per_segment_writes(env, percents, cpu_compute, sym):
    cfg = CompressionConfig(4, 8, 2, sym)
    fused = LayerCache(env, 24, 3, 5, 16, torch.float32, percents, "f", cpu_compute, cfg)
    split = LayerCache(env, 24, 3, 5, 16, torch.float32, percents, "s", cpu_compute, cfg)
    g = torch.Generator().manual_seed(1)
    for start, s in [(0, 10), (10, 1), (11, 1)]:       # a prompt, then two decode rows
        k = torch.randn(3, s, 5, 16, generator=g).transpose(0, 1)   # as attend passes them: a view
        v = torch.randn(3, s, 5, 16, generator=g).transpose(0, 1)
        rows = fused.new_rows(k, v)
        fused.write_resident(rows, start)
        fused.store_rest(rows, start)
        for i, (a, b) in enumerate(split.ranges):      # the old way: each segment, K and V apart
            for buf, x in ((split.k, k), (split.v, v)):
                buf.write_parts(i, _compress_reference(x[:, :, a:b], buf.config).parts(), start)
    assert len(fused.ranges) == sum(1 for p in percents if p)
    for i in range(len(fused.ranges)):
        for a, b in ((fused.k, split.k), (fused.v, split.v)):
            for x, y in zip(_stored(a, i, 12), _stored(b, i, 12), strict=True):
                assert torch.equal(x, y)
    fused.close(), split.close()


@pytest.mark.parametrize("percents", [(100, 0, 0), (0, 100, 0), (0, 0, 100), (40, 30, 30)])
def test_past_and_new_is_unpack_then_concatenate(env, percents):
    cfg = CompressionConfig(4, 8, 2, False)
    cache = LayerCache(env, 16, 2, 4, 16, torch.float32, percents, "c", False, cfg)
    g = torch.Generator().manual_seed(2)
    k, v = (torch.randn(9, 2, 4, 16, generator=g) for _ in range(2))
    rows = cache.new_rows(k, v)
    cache.write_resident(rows, 0)
    cache.store_rest(rows, 0)
    loaded = cache.load(9)
    k_new, v_new = (torch.randn(1, 2, 4, 16, generator=g) for _ in range(2))
    for i, (a, b) in enumerate(cache.ranges):
        got = cache.past_and_new(i, 9, k_new[:, :, a:b], v_new[:, :, a:b],
                                 None if cache.resident[i] else loaded[i])
        for buf, new, out in zip((cache.k, cache.v), (k_new, v_new), got):
            past = buf.read_rows(i, 9)
            want = torch.cat([past, new[:, :, a:b]], dim=0)
            assert out.shape == want.shape and torch.equal(out, want)
    cache.close()


def test_unpacking_into_a_buffer_with_room():
    cfg = CompressionConfig(4, 64, 3, False)
    x = torch.randn(7, 2, 3, 128)
    p = compress(x, cfg)
    d = Deferred(p, torch.float32)
    new = torch.randn(2, 2, 3, 128)
    assert torch.equal(d.value_with(new), torch.cat([decompress(p, torch.float32), new]))
    buf = torch.empty(9, 2, 3, 128)
    assert decompress(p, torch.float32, out=buf[:7]).data_ptr() == buf.data_ptr()
    assert torch.equal(buf[:7], decompress(p, torch.float32))
    with pytest.raises(ValueError, match="contiguous"):
        decompress(p, torch.float32, out=torch.empty(7, 2, 3, 64))
