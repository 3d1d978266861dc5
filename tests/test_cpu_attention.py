"""The blocked CPU decode-attention kernel against plain attention, and its bounded memory."""
import pytest
import torch

from flexgen.engine.attention import attend
from flexgen.engine.cpu_attention import cpu_decode_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,n_past,block", [(8, 2, 37, 8), (4, 4, 5, 512), (6, 3, 64, 16), (2, 1, 1, 1)])
def test_matches_dense_attention(dtype, heads, kv_heads, n_past, block):
    g = torch.Generator().manual_seed(n_past)
    b, d = 3, 16
    q = torch.randn(b, 1, heads, d, generator=g)
    k = torch.randn(n_past + 1, b, kv_heads, d, generator=g).to(dtype)   # the cache layout
    v = torch.randn(n_past + 1, b, kv_heads, d, generator=g).to(dtype)
    valid = torch.ones(b, n_past + 1, dtype=torch.bool)
    valid[1, : n_past // 2] = False           # left padding
    valid[2, : n_past] = False                # only the new token is real
    got = cpu_decode_attention(q, lambda a, e: (k[a:e], v[a:e]), n_past, k[n_past:], v[n_past:], ~valid,
                               d ** -0.5, block=block)
    ref = attend(q, k.permute(1, 0, 2, 3).float(), v.permute(1, 0, 2, 3).float(), valid, d ** -0.5)
    assert torch.isfinite(got).all()
    # the products run in the stored dtype: fp16/bf16 rounding of scores and probabilities
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_heads_major_store_is_read_in_place(dtype):
    """A heads-major store (what the engine keeps with CPU attention) is read as views of the
    store in one pass, with the same answer as rows in the position-major layout."""
    g = torch.Generator().manual_seed(1)
    b, kv, heads, d, cap, n_past = 3, 2, 6, 16, 50, 40
    store = torch.randn(b, kv, cap, d, generator=g).to(dtype).movedim(2, 0)   # (cap, b, kv, d) view
    vstore = torch.randn(b, kv, cap, d, generator=g).to(dtype).movedim(2, 0)
    q = torch.randn(b, 1, heads, d, generator=g)
    invalid = torch.zeros(b, n_past + 1, dtype=torch.bool)
    invalid[0, :7] = True
    asked = []

    def rows(a, e):
        asked.append((a, e))
        return store[a:e], vstore[a:e]

    got = cpu_decode_attention(q, rows, n_past, store[n_past:n_past + 1], vstore[n_past:n_past + 1], invalid,
                               d ** -0.5, block=16)
    assert asked[-1] == (0, n_past) and len(asked) == 2
    ref = attend(q, store[:n_past + 1].permute(1, 0, 2, 3).float(), vstore[:n_past + 1].permute(1, 0, 2, 3).float(),
                 ~invalid, d ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


def test_reads_blocks_in_stored_dtype():
    """The kernel asks for one block of rows at a time and never the whole cache."""
    asked = []
    k = torch.randn(1000, 2, 2, 8).half()

    def rows(a, e):
        asked.append((a, e))
        return k[a:e], k[a:e]

    cpu_decode_attention(torch.randn(2, 1, 4, 8), rows, 999, k[999:], k[999:], torch.zeros(2, 1000, dtype=torch.bool),
                         0.3, block=256)
    assert asked == [(0, 256), (256, 512), (512, 768), (768, 999)]
