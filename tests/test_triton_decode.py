"""The Triton decode-attention kernel, run by Triton's CPU interpreter, against the matmul path."""
import textwrap

import pytest
from interpreted import run_interpreted

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import os, torch
    os.environ["TRITON_INTERPRET"] = "1"
    from flexgen.engine import triton_decode as TD
    from flexgen.engine.attention import _dense_decode, _matmul_decode
    g = torch.Generator().manual_seed(0)
    # (b, heads, kv heads, head dim, positions): multi-head, grouped-query, a head dim that is not a
    # power of two, one position, more positions than one range, ranges split across programs
    for b, heads, kvh, d, S in [(3, 4, 4, 64, 70), (2, 8, 2, 80, 130), (1, 2, 1, 16, 1), (2, 16, 1, 32, 300)]:
        q = torch.randn(b, 1, heads, d, generator=g)
        # the CUDA-graph path's layout: (capacity, b, kv, d) rows read in place through a permute
        cache = torch.randn(S + 3, b, kvh, 2 * d, generator=g)
        k, v = (cache[:S, :, :, i * d:(i + 1) * d].permute(1, 0, 2, 3) for i in (0, 1))
        inv = torch.zeros(b, S, dtype=torch.bool)
        inv[0, :S // 2] = True
        if b > 1:
            inv[1, :S - 1] = True   # one real position left
        want = _matmul_decode(q, k, v, inv, d ** -0.5)
        assert not TD.usable(q, k, v)   # eager steps take the matmul path
        with TD.for_graphs():
            assert TD.usable(q, k, v)
            got = _dense_decode(q, k, v, inv, d ** -0.5)
        assert got.shape == want.shape and got.dtype == want.dtype
        err = (got - want).abs().max().item()
        assert err < 1e-5, (b, heads, kvh, d, S, err)
    assert TD._STATE == {"checked": True, "ok": True, "graphs": False}
    assert TD._splits(256, 9) == (3, 3) and TD._splits(1024, 9) == (1, 9) and TD._splits(64, 9) == (9, 1)
    # the operator has a meta implementation (the cost model counts on meta tensors)
    m = TD.decode_attention(*(torch.empty(x.shape, device="meta") for x in (q, k, v)),
                            torch.empty(inv.shape, dtype=torch.bool, device="meta"), 0.1)
    assert m.shape == q.shape and m.device.type == "meta"
    print("ok")
""")

WRONG = textwrap.dedent("""
    import os, warnings, torch
    os.environ["TRITON_INTERPRET"] = "1"
    from flexgen.engine import triton_decode as TD
    from flexgen.engine.attention import _dense_decode, _matmul_decode
    TD._launch = lambda q, k, v, inv, scale: torch.zeros_like(q)   # a kernel that is wrong
    q, k, v = torch.randn(2, 1, 4, 16), torch.randn(2, 9, 4, 16), torch.randn(2, 9, 4, 16)
    inv = torch.zeros(2, 9, dtype=torch.bool)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with TD.for_graphs():
            got = _dense_decode(q, k, v, inv, 0.25)
    assert torch.equal(got, _matmul_decode(q, k, v, inv, 0.25)) and "disagrees" in str(w[0].message)
    with TD.for_graphs():
        assert not TD.usable(q, k, v)   # the matmul path from now on
    print("ok")
""")


@pytest.mark.parametrize("script", [SCRIPT, WRONG], ids=["equal", "wrong-kernel-falls-back"])
def test_kernel_under_the_interpreter(script):
    run_interpreted(script)
