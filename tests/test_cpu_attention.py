"""The chunked CPU decode-attention kernel against plain attention: stores read in place, packed
stores unpacked chunk by chunk, rows from disk, explicit workers, and its bounded memory."""
import pytest
import torch

from flexgen.engine import cpu_attention
from flexgen.engine.attention import attend
from flexgen.engine.cpu_attention import cpu_decode_attention, packed_chunks, row_chunks
from flexgen.memory.compression import compress, decompress
from flexgen.policy import CompressionConfig

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def case(b, heads, kv_heads, n_past, d, dtype, heads_major, seed=0):
    """Cache rows (n_past + 1, b, kv_heads, d), stored heads-major (a view of (b, g, n, d)) or
    position-major, a query and a mask with left padding and a row where only the new token is real."""
    g = torch.Generator().manual_seed(seed)
    shape = (b, kv_heads, n_past + 1, d) if heads_major else (n_past + 1, b, kv_heads, d)
    k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    if heads_major:
        k, v = k.movedim(2, 0), v.movedim(2, 0)
    q = torch.randn(b, 1, heads, d, generator=g)
    valid = torch.ones(b, n_past + 1, dtype=torch.bool)
    valid[1 % b, : n_past // 2] = False
    valid[2 % b, : n_past] = False
    return q, k, v, valid


def dense(q, k, v, valid):
    return attend(q, k.permute(1, 0, 2, 3).float(), v.permute(1, 0, 2, 3).float(), valid, q.shape[-1] ** -0.5)


def run(q, past, n_past, k, v, valid, workers=None):
    return cpu_decode_attention(q, past, n_past, k[n_past:], v[n_past:], ~valid, q.shape[-1] ** -0.5, workers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads_major", [True, False])
@pytest.mark.parametrize("heads,kv_heads,n_past", [(8, 2, 37), (4, 4, 5), (6, 3, 64), (2, 1, 1), (4, 2, 0)])
def test_matches_dense_attention(dtype, heads_major, heads, kv_heads, n_past):
    q, k, v, valid = case(3, heads, kv_heads, n_past, 16, dtype, heads_major, seed=n_past)
    got = run(q, row_chunks(k[:n_past], v[:n_past]), n_past, k, v, valid)
    assert torch.isfinite(got).all()
    # the products run in the stored dtype: fp16/bf16 rounding of scores and probabilities
    torch.testing.assert_close(got, dense(q, k, v, valid), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_heads_major_store_is_read_as_views(dtype):
    q, k, v, valid = case(3, 6, 2, 40, 16, dtype, heads_major=True, seed=1)
    past = row_chunks(k[:40], v[:40])
    lo = past(2, 5)[0]
    assert lo.shape == (3, 40, 16) and lo.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    assert lo.data_ptr() == k[0, 1, 0].data_ptr()      # matrix 2 = (sequence 1, kv head 0)
    got = run(q, past, 40, k, v, valid)
    torch.testing.assert_close(got, dense(q, k, v, valid), rtol=TOL[dtype], atol=TOL[dtype])


def test_position_major_rows_are_copied_per_chunk():
    q, k, v, valid = case(4, 4, 2, 30, 8, torch.float16, heads_major=False)
    kc = row_chunks(k[:30], v[:30])(3, 6)[0]
    assert kc.is_contiguous() and kc.shape == (3, 30, 8)
    assert row_chunks(k[:30], v[:30]).elems_per_thread == cpu_attention.UNPACK_ELEMS   # copies: cache-sized
    assert not hasattr(row_chunks(k.movedim(0, 2).contiguous().movedim(2, 0), v), "elems_per_thread")  # views
    torch.testing.assert_close(kc, k[:30].flatten(1, 2)[:, 3:6].transpose(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("workers", [1, 2])
def test_packed_heads_major_store(bits, symmetric, workers):
    """A packed store kept heads-major (each part (b, g, S, groups, ...) seen as (S, b, g, ...)),
    unpacked chunk by chunk into float32: attention over the dequantised values."""
    b, heads, g, n_past, d = 3, 8, 4, 33, 48
    q, k, v, valid = case(b, heads, g, n_past, d, torch.float32, heads_major=True, seed=bits)
    cfg = CompressionConfig(bits, 32, 3, symmetric)     # groups along the head dim, padded (48 -> 64)
    phys = CompressionConfig(bits, 32, -1, symmetric)
    kp, vp = (compress(x.movedim(0, 2).contiguous(), phys) for x in (k, v))     # (b, g, S, groups, ...)
    kparts, vparts = ([t.movedim(2, 0)[:n_past] for t in p.parts()] for p in (kp, vp))
    past = packed_chunks(kparts, vparts, cfg, d)
    kd, vd = (decompress(p, torch.float32).movedim(2, 0) for p in (kp, vp))     # the dequantised cache
    kd[n_past:], vd[n_past:] = k[n_past:], v[n_past:]
    got = run(q, past, n_past, k, v, valid, workers)
    torch.testing.assert_close(got, dense(q, kd, vd, valid), rtol=1e-5, atol=1e-5)
    # exactly decompress's values
    torch.testing.assert_close(past(1, 7)[1].values(), vd[:n_past].flatten(1, 2)[:, 1:7].transpose(0, 1), rtol=0, atol=0)


def test_packed_parts_are_the_engine_store():
    """The packed parts as PackedBuffer lays them out with CPU attention: data and scales read by
    the chunk unpacker in place, the same values as the buffer's own unpack."""
    from flexgen.memory.placement import PackedBuffer

    class Env:
        is_cuda, device = False, torch.device("cpu")

        def allocate(self, tier, shape, dtype, name="", pin=False, reuse=False):
            return torch.empty(shape, dtype=dtype)

    shape = (20, 2, 3, 16)
    buf = PackedBuffer(Env(), shape, torch.float32, CompressionConfig(4, 8, 3, False), (0, 100, 0), split_dim=2,
                       cpu_rows_inner=True)
    x = torch.randn(shape)
    buf.write_rows(0, x[:12], 0)
    assert not buf.parts[0].segments[0][1].is_contiguous()         # heads-major behind the view
    parts = [p.segments[0][1][:12] for p in buf.parts]
    past = packed_chunks(parts, parts, buf.config, 16)
    torch.testing.assert_close(past(0, 6)[0].values(), buf.view_rows(0, 12).flatten(1, 2).transpose(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_workers_agree(dtype):
    q, k, v, valid = case(5, 6, 3, 50, 16, dtype, heads_major=True, seed=3)
    past = row_chunks(k[:50], v[:50])
    outs = [run(q, past, 50, k, v, valid, w) for w in (1, 3, 100)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-6)


def test_memory_is_bounded_by_chunks(monkeypatch):
    """Chunks that are copied or unpacked stay within CHUNK_ELEMS, never the whole b * g range;
    views of a heads-major store (no memory) come as one chunk per worker."""
    q, k, v, valid = case(8, 8, 4, 99, 8, torch.float16, heads_major=True)   # b * g = 32 matrices
    monkeypatch.setattr(cpu_attention, "CHUNK_ELEMS", 4 * 99 * 8)           # 4 matrices a chunk
    asked = []
    past = row_chunks(k[:99], v[:99])

    def spy(lo, hi):
        asked.append((lo, hi))
        return past(lo, hi)

    got = run(q, spy, 99, k, v, valid, workers=1)
    assert asked == [(0, 32)]
    torch.testing.assert_close(got, dense(q, k, v, valid), rtol=3e-3, atol=3e-3)
    asked.clear()
    run(q, spy, 99, k, v, valid, workers=3)
    assert len(asked) == 3 and sorted(asked)[-1][1] == 32 and all(hi - lo <= 11 for lo, hi in asked)
    spy.elems_per_thread = 1 << 30   # as if copied: CHUNK_ELEMS bounds each chunk
    asked.clear()
    got = run(q, spy, 99, k, v, valid, workers=1)
    assert sorted(asked) == [(lo, lo + 4) for lo in range(0, 32, 4)]
    torch.testing.assert_close(got, dense(q, k, v, valid), rtol=3e-3, atol=3e-3)
    monkeypatch.setattr(cpu_attention, "CHUNK_ELEMS", 1 << 30)
    # a past that unpacks (packed_chunks) bounds its chunks per torch thread running one
    spy.elems_per_thread = 2 * 99 * 8
    asked.clear()
    run(q, spy, 99, k, v, valid, workers=2)
    per_worker = max(1, torch.get_num_threads() // 2)
    assert len(asked) >= 2 and all(hi - lo <= 2 * per_worker for lo, hi in asked)
    assert sorted(asked)[-1][1] == 32


def test_probe_picks_a_mode_once():
    n = torch.get_num_threads()
    assert isinstance(cpu_attention._pool_wins(n), bool)
    assert cpu_attention._pool_wins(n) is cpu_attention._PROBED.get(n, False)
    assert not cpu_attention._pool_wins(1)
    assert torch.get_num_threads() == n          # the pool's single-threaded workers leave ours alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_past_n_past_are_not_attended(dtype):
    """The engine passes views over a store's whole capacity (evenly strided matrices, the GEMM's
    fast path); rows past n_past hold whatever is there (finite) and must not count."""
    g = torch.Generator().manual_seed(3)
    b, kv, heads, d, cap, n_past = 2, 2, 4, 16, 30, 17
    k = torch.randn(b, kv, cap, d, generator=g).to(dtype).movedim(2, 0)
    v = torch.randn(b, kv, cap, d, generator=g).to(dtype).movedim(2, 0)
    q = torch.randn(b, 1, heads, d, generator=g)
    k_new, v_new = torch.randn(1, b, kv, d, generator=g), torch.randn(1, b, kv, d, generator=g)
    invalid = torch.zeros(b, n_past + 1, dtype=torch.bool)
    invalid[1, :5] = True
    want = cpu_decode_attention(q, row_chunks(k[:n_past], v[:n_past]), n_past, k_new, v_new, invalid, d ** -0.5)
    k[n_past:] = 1e4   # junk in the unwritten capacity
    v[n_past:] = -1e4
    got = cpu_decode_attention(q, row_chunks(k, v), n_past, k_new, v_new, invalid, d ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
