"""OPT against transformers' OPTForCausalLM on tiny random checkpoints, for every placement.

On CPU (float32) greedy tokens must be identical to transformers' and logits close; on CUDA
(FLEXGEN_TEST_DEVICE=cuda, fp16) the looser rule of tiny_models.assert_matches_reference holds.
"""
import numpy as np
import pytest
import torch

import tiny_models as T
from conftest import DEVICE_TYPE

BASE = "opt-tiny"


@pytest.mark.parametrize("name", T.OPT_MODELS)
def test_reference_is_not_degenerate(zoo, name):
    """The tiny models must be worth testing against: weights exactly fp16, and greedy outputs
    that are not one token repeated."""
    ref = zoo.reference(name)
    for p in ref.parameters():
        assert torch.equal(p, p.half().float()), "reference weights must be fp16-exact"
    pad = T.pad_id_of(name)
    prompts = T.make_prompts(4, 10, 320, pad, seed=0)
    out = T.teacher_forced_logits(ref, "opt", prompts, 10, pad)
    assert len(np.unique(out[:, -1].argmax(-1).numpy())) >= 2
    gen = ref.generate(torch.as_tensor(prompts[:1]), do_sample=False, max_new_tokens=8, eos_token_id=None,
                       pad_token_id=pad, attention_mask=torch.as_tensor(prompts[:1] != pad).long())
    assert T.distinct_generated(gen.numpy(), 10) >= 3, gen


@pytest.mark.parametrize("placement", list(T.PLACEMENTS))
def test_placement_matches_transformers(run_fidelity, placement):
    out, cmp = run_fidelity(BASE, T.make_policy(placement))
    assert T.distinct_generated(out, 10) >= 3


@pytest.mark.parametrize("placement", T.SHAPE_PLACEMENTS)
@pytest.mark.parametrize("name", [n for n in T.OPT_MODELS if n != BASE])
def test_other_shapes_match_transformers(run_fidelity, name, placement):
    """word_embed_proj_dim != hidden_size (project_in/out) and post-LayerNorm (opt-350m style)."""
    run_fidelity(name, T.make_policy(placement), seed=1)


@pytest.mark.parametrize("name", T.OPT_MODELS)
def test_matches_transformers_generate(zoo, open_lm, name):
    """Unpadded equal-length prompts: the whole output equals model.generate(do_sample=False)."""
    if DEVICE_TYPE != "cpu":
        pytest.skip("exact equality with transformers' generate is a float32 (CPU) check")
    ref = zoo.reference(name)
    prompts = T.make_prompts(3, 9, 320, T.pad_id_of(name), seed=5, min_len=9)
    with open_lm(name, T.make_policy("mixed", gpu_batch_size=3, num_gpu_batches=1)) as lm:
        ours = lm.generate(prompts, max_new_tokens=10)
    theirs = ref.generate(torch.as_tensor(prompts), do_sample=False, max_new_tokens=10, eos_token_id=None,
                          pad_token_id=T.pad_id_of(name), attention_mask=torch.ones(prompts.shape, dtype=torch.long))
    np.testing.assert_array_equal(ours, theirs.numpy())


@pytest.mark.parametrize("placement", ["all_compute", "mixed_ngb3", "cache_split_cpu_attn"])
def test_pad_id_inside_prompts_with_attention_mask(run_fidelity, placement):
    """An explicit attention_mask: the pad id is a real token where the mask says so."""
    prompts, mask = T.prompts_with_pad_inside(BASE, 6, 10, seed=12)
    assert (prompts[mask] == T.pad_id_of(BASE)).any()
    run_fidelity(BASE, T.make_policy(placement), prompts=prompts, attention_mask=mask)


@pytest.mark.parametrize("n_prompts,gbs,ngb", [(5, 2, 2), (1, 2, 2), (7, 2, 3), (3, 1, 1)])
def test_any_number_of_prompts(run_fidelity, n_prompts, gbs, ngb):
    """Prompts run in blocks of gbs x ngb; a short last block is padded internally and only the
    real rows come back."""
    out, _ = run_fidelity(BASE, T.make_policy("mixed", gpu_batch_size=gbs, num_gpu_batches=ngb),
                          n_prompts=n_prompts, seed=n_prompts)
    assert out.shape[0] == n_prompts


