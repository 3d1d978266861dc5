"""CPU decode attention over a packed (4/8-bit group-quantised) heads-major cache with scale and
min folded into the products (cpu_attention._PackedMatrices: the native C kernel of cpu_packed.py
and its PyTorch version) against the path that dequantises each chunk and then multiplies."""
import subprocess
import sys

import pytest
import torch

from flexgen.engine import cpu_attention, cpu_packed
from flexgen.engine.cpu_attention import cpu_decode_attention, packed_chunks
from flexgen.memory.compression import compress
from flexgen.policy import CompressionConfig

KERNELS = ["torch"] + (["native"] if cpu_packed.library() is not None else [])


def packed_case(b, heads, kv_heads, n_past, d, cfg, spare=0, seed=0):
    """A packed heads-major store of n_past + spare positions (parts (b, g, S, groups, ...) seen as
    (S, b, g, ...)), cut to the n_past written rows as the engine passes it; a query, the new
    token's K/V, and a mask with left padding, a row where only the new token is real."""
    g = torch.Generator().manual_seed(seed)
    cap = n_past + spare
    k, v = (torch.randn(b, kv_heads, cap, d, generator=g) * 2 for _ in range(2))
    phys = CompressionConfig(cfg.num_bits, cfg.group_size, -1, cfg.symmetric)
    parts = [[t.movedim(2, 0)[:n_past] for t in compress(x, phys).parts()] for x in (k, v)]
    q = torch.randn(b, 1, heads, d, generator=g)
    new = [torch.randn(1, b, kv_heads, d, generator=g) for _ in range(2)]
    invalid = torch.zeros(b, n_past + 1, dtype=torch.bool)
    invalid[1 % b, : n_past // 2] = True
    invalid[2 % b, : n_past] = True
    return q, parts, new, invalid


def attend(q, parts, new, invalid, cfg, d, kernel, workers=None):
    past = packed_chunks(parts[0], parts[1], cfg, d, kernel=kernel)
    n_past = parts[0][0].shape[0]
    return cpu_decode_attention(q, past, n_past, new[0], new[1], invalid, d ** -0.5, workers)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits,gs,sym", [(4, 64, False), (4, 32, True), (4, 128, False), (4, 8, False),
                                         (8, 64, False), (8, 16, True)])
@pytest.mark.parametrize("heads,kv_heads,n_past,d", [(8, 2, 37, 128), (4, 4, 1, 64), (6, 3, 129, 48),
                                                     (16, 1, 65, 128), (36, 2, 19, 64)])
