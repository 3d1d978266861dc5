"""The fused Triton packing kernel (flexgen/memory/triton_quant.py): byte for byte the PyTorch path and
the plain reference sequence, under Triton's CPU interpreter and compiled on the GPU."""
import textwrap

import pytest
from interpreted import run_interpreted

pytest.importorskip("triton")

CASES = textwrap.dedent("""
    def cases(torch, g, device):
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            for bits in (4, 8):
                for shape, gs in [((3, 5, 64), 64), ((2, 7, 4, 128), 64), ((33, 32), 16), ((4, 2), 2)]:
                    x = (torch.randn(shape, generator=g, device=device) * 3).to(dt)
                    x.view(-1)[:gs] = 1.5                                   # a constant group: scale 0
                    x.view(-1)[gs:2 * gs] = torch.arange(gs, device=device) * 0.5   # halves: rounding ties
                    yield dt, bits, shape, x, CompressionConfig(bits, gs, len(shape) - 1, False)
""")

SCRIPT = CASES + textwrap.dedent("""
    import os, warnings, torch
    os.environ["TRITON_INTERPRET"] = "1"
    from flexgen.memory import triton_quant
    from flexgen.memory.compression import compress, _pack_torch, _compress_reference
    from flexgen.policy import CompressionConfig
    for dt, bits, shape, x, cfg in cases(torch, torch.Generator().manual_seed(0), "cpu"):
        assert triton_quant.usable(x, cfg)
        got = triton_quant._launch(x, cfg)
        for a, b, c in zip(got, _pack_torch(x, cfg), _compress_reference(x, cfg).parts()):
            assert a.shape == b.shape and torch.equal(a, b) and torch.equal(b, c), (dt, bits, shape)
    # what the kernel does not take: padding, groups along another dim, symmetric, a strided view
    x = torch.randn(6, 40)
    assert not triton_quant.usable(x, CompressionConfig(4, 16, 1, False))
    assert not triton_quant.usable(x, CompressionConfig(4, 2, 0, False))
    assert not triton_quant.usable(x, CompressionConfig(4, 8, 1, True))
    assert not triton_quant.usable(x[:, :32], CompressionConfig(4, 8, 1, False))
    # compress() checks the kernel once per dtype and width and then uses it
    x = torch.randn(8, 64)
    cfg = CompressionConfig(4, 16, 1, False)
    assert torch.equal(compress(x, cfg).data, _compress_reference(x, cfg).data)
    assert triton_quant._STATE["ok"] == {(torch.float32, 4)}, triton_quant._STATE
    # a kernel that disagrees is not trusted: the PyTorch path serves, with a warning
    triton_quant._STATE["checked"].clear(); triton_quant._STATE["ok"].clear()
    good = triton_quant._launch
    triton_quant._launch = lambda x, cfg: [torch.zeros_like(t) for t in _pack_torch(x, cfg)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = compress(x, cfg)
        p2 = compress(x, cfg)
    assert torch.equal(p.data, _compress_reference(x, cfg).data) and torch.equal(p2.data, p.data)
    assert not triton_quant._STATE["ok"] and sum("disagrees" in str(w.message) for w in caught) == 1
    triton_quant._launch = good
    print("ok")
""")


def test_kernel_bytes_equal_reference_under_interpreter():
    run_interpreted(SCRIPT)


@pytest.mark.gpu
def test_gpu_kernel_bytes_equal_pytorch_path():
    """Compiled on the GPU: the same bytes as the PyTorch path, at the tests' shapes and a prefill's
    KV rows (OPT-30B, 16 x 512 tokens, K and V stacked); compress() trusts it after its check."""
    import torch

    from flexgen.memory import triton_quant
    from flexgen.memory.compression import _pack_torch, compress
    from flexgen.policy import CompressionConfig
    ns = {"CompressionConfig": CompressionConfig}
    exec(CASES, ns)
    g = torch.Generator(device="cuda").manual_seed(0)
    for dt, bits, shape, x, cfg in ns["cases"](torch, g, "cuda"):
        assert triton_quant.usable(x, cfg)
        for a, b in zip(triton_quant._launch(x, cfg), _pack_torch(x, cfg)):
            assert a.shape == b.shape and torch.equal(a, b), (dt, bits, shape)
    x = torch.randn(2, 512, 16, 56, 128, device="cuda", dtype=torch.float16, generator=g)
    cfg = CompressionConfig(4, 64, 4, False)
    p = compress(x, cfg)
    assert (torch.float16, 4) in triton_quant._STATE["ok"]
    for a, b in zip(p.parts(), _pack_torch(x, cfg)):
        assert torch.equal(a, b)