@pytest.mark.parametrize("prompt_len,gen_len,gbs,ngb,placement", [
    (1, 5, 1, 1, "all_disk"),              # a one-token prompt
    (10, 1, 2, 2, "mixed_all_tiers"),      # prefill only
    (3, 6, 1, 4, "mixed_all_tiers"),       # four GPU batches of one
    (24, 40, 2, 1, "mixed"),               # up to the last of the model's 64 positions
    (12, 6, 3, 2, "cache_split_cpu_attn"),
])
def test_edge_shapes(run_fidelity, prompt_len, gen_len, gbs, ngb, placement):
    run_fidelity(BASE, T.make_policy(placement, gpu_batch_size=gbs, num_gpu_batches=ngb), prompt_len=prompt_len,
                 gen_len=gen_len, seed=prompt_len + gen_len, min_len=1)


def test_rows_do_not_depend_on_block(zoo, open_lm):
    """A prompt's tokens do not depend on which block or GPU batch it runs in."""
    pad = T.pad_id_of(BASE)
    prompts = T.make_prompts(6, 10, 320, pad, seed=11)
    with open_lm(BASE, T.make_policy("mixed", gpu_batch_size=2, num_gpu_batches=2)) as lm:
        together = lm.generate(prompts, max_new_tokens=6)
        reversed_ = lm.generate(prompts[::-1].copy(), max_new_tokens=6)[::-1]
        alone = np.concatenate([lm.generate(prompts[i:i + 1], max_new_tokens=6) for i in range(6)])
    if DEVICE_TYPE == "cpu":
        np.testing.assert_array_equal(together, reversed_)
        np.testing.assert_array_equal(together, alone)
    else:
        assert (together == reversed_).mean() > 0.9 and (together == alone).mean() > 0.9


@pytest.mark.parametrize("placement", ["all_compute", "mixed_ngb3", "cache_disk"])
def test_stop_token(zoo, open_lm, run_fidelity, placement):
    """After a row emits the stop token the rest of the row is pad; rows and steps before that
    are unchanged (and still match transformers)."""
    policy = T.make_policy(placement)
    pad = T.pad_id_of(BASE)
    free, _ = run_fidelity(BASE, policy, seed=3)
    stop = int(free[0, 10 + 2])           # row 0 stops at step 2 at the latest
    stopped, _ = run_fidelity(BASE, policy, seed=3, stop=stop)
    _check_stopped(free, stopped, 10, {stop}, pad)
    # A list of stop ids: two tokens from different rows.
    stops = [stop, int(free[-1, 10 + 4])]
    stopped2, _ = run_fidelity(BASE, policy, seed=3, stop=stops)
    _check_stopped(free, stopped2, 10, set(stops), pad)


def _check_stopped(free, stopped, prompt_len, stops, pad):
    hit_any = False
    for r in range(free.shape[0]):
        gen = free[r, prompt_len:]
        hits = np.nonzero(np.isin(gen, list(stops)))[0]
        if len(hits) == 0:
            np.testing.assert_array_equal(stopped[r], free[r])
            continue
        hit_any = True
        end = prompt_len + hits[0] + 1
        np.testing.assert_array_equal(stopped[r, :end], free[r, :end])
        assert (stopped[r, end:] == pad).all(), f"row {r}: after the stop token the rest must be pad: {stopped[r]}"
    assert hit_any


def test_stop_all_rows_early(run_fidelity):
    """When every row has stopped, the output still has the full width, padded."""
    policy = T.make_policy("all_compute", gpu_batch_size=1, num_gpu_batches=1)
    free, _ = run_fidelity(BASE, policy, n_prompts=1, seed=4)
    stop = int(free[0, 10])               # the very first generated token
    stopped, _ = run_fidelity(BASE, policy, n_prompts=1, seed=4, stop=stop)
    assert stopped.shape == free.shape
    assert stopped[0, 10] == stop and (stopped[0, 11:] == T.pad_id_of(BASE)).all()


@pytest.mark.parametrize("placement", ["all_compute", "cache_split_cpu_attn", "all_disk"])
def test_sparse_attention_runs(zoo, open_lm, placement):
    """attn_sparsity < 1 is an approximation: it must run on every placement and give valid ids."""
    pad = T.pad_id_of(BASE)
    prompts = T.make_prompts(4, 12, 320, pad, seed=6)
    with open_lm(BASE, T.make_policy(placement, attn_sparsity=0.5)) as lm:
        out = lm.generate(prompts, max_new_tokens=8)
    assert out.shape == (4, 20) and (out[:, :12] == prompts).all()
    assert out.min() >= 0 and out.max() < 320