def test_folded_kernel_matches_unpack_then_attend(kernel, bits, gs, sym, heads, kv_heads, n_past, d):
    """Odd lengths, GQA (up to 18 query heads per kv head: more than the native kernel takes at
    once), a head dim padded up to whole groups, masked rows: the same dequantised numbers summed
    in another order."""
    cfg = CompressionConfig(bits, gs, 3, sym)
    q, parts, new, invalid = packed_case(3, heads, kv_heads, n_past, d, cfg, seed=n_past + bits)
    want = attend(q, parts, new, invalid, cfg, d, "unpack")
    got = attend(q, parts, new, invalid, cfg, d, kernel)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_folded_products_are_the_dequantised_ones(kernel):
    """scores and p @ v of one chunk, before any softmax: exactly the products of the values."""
    cfg = CompressionConfig(4, 32, 3, False)
    q, parts, _, _ = packed_case(2, 8, 2, 23, 64, cfg)
    past = packed_chunks(parts[0], parts[1], cfg, 64, kernel=kernel)
    k, v = past(1, 4)
    vals_k, vals_v = k.values().clone(), v.values().clone()
    qs = torch.randn(3, 4, 64)
    torch.testing.assert_close(k.scores(qs), torch.bmm(qs, vals_k.transpose(1, 2)), rtol=1e-4, atol=1e-4)
    p = torch.rand(3, 4, 23)
    torch.testing.assert_close(v.weighted(p), torch.bmm(p, vals_v), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("workers", [1, 2, 5])
def test_workers_and_chunks_agree(kernel, workers, monkeypatch):
    cfg = CompressionConfig(4, 64, 3, False)
    q, parts, new, invalid = packed_case(5, 8, 4, 70, 128, cfg, seed=4)
    want = attend(q, parts, new, invalid, cfg, 128, "unpack", workers=1)
    monkeypatch.setattr(cpu_attention, "CHUNK_ELEMS", 3 * 70 * 128)     # several chunks per worker
    monkeypatch.setattr(cpu_attention, "UNPACK_ELEMS", 2 * 70 * 128)
    got = attend(q, parts, new, invalid, cfg, 128, kernel, workers=workers)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_default_kernel_and_bad_name(monkeypatch):
    cfg = CompressionConfig(4, 64, 3, False)
    _, parts, _, _ = packed_case(2, 4, 2, 5, 64, cfg)
    past = packed_chunks(parts[0], parts[1], cfg, 64)
    assert past.kernel == ("native" if cpu_packed.library() is not None else "torch")
    assert past.one_core == (past.kernel == "native")
    # a heads-major store goes to the native kernel a whole chunk per call
    assert hasattr(past, "attend") == (past.kernel == "native")
    with pytest.raises(ValueError, match="auto, native, torch or unpack"):
        packed_chunks(parts[0], parts[1], cfg, 64, kernel="fast")
    monkeypatch.setenv("FLEXGEN_CPU_PACKED_KERNEL", "unpack")
    assert packed_chunks(parts[0], parts[1], cfg, 64).kernel == "unpack"
    monkeypatch.setenv("FLEXGEN_CPU_PACKED_KERNEL", "fast")
    with pytest.warns(UserWarning, match="using auto"):
        assert packed_chunks(parts[0], parts[1], cfg, 64).kernel in ("native", "torch")


@pytest.mark.skipif(cpu_packed.library() is None, reason="no native kernel on this machine")
def test_native_kernel_takes_only_its_layout():
    """Packed rows whose matrices' rows are not contiguous (a position-major store) go to the
    PyTorch version (asked for the native kernel by name: a clear error), with the same result;
    a chunk of them handed to the native kernel anyway is multiplied by the PyTorch version."""
    cfg = CompressionConfig(4, 16, 3, False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 2, 3, 32, generator=g)                    # (n, b, g, d) position-major
    parts = compress(x, cfg).parts()
    assert packed_chunks(parts, parts, cfg, 32).kernel == "torch"
    with pytest.raises(ValueError, match="heads-major"):
        packed_chunks(parts, parts, cfg, 32, kernel="native")
    k, _ = packed_chunks(parts, parts, cfg, 32, kernel="torch")(0, 6)
    k.kernel = "native"
    assert not cpu_packed.laid_out(k.data, k.scale, k.mn) and k._native() is None
    qs = torch.randn(6, 2, 32, generator=g)
    torch.testing.assert_close(k.scores(qs), torch.bmm(qs, k.values().clone().transpose(1, 2)), rtol=1e-5, atol=1e-5)


def run_fresh(code, env):
    """code in a new interpreter (the kernel is loaded once per process)."""
    import os
    full = {**os.environ, "PYTHONPATH": ".", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


CHECK = ("import warnings, torch; warnings.simplefilter('always')\n"
         "from flexgen.engine import cpu_packed\n"
         "from flexgen.engine.cpu_attention import packed_chunks\n"
         "from flexgen.memory.compression import compress\n"
         "from flexgen.policy import CompressionConfig\n"
         "cfg = CompressionConfig(4, 64, 3, False)\n"
         "parts = [t[None] for t in compress(torch.randn(4, 2, 128), cfg).parts()]\n"
         "print('KERNEL', packed_chunks(parts, parts, cfg, 128).kernel, cpu_packed.unavailable())\n")


def test_without_a_compiler_it_falls_back(tmp_path):
    r = run_fresh(CHECK, {"CC": "/nonexistent/cc", "FLEXGEN_KERNEL_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "KERNEL torch" in r.stdout and "using the PyTorch version" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_fresh(CHECK, {"FLEXGEN_CPU_PACKED_KERNEL": "torch"})
    assert "KERNEL torch FLEXGEN_CPU_PACKED_KERNEL=torch" in r.stdout and "Warning" not in r.stderr
