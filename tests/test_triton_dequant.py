"""The fused Triton unpacking kernel, run by Triton's CPU interpreter, against the PyTorch path."""
import os
import subprocess
import sys
import textwrap

import pytest

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
    print("ok")
""")


def test_kernel_equals_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
