"""The request layer against transformers (float32, tiny models): prompts of mixed lengths and
decoding parameters in one call, generated-token and prompt (echo) log-probabilities with top-k
alternatives, continuation and rolling scores with is_greedy, sampling with n > 1, per-request
errors, and the retry with a smaller GPU batch after running out of memory."""
import numpy as np
import pytest
import torch

import tiny_models
from conftest import DEVICE_TYPE
from flexgen.requests import GenerationRequest, RequestRunner, ScoreRequest, rolling_windows

pytestmark = pytest.mark.skipif(DEVICE_TYPE != "cpu", reason="exact float32 comparison")


def _prompts(name, n, seed=0):
    _, kw = tiny_models.SPECS[name]
    pad = tiny_models.pad_id_of(name)
    rng = np.random.default_rng(seed)
    allowed = [t for t in range(3, kw["vocab_size"]) if t != pad]
    return [rng.choice(allowed, size=int(rng.integers(2, 12))).tolist() for _ in range(n)]


def _ref_logprobs(zoo, name, row):
    """HF float32 log-softmax over one unpadded row (L, V)."""
    family, _ = tiny_models.SPECS[name]
    ids = np.asarray([row])
    logits = tiny_models.teacher_forced_logits(zoo.reference(name), family, ids, len(row), -1)
    return torch.log_softmax(logits[0], -1)


@pytest.mark.parametrize("name,placement", [("llama-tiny-gqa", "mixed_ngb3"), ("opt-tiny", "weights_cpu_disk")])
def test_generate_echo_and_top_logprobs_equal_reference(zoo, open_lm, name, placement):
    prompts = _prompts(name, 7)
    reqs = [GenerationRequest(p, max_new_tokens=5, logprobs=True, top_logprobs=3, echo=True, stop_at_eos=False)
            for p in prompts]
    reqs.append(GenerationRequest(prompts[0], max_new_tokens=3, stop_at_eos=False))   # another group
    with open_lm(name, tiny_models.make_policy(placement)) as lm:
        runner = RequestRunner(lm, progress=False)
        results = runner.generate(reqs)
    assert runner.stats["blocks"] >= 2
    for p, res in zip(prompts, results):
        c = res.completions[0]
        assert len(c.token_ids) == 5 and c.finish_reason == "length"
        ref = _ref_logprobs(zoo, name, p + c.token_ids)
        # greedy: each generated token is HF's argmax given everything before it
        assert c.token_ids == ref[len(p) - 1:-1].argmax(-1).tolist()
        for n, t in enumerate(c.tokens):
            row = ref[len(p) - 1 + n]
            assert t.logprob == pytest.approx(float(row[t.token_id]), abs=1e-4)
            assert [a[0] for a in t.top] == row.topk(3).indices.tolist()
            np.testing.assert_allclose([a[2] for a in t.top], row.topk(3).values.numpy(), atol=1e-4)
        assert [t.token_id for t in res.prompt_tokens] == p and res.prompt_tokens[0].logprob is None
        for n in range(1, len(p)):
            t = res.prompt_tokens[n]
            assert t.logprob == pytest.approx(float(ref[n - 1, p[n]]), abs=1e-4)
            assert [a[0] for a in t.top] == ref[n - 1].topk(3).indices.tolist()
    assert results[-1].completions[0].token_ids == results[0].completions[0].token_ids[:3]


def test_echo_with_no_new_tokens_scores_the_prompt(zoo, open_lm):
    name = "llama-tiny"
    p = _prompts(name, 1, seed=4)[0]
    with open_lm(name, tiny_models.make_policy("cache_cpu")) as lm:
        res = RequestRunner(lm, progress=False).generate([GenerationRequest(p, max_new_tokens=0, echo=True)])[0]
    assert res.completions == [] and res.error is None
    ref = _ref_logprobs(zoo, name, p)
    np.testing.assert_allclose([t.logprob for t in res.prompt_tokens[1:]],
                               [float(ref[n - 1, p[n]]) for n in range(1, len(p))], atol=1e-4)


