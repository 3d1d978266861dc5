"""Log-probabilities of generated tokens and scoring of given tokens, against the log-softmax of
transformers' logits (float32, tiny models), on offloaded placements; early stop per GPU batch."""
import numpy as np
import pytest
import torch

import tiny_models
from conftest import DEVICE_TYPE

pytestmark = pytest.mark.skipif(DEVICE_TYPE != "cpu", reason="exact float32 comparison")


@pytest.mark.parametrize("name", ["opt-tiny", "llama-tiny-gqa"])
@pytest.mark.parametrize("placement", ["all_compute", "mixed_ngb3"])
def test_generated_logprobs_equal_reference(zoo, open_lm, name, placement):
    family, kw = tiny_models.SPECS[name]
    pad = tiny_models.pad_id_of(name)
    policy = tiny_models.make_policy(placement)
    prompts = tiny_models.make_prompts(policy.block_size + 1, 8, kw["vocab_size"], pad, seed=3)
    with open_lm(name, policy) as lm:
        out, logprobs = lm.generate(prompts, max_new_tokens=6, return_logprobs=True)
    assert logprobs.shape == (len(prompts), 6)
    expected = tiny_models.reference_token_logprobs(zoo.reference(name), family, out, 8, pad)
    np.testing.assert_allclose(logprobs, expected, atol=1e-4)


def test_sampled_logprobs_are_model_logprobs(zoo, open_lm):
    name = "llama-tiny"
    family, kw = tiny_models.SPECS[name]
    pad = tiny_models.pad_id_of(name)
    prompts = tiny_models.make_prompts(4, 6, kw["vocab_size"], pad, seed=1)
    with open_lm(name, tiny_models.make_policy("cache_cpu")) as lm:
        out, logprobs = lm.generate(prompts, max_new_tokens=5, do_sample=True, temperature=0.7, seed=5,
                                    return_logprobs=True)
    expected = tiny_models.reference_token_logprobs(zoo.reference(name), family, out, 6, pad)
    np.testing.assert_allclose(logprobs, expected, atol=1e-4)


@pytest.mark.parametrize("name", ["opt-tiny-proj", "llama-tiny-tied"])
def test_score_equals_reference(zoo, open_lm, name):
    family, kw = tiny_models.SPECS[name]
    pad = tiny_models.pad_id_of(name)
    policy = tiny_models.make_policy("mixed")
    prompts = tiny_models.make_prompts(5, 10, kw["vocab_size"], pad, seed=7, min_len=3)
    with open_lm(name, policy) as lm:
        scores = lm.score(prompts)
    assert scores.shape == prompts.shape
    ref = torch.log_softmax(tiny_models.teacher_forced_logits(zoo.reference(name), family, prompts, 10, pad), -1)
    expected = ref[:, :-1].gather(-1, torch.as_tensor(prompts[:, 1:])[..., None]).squeeze(-1).numpy()
    mask = prompts != pad
    scored = mask[:, 1:] & mask[:, :-1]     # a token is scored when the one before it is real
    np.testing.assert_allclose(scores[:, 1:][scored], expected[scored], atol=1e-4)
    assert (scores[:, 1:][~scored] == 0).all() and (scores[:, 0] == 0).all()


def test_finished_gpu_batch_is_skipped_and_block_ends(zoo, open_lm):
    """A GPU batch whose sequences all stopped is not computed again; the answers stay those of
    running without the early stop, and the block ends once everything stopped."""
    name = "opt-tiny"
    family, kw = tiny_models.SPECS[name]
    pad = tiny_models.pad_id_of(name)
    policy = tiny_models.make_policy("all_compute", gpu_batch_size=2, num_gpu_batches=2)
    prompts = tiny_models.make_prompts(4, 8, kw["vocab_size"], pad, seed=11)
    with open_lm(name, policy) as lm:
        free = lm.generate(prompts, max_new_tokens=10)
        # stop on the 2nd generated token of batch 0's rows: batch 0 finishes early
        stops = sorted({int(free[0, 9]), int(free[1, 9])})
        computed = []
        orig = lm.runner._compute

        def counting(stage, wdicts, h, k, step, *a, **kw_):
            computed.append((step.i, k))
            return orig(stage, wdicts, h, k, step, *a, **kw_)

        lm.runner._compute = counting
        out = lm.generate(prompts, max_new_tokens=10, stop=stops)
    for r in range(4):
        row = free[r, 8:].tolist()
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        expect = row if cut is None else row[:cut + 1] + [pad] * (len(row) - cut - 1)
        assert out[r, 8:].tolist() == expect
    finished_at = max(next(i for i, t in enumerate(free[r, 8:].tolist()) if t in stops) for r in (0, 1))
    later_batch0 = [c for c in computed if c[1] == 0 and c[0] > finished_at]
    assert not later_batch0, "a finished GPU batch was computed again"


@pytest.mark.parametrize("placement", ["all_compute", "mixed_ngb3", "cache_split_cpu_attn"])
def test_score_continuation_equals_reference(zoo, open_lm, placement):
    """Teacher-forced continuation log-probabilities through the decode path."""
    name = "llama-tiny-gqa"
    family, kw = tiny_models.SPECS[name]
    pad = tiny_models.pad_id_of(name)
    policy = tiny_models.make_policy(placement)
    prompts = tiny_models.make_prompts(policy.block_size, 6, kw["vocab_size"], pad, seed=5)
    cont = np.random.default_rng(0).integers(3, kw["vocab_size"], size=(len(prompts), 5))
    with open_lm(name, policy) as lm:
        lp = lm.score_continuation(prompts, cont)
    full = np.concatenate([prompts, cont], axis=1)
    ref = torch.log_softmax(tiny_models.teacher_forced_logits(zoo.reference(name), family, full, 6, pad), -1)
    expected = ref[:, 5:-1].gather(-1, torch.as_tensor(cont)[..., None]).squeeze(-1).numpy()
    np.testing.assert_allclose(lp, expected, atol=1e-4)
