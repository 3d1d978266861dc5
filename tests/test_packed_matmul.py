"""F.linear over packed 4-bit weights (flexgen/memory/packed_matmul.py): the kernel under Triton's
CPU interpreter against unpack + F.linear, the families' other uses of a packed matrix, the
fallback when the kernel is wrong, and whole generations through the engine with it and without."""
import os
import textwrap

import numpy as np
import pytest
import torch

import tiny_models
from conftest import DEVICE_TYPE
from interpreted import run_interpreted
from flexgen.policy import CompressionConfig

pytest.importorskip("triton")

KERNEL = textwrap.dedent("""
    import os, warnings, torch
    os.environ["TRITON_INTERPRET"] = "1"
    import torch.nn.functional as F
    from flexgen.memory import packed_matmul as PM
    from flexgen.memory.compression import compress, decompress
    from flexgen.memory.placement import Deferred
    from flexgen.policy import CompressionConfig
    g = torch.Generator().manual_seed(0)
    # (rows, out, in, group): rows over one M tile, in not a multiple of the group or of the K step,
    # one row, a K long enough to be split across programs
    for sym in (False, True):
        for m, n, k, gs in [(3, 40, 96, 16), (17, 70, 66, 16), (1, 5, 130, 64), (20, 130, 1024, 64), (2, 9, 300, 4)]:
            w, x, b = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(n, generator=g)
            p = compress(w, CompressionConfig(4, gs, 1, sym))
            assert PM.fits(p)
            want = F.linear(x, decompress(p, torch.float32), b)
            got = PM._fused(x, p, b)
            assert got.shape == want.shape and got.dtype == want.dtype
            err = (got - want).abs().max().item()
            assert err < 1e-4 * want.abs().max().item(), (sym, m, n, k, gs, err)
            # the families' view: F.linear reads it packed, leading dims kept; other uses unpack
            pm = PM.PackedMatrix(Deferred(p, torch.float32))
            x3 = x.reshape(1, m, k)
            assert torch.allclose(F.linear(x3, pm, b), want.reshape(1, m, n), atol=1e-4 * want.abs().max().item())
            ids = torch.tensor([0, n - 1])
            assert torch.equal(F.embedding(ids, pm), decompress(p, torch.float32)[ids])
    assert PM._STATE == {"checked": True, "ok": True}, PM._STATE
    # more rows than a decode step (prefill): unpack + F.linear, the kernel not called
    calls = []
    fused = PM._fused
    PM._fused = lambda *a: calls.append(1) or fused(*a)
    p = compress(torch.randn(8, 32, generator=g), CompressionConfig(4, 16, 1, False))
    pm = PM.PackedMatrix(Deferred(p, torch.float32))
    x = torch.randn(PM.MAX_ROWS + 1, 32, generator=g)
    assert torch.equal(F.linear(x, pm), F.linear(x, decompress(p, torch.float32))) and not calls
    F.linear(x[:2], pm)
    assert calls == [1]
    PM._fused = fused
    # not this kernel's layout: groups along dim 0, or 8 bits
    assert not PM.fits(compress(torch.randn(8, 32), CompressionConfig(4, 16, 0, False)))
    assert not PM.fits(compress(torch.randn(8, 32), CompressionConfig(8, 16, 1, False)))
    assert not isinstance(PM.for_compute(Deferred(compress(torch.randn(8, 32), CompressionConfig(4, 16, 0, False)),
                                                  torch.float32)), PM.PackedMatrix)
    os.environ[PM.ENV_VAR] = "0"
    assert isinstance(PM.for_compute(Deferred(p, torch.float32)), torch.Tensor)
    os.environ[PM.ENV_VAR] = "x"
    try:
        PM.enabled()
        raise AssertionError("a bad flag must be refused")
    except ValueError as e:
        assert PM.ENV_VAR in str(e)
    del os.environ[PM.ENV_VAR]
    # a kernel that is wrong: one warning, then unpack + F.linear
    PM._STATE.update(checked=False, ok=False)
    PM._launch = lambda x2, p, N, K: torch.zeros(x2.shape[0], N)
    pm = PM.PackedMatrix(Deferred(p, torch.float32))
    x = torch.randn(3, 32, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = F.linear(x, pm)
    assert torch.equal(got, F.linear(x, decompress(p, torch.float32)))
    assert any("disagrees" in str(w.message) for w in caught) and PM._STATE == {"checked": True, "ok": False}
    print("ok")
""")