@pytest.mark.parametrize("name", ["llama-tiny-tied", "opt-tiny-proj"])
def test_score_and_rolling_equal_reference(zoo, open_lm, name):
    prompts = _prompts(name, 6, seed=2)
    with open_lm(name, tiny_models.make_policy("mixed")) as lm:
        runner = RequestRunner(lm, progress=False)
        prefix = runner._prefix_token()
        greedy = runner.generate([GenerationRequest(prompts[0], max_new_tokens=3, stop_at_eos=False)])
        g = greedy[0].completions[0].token_ids
        reqs = [ScoreRequest(p[:-2], p[-2:]) for p in prompts[1:]] + [ScoreRequest(prompts[0], g)]
        reqs += [ScoreRequest([], prompts[1]), ScoreRequest(prompts[2], None)]
        long_text = sum(_prompts(name, 12, seed=9), [])       # longer than the context: several windows
        reqs.append(ScoreRequest(long_text, None))
        scores = runner.score(reqs)
        limit = lm.info.max_seq_len - 1
    for p, s in zip(prompts[1:], scores[:5]):
        ref = _ref_logprobs(zoo, name, p)
        assert s.num_tokens == 2
        assert s.logprob == pytest.approx(float(ref[-3, p[-2]] + ref[-2, p[-1]]), abs=1e-4)
        assert s.is_greedy == (ref[-3:-1].argmax(-1).tolist() == p[-2:])
    assert scores[5].is_greedy and scores[5].num_tokens == 3      # the model's own greedy continuation
    ref = _ref_logprobs(zoo, name, [prefix] + prompts[1])
    assert scores[6].logprob == pytest.approx(float(sum(ref[n, prompts[1][n]] for n in range(len(prompts[1])))),
                                              abs=1e-4)
    ref = _ref_logprobs(zoo, name, [prefix] + prompts[2])
    assert scores[7].num_tokens == len(prompts[2])
    assert scores[7].logprob == pytest.approx(float(sum(ref[n, prompts[2][n]] for n in range(len(prompts[2])))),
                                              abs=1e-4)
    windows = rolling_windows(long_text, prefix, limit - 1)
    assert len(windows) > 1 and sum(n for _, n in windows) == len(long_text) == scores[8].num_tokens
    expected = 0.0
    for row, n in windows:
        ref = _ref_logprobs(zoo, name, row)
        expected += float(sum(ref[len(row) - 1 - m - 1, row[len(row) - 1 - m]] for m in range(n)))
    assert scores[8].logprob == pytest.approx(expected, abs=1e-3)


def test_rolling_windows_cover_each_token_once():
    toks = list(range(10, 33))
    windows = rolling_windows(toks, 1, 8)
    scored = [t for row, n in windows for t in row[len(row) - n:]]
    assert scored == toks
    assert all(len(row) <= 9 for row, _ in windows) and windows[0][0][0] == 1


def test_sampled_n_completions_are_reproducible(zoo, open_lm):
    name = "llama-tiny"
    p = _prompts(name, 2, seed=5)
    reqs = [GenerationRequest(x, max_new_tokens=6, temperature=0.9, n=3, seed=11, stop_at_eos=False) for x in p]
    with open_lm(name, tiny_models.make_policy("all_compute")) as lm:
        a = RequestRunner(lm, progress=False).generate(reqs)
        b = RequestRunner(lm, progress=False).generate(reqs)
    for ra, rb in zip(a, b):
        assert len(ra.completions) == 3
        assert [c.token_ids for c in ra.completions] == [c.token_ids for c in rb.completions]
    assert len({tuple(c.token_ids) for r in a for c in r.completions}) > 1


def test_bad_request_gets_an_error_and_the_rest_run(zoo, open_lm):
    name = "opt-tiny"
    good = _prompts(name, 1)[0]
    reqs = [GenerationRequest([10] * 70, max_new_tokens=2), GenerationRequest(good, max_new_tokens=2),
            GenerationRequest(good, max_new_tokens=0), GenerationRequest([999999], max_new_tokens=2)]
    with open_lm(name, tiny_models.make_policy("all_compute")) as lm:
        res = RequestRunner(lm, progress=False).generate(reqs)
    assert "exceeds the model's context" in res[0].error
    assert res[1].error is None and len(res[1].completions[0].token_ids) == 2
    assert "max_new_tokens" in res[2].error and "vocabulary" in res[3].error


def test_out_of_memory_block_is_retried_with_a_smaller_batch(zoo, open_lm):
    name = "llama-tiny-gqa"
    prompts = _prompts(name, 9, seed=6)
    reqs = [GenerationRequest(p, max_new_tokens=4, stop_at_eos=False) for p in prompts]
    policy = tiny_models.make_policy("mixed_ngb3")
    with open_lm(name, policy) as lm:
        expected = [r.completions[0].token_ids for r in RequestRunner(lm, progress=False).generate(reqs)]
        real = lm.run_rows

        def run_rows(ids, *a, **kw):   # a block of more than 2 sequences "runs out of GPU memory"
            if lm.policy.gpu_batch_size > 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(ids, *a, **kw)

        lm.run_rows = run_rows
        logged = []
        runner = RequestRunner(lm, progress=False, log=logged.append)
        got = [r.completions[0].token_ids for r in runner.generate(reqs)]
    assert got == expected
    assert runner.stats["retries"] >= 1 and "retrying with --gpu-batch-size 1" in logged[-1]
