"""The fused Triton unpacking kernel, run by Triton's CPU interpreter, against the PyTorch path."""
import textwrap

import pytest
from interpreted import run_interpreted

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import os, torch
    os.environ["TRITON_INTERPRET"] = "1"
    from flexgen.memory import triton_dequant
    from flexgen.memory.compression import compress, _decompress_torch
    from flexgen.policy import CompressionConfig
    g = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        for sym in (False, True):
            for dim in (0, 1):
                for shape in [(96, 40), (33, 70), (1, 2)]:
                    cfg = CompressionConfig(bits, 16 if shape != (1, 2) else 2, dim, sym)
                    x = torch.randn(shape, generator=g) * 2
                    p = compress(x, cfg)
                    assert triton_dequant.usable(p, shape)
                    got = triton_dequant._launch(p, torch.float32, shape)
                    want = _decompress_torch(p, torch.float32, shape)
                    assert torch.equal(got, want), (bits, sym, dim, shape, (got - want).abs().max())
    # each kernel is checked against the reference the first time it runs, and trusted only then
    import warnings
    x = torch.randn(64, 48, generator=g)
    for dim in (0, 1):
        p = compress(x, CompressionConfig(4, 16, dim, False))
        got = triton_dequant.unpack(p, torch.float32, (64, 48), _decompress_torch)
        assert torch.equal(got, _decompress_torch(p, torch.float32, (64, 48)))
    assert triton_dequant._STATE["ok"] == {"generic", "rows"}, triton_dequant._STATE
    triton_dequant._STATE["checked"].clear()
    triton_dequant._STATE["ok"].clear()
    good = triton_dequant._launch
    triton_dequant._launch = lambda p, dtype, shape, out=None: torch.zeros(shape, dtype=dtype)   # a broken kernel
    p = compress(x, CompressionConfig(4, 16, 1, False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = triton_dequant.unpack(p, torch.float32, (64, 48), _decompress_torch)
    assert torch.equal(got, _decompress_torch(p, torch.float32, (64, 48)))   # the PyTorch path served
    assert "rows" not in triton_dequant._STATE["ok"] and any("(rows) disagrees" in str(w.message) for w in caught)
    triton_dequant._launch = good
    print("ok")
""")


def test_kernel_equals_reference_under_interpreter():
    run_interpreted(SCRIPT)


@pytest.mark.gpu
def test_gpu_kernel_matches_pytorch_path():
    """On a CUDA device the compiled kernel gives exactly the PyTorch path's values."""
    import torch

    from flexgen.memory import triton_dequant
    from flexgen.memory.compression import _decompress_torch, compress
    from flexgen.policy import CompressionConfig
    g = torch.Generator(device="cuda").manual_seed(0)
    for bits, sym, dim in [(4, False, 0), (4, False, 1), (4, True, 0), (8, False, 0)]:
        for shape in [(7168, 7168), (28672, 8192), (130, 66)]:
            cfg = CompressionConfig(bits, 64 if shape[0] > 200 else 2, dim, sym)
            p = compress(torch.randn(shape, device="cuda", generator=g, dtype=torch.float16), cfg)
            assert triton_dequant.usable(p, shape)
            got = triton_dequant._launch(p, torch.float16, shape)
            assert torch.equal(got, _decompress_torch(p, torch.float16, shape)), (bits, sym, dim, shape)


@pytest.mark.gpu
def test_gpu_kernel_unpacks_a_kv_cache_as_rows():
    """A packed KV cache (groups along the head dim, its last) goes through the kernel as a matrix."""
    import torch

    from flexgen.memory.compression import _decompress_torch, compress, decompress
    from flexgen.policy import CompressionConfig
    x = torch.randn(37, 4, 3, 128, device="cuda", dtype=torch.float16)
    for bits, sym in [(4, False), (8, True)]:
        p = compress(x, CompressionConfig(bits, 64, 3, sym))
        rows = p.with_parts([t[:20] for t in p.parts()])
        got = decompress(rows, torch.float16, (20, 4, 3, 128))
        want = _decompress_torch(rows, torch.float16, (20, 4, 3, 128))
        assert torch.allclose(got.float(), want.float(), rtol=2 ** -10, atol=1e-7)