ENGINE = textwrap.dedent("""
    import os, sys, tempfile, numpy as np, torch
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    import tiny_models
    from flexgen.flex_opt import ExecutionEnv
    from flexgen.memory import packed_matmul as PM
    from flexgen.policy import CompressionConfig
    from conftest import lm_class
    root = tempfile.mkdtemp()
    calls = []
    fused = PM._fused
    PM._fused = lambda *a: calls.append(1) or fused(*a)
    for name in ("opt-tiny", "llama-tiny-gqa"):
        family, kw = tiny_models.SPECS[name]
        ckpt = os.path.join(root, name)
        tiny_models.build_checkpoint(name, ckpt)
        prompts = tiny_models.make_prompts(3, 8, kw["vocab_size"], tiny_models.pad_id_of(name), seed=3)
        outs = {{}}
        # (kernel flag, placement, GPU batches, CUDA-graph flag, whether the kernel runs): an eager
        # step reads packed weights for one GPU batch; several share one unpacked matrix; the
        # static (capturable) step reads them packed whatever the number of batches
        runs = [("0", "all_compute", 1, "1", False), ("1", "all_compute", 1, "1", True), ("1", "mixed", 1, "1", True)]
        if name == "opt-tiny":
            runs += [("1", "all_compute", 2, "1", False), ("1", "all_compute", 2, "static", True)]
        for flag, placement, ngb, graphs, used in runs:
            os.environ[PM.ENV_VAR] = flag
            os.environ["FLEXGEN_CUDA_GRAPHS"] = graphs
            policy = tiny_models.make_policy(placement, num_gpu_batches=ngb, compress_weight=True,
                                             comp_weight_config=CompressionConfig(4, 16, 1, False))
            env = ExecutionEnv.create(os.path.join(root, "offload"), device="cpu")
            lm = lm_class(family)(ckpt, env, os.path.join(root, "cache"), policy, progress=False)
            try:
                n = len(calls)
                outs[(flag, placement, ngb, graphs)] = lm.generate(prompts, max_new_tokens=5)
                assert (len(calls) > n) == used, (name, flag, placement, ngb, graphs, len(calls) - n)
            finally:
                lm.close()
                env.close_copy_threads()
        base = outs[("0", "all_compute", 1, "1")]
        for key, out in outs.items():
            assert np.array_equal(out, base), (name, key)
    print("ok")
""")


def _triton_version():
    import triton
    return tuple(int(x) for x in triton.__version__.split(".")[:2])


# Triton 3.6's interpreter (the lent GPU machine's) cannot run a loop with a runtime bound; the
# compiled kernel runs there, and its GPU tests below cover it
@pytest.mark.skipif(_triton_version() < (3, 7), reason="Triton's interpreter before 3.7: no runtime loop bounds")
@pytest.mark.parametrize("script", ["kernel", "engine"])
def test_under_the_interpreter(script):
    code = KERNEL if script == "kernel" else ENGINE.format(tests=os.path.dirname(__file__))
    run_interpreted(code, timeout=900, drop_env=("FLEXGEN_PACKED_MATMUL", "FLEXGEN_CUDA_GRAPHS"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["opt-tiny", "llama-tiny-gqa"])
def test_gpu_generation_with_and_without_the_kernel(open_lm, monkeypatch, name):
    """On the GPU (fp16): the packed matmul is used for decode steps, and the tokens are those of
    unpack + cuBLAS, but for at most one sequence where fp16 sums in another order break a near-tie
    of the tiny random model."""
    from flexgen.memory import packed_matmul as PM
    family, kw = tiny_models.SPECS[name]
    prompts = tiny_models.make_prompts(8, 10, kw["vocab_size"], tiny_models.pad_id_of(name), seed=3)
    calls = []
    fused = PM._fused
    monkeypatch.setattr(PM, "_fused", lambda *a: calls.append(1) or fused(*a))
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(PM.ENV_VAR, flag)
        policy = tiny_models.make_policy("all_compute", compress_weight=True,
                                         comp_weight_config=CompressionConfig(4, 16, 1, False))
        with open_lm(name, policy) as lm:
            outs[flag] = lm.generate(prompts, max_new_tokens=8)
        assert bool(calls) == (flag == "1")
    assert PM._STATE["ok"]
    differs = [i for i in range(len(prompts)) if not np.array_equal(outs["0"][i], outs["1"][i])]
    assert len(differs) <= 1, differs


def test_cpu_runs_never_take_the_kernel(open_lm):
    """On the CPU without the interpreter, packed matrices are unpacked as before."""
    from flexgen.memory import packed_matmul as PM
    from flexgen.memory.compression import compress
    from flexgen.memory.placement import Deferred
    p = compress(torch.randn(8, 32), CompressionConfig(4, 16, 1, False))
    got = PM.for_compute(Deferred(p, torch.float32))
    assert isinstance(got, torch.Tensor) or DEVICE_TYPE == "cuda"
