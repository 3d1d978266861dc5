"""The weight cache follows the compute dtype: FlexGen's float16 cache (`<name>-np`, the original's
layout) for float16 compute, a float32 one (`<name>-np-float32`) for float32 compute, so that CPU
runs keep a float32 checkpoint's exact values and give transformers' float32 answers."""
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import tiny_models as T
from flexgen.engine import generate as G
from flexgen.flex_llama import ExecutionEnv, LlamaLM

NAME = "llama-tiny"


@pytest.fixture(scope="module")
def unrounded(tmp_path_factory):
    """A float32 checkpoint whose weights float16 cannot hold."""
    d = tmp_path_factory.mktemp("wide") / NAME
    T.build_checkpoint(NAME, d, round_fp16=False)
    return d


def _tensors(d):
    return {k: v for f in os.listdir(d) if f.endswith(".safetensors") for k, v in load_file(os.path.join(d, f)).items()}


def test_float32_compute_keeps_the_exact_values_and_matches_transformers(unrounded, tmp_path):
    st = _tensors(unrounded)
    key = "model.layers.0.mlp.down_proj.weight"
    assert not np.array_equal(st[key], st[key].astype(np.float16).astype(np.float32)), "float16 would round these"
    env = ExecutionEnv.create(str(tmp_path / "offload"), device="cpu")
    lm = LlamaLM(str(unrounded), env, str(tmp_path / "cache"), T.make_policy("all_compute"), progress=False)
    try:
        cache = lm._cache_dir
        assert cache.endswith("-np-float32")
        assert not os.path.exists(cache[: -len("-float32")]), "no float16 cache made for float32 compute"
        cached = np.load(os.path.join(cache, key[len("model."):]))
        assert cached.dtype == np.float32 and np.array_equal(cached, st[key])
        pad = T.pad_id_of(NAME)
        prompts = T.make_prompts(4, 12, 320, pad, seed=3)
        out, logprobs = lm.generate(prompts, max_new_tokens=8, return_logprobs=True)
        ref = T.load_reference(unrounded)
        T.assert_matches_reference(T.compare_to_reference(ref, "llama", out, 12, pad), "cpu", NAME)
        expected = T.reference_token_logprobs(ref, "llama", out, 12, pad)
        # float32 rounding apart, far tighter than float16-rounded weights would give
        np.testing.assert_allclose(logprobs, expected, atol=2e-5)
    finally:
        lm.close()
        env.close_copy_threads()


def test_float16_compute_writes_flexgens_float16_cache(unrounded, tmp_path):
    cache = LlamaLM.prepare_weight_cache(str(unrounded), str(tmp_path / "cache"), torch.float16)
    assert cache.endswith("-np") and os.path.isfile(os.path.join(cache, ".flexgen_complete"))
    arr = np.load(os.path.join(cache, "layers.0.mlp.down_proj.weight"))
    st = _tensors(unrounded)["model.layers.0.mlp.down_proj.weight"]
    assert arr.dtype == np.float16 and np.array_equal(arr, st.astype(np.float16))


def test_float32_compute_reads_an_existing_float16_cache_without_a_checkpoint(unrounded, tmp_path, monkeypatch):
    """A user with only FlexGen's float16 cache (--path, no checkpoint at hand) still runs on the CPU."""
    root = str(tmp_path / "cache")
    half = LlamaLM.prepare_weight_cache(str(unrounded), root, torch.float16)
    resolved = G.resolve_model(str(unrounded), LlamaLM.family_name)
    resolved.source = resolved.hub_name = None          # as for a hub name that is not downloaded
    monkeypatch.setattr(G, "resolve_model", lambda *a, **k: resolved)
    assert LlamaLM.prepare_weight_cache(NAME, root, torch.float32) == half
    assert not os.path.exists(half + "-float32")
