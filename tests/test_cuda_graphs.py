"""The static decode step that CUDA graphs capture (engine/graphs.py), against the eager path and
transformers.

On the CPU the static step runs without capture (FLEXGEN_CUDA_GRAPHS=static): attention over the
cache's whole capacity with the unwritten rows masked, the new K/V row written at a device-tensor
position, mask and positions computed from device buffers. It must give the eager path's greedy
tokens and, in float32, transformers' (left padding, stop tokens, several GPU batches, blocks
that reuse the caches). On CUDA (FLEXGEN_TEST_DEVICE=cuda) the captured graphs are checked too.
"""
import numpy as np
import pytest
import torch

import tiny_models as T
from conftest import DEVICE_TYPE
from flexgen.engine import graphs
from flexgen.policy import PolicyError

MODELS = ["opt-tiny", "llama-tiny-gqa", "mistral-tiny-swa", "qwen2-tiny-tied-swa"]
STATIC = "static" if DEVICE_TYPE == "cpu" else "1"   # the capturable step; captured on CUDA


def assert_same_tokens(ours, eager):
    """Float32: identical. fp16 (CUDA): the masked reductions over the whole capacity round
    differently from the eager ones, which may flip a near tie (and what follows it)."""
    if DEVICE_TYPE == "cpu":
        np.testing.assert_array_equal(ours, eager)
    else:
        assert (ours == eager).mean() >= 0.9, (ours, eager)


def _generate(open_lm, name, policy, prompts, mode, monkeypatch, **kw):
    """(output ids, logprobs, the runner's graph key after the run) with FLEXGEN_CUDA_GRAPHS=mode."""
    monkeypatch.setenv(graphs.ENV_VAR, mode)
    with open_lm(name, policy) as lm:
        out, lp = lm.generate(prompts, return_logprobs=True, **kw)
        return out, lp, lm.runner.graphs.key


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("gbs,ngb", [(2, 1), (2, 3)])
def test_static_step_matches_eager_and_transformers(zoo, open_lm, monkeypatch, name, gbs, ngb):
    """Left-padded prompts of different lengths, one and several GPU batches, two blocks."""
    policy = T.make_policy("all_compute", gpu_batch_size=gbs, num_gpu_batches=ngb)
    pad = T.pad_id_of(name)
    prompts = T.make_prompts(2 * policy.block_size, 10, 320, pad, seed=7)   # two blocks of one shape
    eager, eager_lp, key = _generate(open_lm, name, policy, prompts, "0", monkeypatch, max_new_tokens=8)
    assert key is None
    out, lp, key = _generate(open_lm, name, policy, prompts, STATIC, monkeypatch, max_new_tokens=8)
    assert key == (gbs, ngb, 18), "the static path did not run"
    assert_same_tokens(out, eager)
    if DEVICE_TYPE == "cpu":
        np.testing.assert_allclose(lp, eager_lp, atol=1e-5)
    cmp = T.compare_to_reference(zoo.reference(name), T.family_of(name), out, 10, pad)
    T.assert_matches_reference(cmp, DEVICE_TYPE, what=f"{name} static decode")
    assert T.distinct_generated(out, 10) >= 3


def test_static_step_logits_close_to_transformers(zoo, open_lm, monkeypatch, record_logits):
    name = "llama-tiny-gqa"
    policy = T.make_policy("all_compute", gpu_batch_size=3, num_gpu_batches=1)
    pad = T.pad_id_of(name)
    prompts = T.make_prompts(3, 9, 320, pad, seed=2)
    out, _, key = _generate(open_lm, name, policy, prompts, STATIC, monkeypatch, max_new_tokens=6)
    assert key is not None
    ours = record_logits.by_row(policy, steps=6)
    theirs = T.teacher_forced_logits(zoo.reference(name), "llama", out, 9, pad)[:, 8:-1]
    T.assert_logits_close(ours, theirs, DEVICE_TYPE)