@pytest.mark.parametrize("placement", ["all_compute", "cache_split_cpu_attn", "mixed_ngb3"])
def test_sparsity_keeping_every_position_is_dense(zoo, run_fidelity, record_logits, placement):
    """With sparsity high enough that top-k keeps every cached position (int(0.999 * S) = S - 1
    for the short sequences here), sparse decode attention is dense attention: same tokens and
    the same logits."""
    policy = T.make_policy(placement, attn_sparsity=0.999)
    out, _ = run_fidelity(BASE, policy, seed=7, min_len=9)
    ours = record_logits.by_row(policy, steps=8)
    theirs = T.teacher_forced_logits(zoo.reference(BASE), "opt", out, 10, T.pad_id_of(BASE))[:, 9:-1]
    T.assert_logits_close(ours, theirs, DEVICE_TYPE)


def test_logits_close_to_transformers(zoo, open_lm, record_logits):
    """The logits the engine samples from are those of transformers (float32: ~1e-4)."""
    pad = T.pad_id_of(BASE)
    policy = T.make_policy("mixed")
    prompts = T.make_prompts(4, 10, 320, pad, seed=8)
    with open_lm(BASE, policy) as lm:
        out = lm.generate(prompts, max_new_tokens=6)
    ours = record_logits.by_row(policy, steps=6)                       # (b, T, V)
    theirs = T.teacher_forced_logits(zoo.reference(BASE), "opt", out, 10, pad)[:, 9:-1]
    T.assert_logits_close(ours, theirs, DEVICE_TYPE)


# ---- many prompts and steps: races between overlapped copies and compute show up here -----------

_RACE_PLACEMENTS = ["all_disk", "mixed_all_tiers", "mixed_ngb3", "cache_disk", "weights_cpu"]


@pytest.mark.parametrize("placement", _RACE_PLACEMENTS if DEVICE_TYPE == "cuda" else _RACE_PLACEMENTS[:2])
def test_placements_agree_on_a_big_block(zoo, open_lm, placement):
    """16 prompts in 4 x 4 blocks, 24 steps, overlap on: the same tokens as everything on the
    compute device (fp16 on CUDA: the same kernels on the same values, so nearly always equal)."""
    pad = T.pad_id_of(BASE)
    prompts = T.make_prompts(16, 16, 320, pad, seed=21, min_len=4)
    with open_lm(BASE, T.make_policy("all_compute", gpu_batch_size=4, num_gpu_batches=4)) as lm:
        base = lm.generate(prompts, max_new_tokens=24)
    with open_lm(BASE, T.make_policy(placement, gpu_batch_size=4, num_gpu_batches=4)) as lm:
        out = lm.generate(prompts, max_new_tokens=24)
    if DEVICE_TYPE == "cpu":
        np.testing.assert_array_equal(out, base)
    else:
        assert (out[:, 16:] == base[:, 16:]).mean() >= 0.95, (out[:, 16:] != base[:, 16:]).sum()
    cmp = T.compare_to_reference(zoo.reference(BASE), "opt", out, 16, pad)
    T.assert_matches_reference(cmp, DEVICE_TYPE, what=placement)


@pytest.mark.gpu
def test_gpu_dtype_and_pinned_weights(zoo, open_lm):
    """On CUDA the engine computes in fp16 and CPU-resident weights are pinned (pin_weight)."""
    with open_lm(BASE, T.make_policy("weights_cpu")) as lm:
        assert lm.env.compute_dtype == torch.float16 and lm.env.is_cuda
        cpu_bufs = [st for home in lm.weights.homes for buf in home.values()
                    for tier, st, _, _ in buf.segments if tier == "cpu"]
        assert cpu_bufs and all(t.is_pinned() for t in cpu_bufs)
    with open_lm(BASE, T.make_policy("weights_cpu", pin_weight=False)) as lm:
        cpu_bufs = [st for home in lm.weights.homes for buf in home.values()
                    for tier, st, _, _ in buf.segments if tier == "cpu"]
        assert cpu_bufs and not any(t.is_pinned() for t in cpu_bufs)