@pytest.mark.parametrize("name", ["opt-tiny", "llama-tiny-gqa"])
def test_stop_tokens(run_fidelity, open_lm, monkeypatch, name):
    """Sequences stop at different steps and whole GPU batches drop out (their graphs are then
    not replayed); the tokens are the eager path's."""
    policy = T.make_policy("all_compute", gpu_batch_size=1, num_gpu_batches=4)
    monkeypatch.setenv(graphs.ENV_VAR, "0")
    free, _ = run_fidelity(name, policy, seed=3, gen_len=10)
    gen = free[:, 10:]
    stop = [int(gen[0, 2]), int(gen[1, 5])]   # row 0 stops at step 2, row 1 at step 5 at the latest
    eager, _ = run_fidelity(name, policy, seed=3, gen_len=10, stop=stop)
    monkeypatch.setenv(graphs.ENV_VAR, STATIC)
    out, _ = run_fidelity(name, policy, seed=3, gen_len=10, stop=stop)
    assert_same_tokens(out, eager)
    assert (out[0, 13:] == T.pad_id_of(name)).all()


def test_teacher_forced_scores_match_eager(open_lm, monkeypatch):
    name = "opt-tiny"
    policy = T.make_policy("all_compute", gpu_batch_size=2, num_gpu_batches=2)
    pad = T.pad_id_of(name)
    prompts = T.make_prompts(4, 8, 320, pad, seed=4)
    cont = np.random.default_rng(0).integers(3, 320, size=(4, 5))
    res = {}
    for mode in ("0", STATIC):
        monkeypatch.setenv(graphs.ENV_VAR, mode)
        with open_lm(name, policy) as lm:
            res[mode] = lm.score_continuation(prompts, cont)
    np.testing.assert_allclose(res[STATIC], res["0"], atol=1e-5 if DEVICE_TYPE == "cpu" else 2e-2)


def test_caches_and_graphs_kept_for_blocks_of_one_shape(open_lm, monkeypatch):
    """A block of the same shape reuses the caches (and graphs); another shape replaces them; the
    model's close frees them."""
    monkeypatch.setenv(graphs.ENV_VAR, STATIC)
    name = "llama-tiny-gqa"
    policy = T.make_policy("all_compute", gpu_batch_size=2, num_gpu_batches=2)
    pad = T.pad_id_of(name)
    p1 = T.make_prompts(4, 10, 320, pad, seed=1)
    p2 = T.make_prompts(4, 10, 320, pad, seed=2)
    with open_lm(name, policy) as lm:
        g = lm.runner.graphs
        a = lm.generate(p1, max_new_tokens=6)
        caches = dict(g.caches)
        batches = dict(g.batches)
        b = lm.generate(p2, max_new_tokens=6)
        assert all(g.caches[key] is c for key, c in caches.items())
        assert all(g.batches[k] is x for k, x in batches.items())
        again = lm.generate(p1, max_new_tokens=6)   # stale rows of the last block change nothing
        assert_same_tokens(again, a)
        lm.generate(p1, max_new_tokens=4)
        assert g.key == (2, 2, 14) and all(c.k.segments == [] for c in caches.values())
        lm.generate(p1, max_new_tokens=1)   # prefill only, eager: the graphs' caches are freed before its own
        assert g.key is None
    assert g.key is None and g.caches == {} and g.batches == {}
    monkeypatch.setenv(graphs.ENV_VAR, "0")
    with open_lm(name, policy) as lm:
        assert_same_tokens(b, lm.generate(p2, max_new_tokens=6))


@pytest.mark.parametrize("name", ["opt-tiny", "llama-tiny-gqa", "mistral-tiny-swa"])
@pytest.mark.parametrize("bits,weight,cache", [(4, True, True), (8, False, True), (4, True, False)])
def test_static_step_with_packed_weights_and_cache_matches_eager(open_lm, monkeypatch, name, bits, weight, cache):
    """Packed weights and a packed KV cache on the compute device: the static step unpacks the
    weights layer by layer, stores the new K/V row quantised at a device-tensor position, unpacks
    the whole capacity and attends the new row at full precision, as the eager step does."""
    from flexgen.policy import CompressionConfig
    policy = T.make_policy("all_compute", gpu_batch_size=2, num_gpu_batches=2, compress_weight=weight,
                           compress_cache=cache, comp_weight_config=CompressionConfig(bits, 16, 1, False),
                           comp_cache_config=CompressionConfig(bits, 8, 2, bits == 8))
    pad = T.pad_id_of(name)
    prompts = T.make_prompts(2 * policy.block_size, 10, 320, pad, seed=5)   # two blocks: the caches reused
    eager, eager_lp, key = _generate(open_lm, name, policy, prompts, "0", monkeypatch, max_new_tokens=8)
    assert key is None
    out, lp, key = _generate(open_lm, name, policy, prompts, "static" if DEVICE_TYPE == "cpu" else "packed",
                             monkeypatch, max_new_tokens=8)
    assert key == (2, 2, 18), "the static path did not run"
    assert_same_tokens(out, eager)
    if DEVICE_TYPE == "cpu":
        # a packed cache quantises each new row: the static step's longer masked sums differ from
        # the eager ones in the last bit (1e-6 here), and where that moves a value across a code
        # boundary the row differs by one quantisation step (5e-4 in a logprob, 8 bits, 2 x 2)
        np.testing.assert_allclose(lp, eager_lp, atol=5e-3 if cache else 1e-5)
    assert T.distinct_generated(out, 10) >= 3


@pytest.mark.parametrize("placement,overrides,why", [
    ("weights_cpu_disk", {}, "weights"),
    ("cache_disk", {}, "cache"),
    ("weights_cpu_disk", {"compress_weight": True}, "weights"),
    ("cache_disk", {"compress_cache": True}, "cache"),
    ("act_disk", {}, "activations"),
    ("all_compute", {"attn_sparsity": 0.5}, "sparse"),
])
def test_ineligible_blocks_run_eagerly(open_lm, monkeypatch, placement, overrides, why):
    monkeypatch.setenv(graphs.ENV_VAR, "static")
    policy = T.make_policy(placement, **overrides)
    with open_lm("opt-tiny", policy) as lm:
        assert why in graphs.ineligible(lm.runner)
        lm.generate(T.make_prompts(4, 6, 320, T.pad_id_of("opt-tiny")), max_new_tokens=3)
        assert lm.runner.graphs.key is None


def test_moe_runs_eagerly(open_lm, monkeypatch):
    monkeypatch.setenv(graphs.ENV_VAR, "static")
    with open_lm("mixtral-tiny", T.make_policy("all_compute")) as lm:
        assert "experts" in graphs.ineligible(lm.runner)
        lm.generate(T.make_prompts(4, 6, 320, 0), max_new_tokens=3)
        assert lm.runner.graphs.key is None


def test_switches(open_lm, monkeypatch):
    """FLEXGEN_CUDA_GRAPHS and ExecutionEnv.cuda_graphs; a bad value is a clear error."""
    prompts = T.make_prompts(4, 6, 320, T.pad_id_of("opt-tiny"))
    with open_lm("opt-tiny", T.make_policy("all_compute")) as lm:
        monkeypatch.delenv(graphs.ENV_VAR, raising=False)   # default: graphs only on CUDA
        lm.generate(prompts, max_new_tokens=3)
        assert (lm.runner.graphs.key is not None) == (DEVICE_TYPE == "cuda")
        lm.runner.close()
        monkeypatch.setenv(graphs.ENV_VAR, "static")
        lm.env.cuda_graphs = False
        lm.generate(prompts, max_new_tokens=3)
        assert lm.runner.graphs.key is None
        lm.env.cuda_graphs = True
        monkeypatch.setenv(graphs.ENV_VAR, "yes please")
        with pytest.raises(PolicyError, match="FLEXGEN_CUDA_GRAPHS"):
            lm.generate(prompts, max_new_tokens=3)


def test_cli_flag():
    import argparse
    from flexgen.cli import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser, "facebook/opt-125m", "_DUMMY_")
    assert parser.parse_args([]).cuda_graphs is True
    assert parser.parse_args(["--no-cuda-graphs"]).cuda_graphs is False


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["opt-tiny", "llama-tiny-gqa", "mistral-tiny-swa"])
def test_captured_graphs_match_static_step(open_lm, monkeypatch, name):
    """On CUDA: replayed graphs give what the same static step gives run eagerly (the same
    kernels on the same values: equal tokens, logprobs within a rounding)."""
    policy = T.make_policy("all_compute", gpu_batch_size=2, num_gpu_batches=2)
    prompts = T.make_prompts(8, 10, 320, T.pad_id_of(name), seed=9)
    static, static_lp, _ = _generate(open_lm, name, policy, prompts, "static", monkeypatch, max_new_tokens=8)
    out, lp, key = _generate(open_lm, name, policy, prompts, "1", monkeypatch, max_new_tokens=8)
    assert key is not None
    assert_same_tokens(out, static)
    if (out == static).all():
        np.testing.assert_allclose(lp, static_lp, atol=1e-3)


def test_prepare_leaves_the_shape_ready(open_lm, monkeypatch):
    """The CLI's warm-up (runner.prepare) opens, steps twice and closes a block of the benchmark's
    shape: the next block of that shape reuses its caches and gives the tokens it would anyway."""
    monkeypatch.setenv(graphs.ENV_VAR, STATIC)
    name = "opt-tiny"
    policy = T.make_policy("all_compute", gpu_batch_size=2, num_gpu_batches=2)
    prompts = T.make_prompts(4, 10, 320, T.pad_id_of(name), seed=5)
    with open_lm(name, policy) as lm:
        r = lm.runner
        assert r.graph_mode(6) == STATIC.replace("1", "graph") and r.graph_mode(1) is None
        r.prepare(prompts, prompts != T.pad_id_of(name), 6, T.pad_id_of(name))
        assert r.timings["decode"] == [] and r.graphs.key == (2, 2, 16) and not r.graphs.in_use
        caches = dict(r.graphs.caches)
        out = lm.generate(prompts, max_new_tokens=6)
        assert all(r.graphs.caches[k] is c for k, c in caches.items())
    monkeypatch.setenv(graphs.ENV_VAR, "0")
    with open_lm(name, policy) as lm:
        assert lm.runner.graph_mode(6) is None
        assert_same_tokens(out, lm.generate(prompts, max_new_tokens=6))


@pytest.mark.skipif(DEVICE_TYPE != "cpu", reason="replaces torch.cuda's capture with a fake")
def test_failed_capture_decodes_on_without_graphs(open_lm, monkeypatch):
    """A step that cannot be captured (simulated: CUDA's capture refuses) keeps the warm-up's
    result, warns once and decodes on with the static step: the same tokens, no crash."""
    import contextlib
    from flexgen.engine import schedule

    class Stream:
        def __init__(self, *a):
            pass

        def wait_stream(self, other):
            pass

    made = []

    class RefusingGraph:
        def __init__(self):
            made.append(self)

        def capture_begin(self, **kw):
            pass

        def capture_end(self):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", RefusingGraph)
    name = "llama-tiny-gqa"
    policy = T.make_policy("all_compute", gpu_batch_size=2, num_gpu_batches=2)
    prompts = T.make_prompts(8, 10, 320, T.pad_id_of(name), seed=6)
    monkeypatch.setenv(graphs.ENV_VAR, "0")
    with open_lm(name, policy) as lm:
        eager = lm.generate(prompts, max_new_tokens=6)
    monkeypatch.setattr(schedule, "graph_mode", lambda env: "graph")
    with open_lm(name, policy) as lm:
        with pytest.warns(UserWarning, match="capture failed"):
            out = lm.generate(prompts, max_new_tokens=6)
        assert "not permitted" in lm.runner.graphs.failed and len(made) == 1
        again = lm.generate(prompts, max_new_tokens=6)
        assert len(made) == 1, "a runner whose capture failed must not try again"
    assert_same_tokens(out, eager)
    assert_same_tokens(again, eager)


def test_failure_mid_decode_frees_the_graphs(open_lm, monkeypatch):
    """Running out of memory in a static / graph decode step ends that generate with the error;
    the block's caches and graphs are dropped, and the next generate starts afresh."""
    monkeypatch.setenv(graphs.ENV_VAR, STATIC)
    name = "opt-tiny"
    prompts = T.make_prompts(4, 10, 320, T.pad_id_of(name), seed=8)
    real = graphs.DecodeGraphs.step
    calls = []

    def step(self, blk, i, skip):
        calls.append(i)
        if i == 2 and len(calls) < 4:
            raise MemoryError("cannot allocate 1.50 GiB")
        return real(self, blk, i, skip)

    with open_lm(name, T.make_policy("all_compute")) as lm:
        monkeypatch.setattr(graphs.DecodeGraphs, "step", step)
        with pytest.raises(MemoryError):
            lm.generate(prompts, max_new_tokens=6)
        g = lm.runner.graphs
        assert g.key is None and g.caches == {} and not g.in_use
        out = lm.generate(prompts, max_new_tokens=6)
        assert g.key is not None
    monkeypatch.setenv(graphs.ENV_VAR, "0")
    with open_lm(name, T.make_policy("all_compute")) as lm:
        assert_same_tokens(out, lm.generate(prompts, max_new_tokens=6))
