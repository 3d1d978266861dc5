"""Sampling: the filters and the sampler on known distributions, and generate() with sampling on
tiny models (top_k=1 is greedy, a seed reproduces, different seeds differ)."""
import numpy as np
import pytest
import torch

import tiny_models as T
from conftest import DEVICE, DEVICE_TYPE

from flexgen.engine.sampling import Sampler, SamplingParams, filter_logits

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def _logits(probs=PROBS, rows=1):
    return probs.log()[None].expand(rows, -1).clone()


# ---- parameters ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)])
def test_params_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(do_sample=True, **kwargs)


def test_greedy_when_not_sampling_or_cold():
    assert SamplingParams().greedy
    assert SamplingParams(do_sample=False, temperature=5.0).greedy
    assert SamplingParams(do_sample=True, temperature=0.0).greedy
    assert not SamplingParams(do_sample=True, temperature=0.7).greedy


# ---- filter_logits -----------------------------------------------------------------------------

@pytest.mark.parametrize("top_p,kept", [(1.0, 4), (0.99, 4), (0.9, 3), (0.81, 3), (0.79, 2), (0.7, 2),
                                        (0.51, 2), (0.49, 1), (0.3, 1), (1e-6, 1)])
def test_top_p_keeps_the_nucleus(top_p, kept):
    """The nucleus is the smallest prefix (by probability) whose mass reaches top_p."""
    # Shuffle the vocabulary so the nucleus is not simply a prefix of the ids.
    perm = torch.tensor([2, 0, 3, 1])
    out = filter_logits(_logits(PROBS[perm]), top_p=top_p)
    finite = torch.isfinite(out[0])
    expect = torch.zeros(4, dtype=torch.bool)
    expect[torch.argsort(PROBS[perm], descending=True)[:kept]] = True
    assert torch.equal(finite, expect), (top_p, out)
    torch.testing.assert_close(out[0][finite], _logits(PROBS[perm])[0][finite])


@pytest.mark.parametrize("k", [1, 2, 3, 4, 10])
def test_top_k(k):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(k))
    out = filter_logits(logits, top_k=k)
    kept = torch.isfinite(out)
    assert (kept.sum(-1) == min(k, 50)).all()
    top = logits.topk(min(k, 50), dim=-1).indices
    assert kept.gather(-1, top).all()


def test_top_k_then_top_p():
    out = filter_logits(_logits(), top_k=3, top_p=0.7)
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    out = filter_logits(_logits(), top_k=1, top_p=1.0)
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]


# ---- the sampler on known distributions --------------------------------------------------------

N = 40000


def _draw(rows=N, seed=0, probs=PROBS, **kw):
    sampler = Sampler(SamplingParams(do_sample=True, seed=seed, **kw), torch.device("cpu"))
    return sampler(_logits(probs, rows))


def _freqs(ids, n=4):
    return torch.bincount(ids, minlength=n).float() / len(ids)


def test_sampler_follows_the_distribution():
    torch.testing.assert_close(_freqs(_draw()), PROBS, atol=0.015, rtol=0)


def test_top_p_restricts_to_the_nucleus():
    """probs [0.5, 0.3, 0.15, 0.05], top_p=0.7: only the first two, renormalised (0.625 / 0.375)."""
    f = _freqs(_draw(top_p=0.7))
    assert f[2] == 0 and f[3] == 0
    torch.testing.assert_close(f[:2], torch.tensor([0.5 / 0.8, 0.3 / 0.8]), atol=0.015, rtol=0)


def test_top_k_restricts():
    f = _freqs(_draw(top_k=3))
    assert f[3] == 0
    torch.testing.assert_close(f[:3], PROBS[:3] / 0.95, atol=0.015, rtol=0)


def test_temperature():
    """Temperature t samples from probs ** (1 / t), renormalised."""
    for t in (0.5, 2.0):
        expect = PROBS ** (1 / t)
        torch.testing.assert_close(_freqs(_draw(temperature=t)), expect / expect.sum(), atol=0.015, rtol=0)


def test_sampler_seeds():
    a, b, c = _draw(rows=64, seed=1), _draw(rows=64, seed=1), _draw(rows=64, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_greedy_sampler_is_argmax():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    ids = Sampler(SamplingParams(), torch.device("cpu"))(logits)
    assert torch.equal(ids, logits.argmax(-1))


# ---- generate() with sampling on tiny models ---------------------------------------------------

@pytest.fixture(scope="module")
def models(zoo, tmp_path_factory):
    """One open model per family (mixed placement, 2 x 2 blocks), shared by the tests below."""
    from conftest import lm_class
    from flexgen.flex_opt import ExecutionEnv
    opened = {}
    envs = []
    for name in ("opt-tiny", "llama-tiny-gqa"):
        env = ExecutionEnv.create(str(tmp_path_factory.mktemp("off")), device=DEVICE)
        envs.append(env)
        opened[name] = lm_class(T.family_of(name))(zoo.checkpoint(name), env, zoo.cache_root,
                                                  T.make_policy("mixed"), progress=False)
    yield opened
    for lm in opened.values():
        lm.close()
    for env in envs:
        env.close_copy_threads()


def _prompts(name, n=4, seed=0):
    return T.make_prompts(n, 8, 320, T.pad_id_of(name), seed=seed)


@pytest.mark.parametrize("name", ["opt-tiny", "llama-tiny-gqa"])
def test_top_k_1_is_greedy(models, name):
    lm = models[name]
    p = _prompts(name)
    greedy = lm.generate(p, max_new_tokens=8)
    np.testing.assert_array_equal(lm.generate(p, max_new_tokens=8, do_sample=True, top_k=1, seed=3), greedy)
    np.testing.assert_array_equal(lm.generate(p, max_new_tokens=8, do_sample=True, temperature=0.0), greedy)
    np.testing.assert_array_equal(lm.generate(p, max_new_tokens=8, do_sample=True, top_p=1e-6, seed=4), greedy)


@pytest.mark.parametrize("name", ["opt-tiny", "llama-tiny-gqa"])
def test_seed_reproduces_and_seeds_differ(models, name):
    lm = models[name]
    p = _prompts(name, n=5, seed=1)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5)
    a = lm.generate(p, seed=7, **kw)
    b = lm.generate(p, seed=7, **kw)
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() < 320 and a.shape == (5, 16)
    others = [lm.generate(p, seed=s, **kw) for s in (8, 9)]
    assert any(not np.array_equal(a, o) for o in others), "different seeds should give different samples"
    greedy = lm.generate(p, max_new_tokens=8)
    assert not np.array_equal(a, greedy), "hot sampling should not be greedy"


def test_seeded_sampling_does_not_depend_on_placement(zoo, open_lm):
    """Same block shape, same seed: the same samples wherever weights and cache live (CPU float32:
    the logits are bit-identical across placements)."""
    if DEVICE_TYPE != "cpu":
        pytest.skip("bit-identical logits across placements are a CPU float32 property")
    p = _prompts("opt-tiny", seed=2)
    outs = []
    for placement in ("all_compute", "all_disk", "mixed_no_overlap", "mixed_all_tiers"):
        with open_lm("opt-tiny", T.make_policy(placement)) as lm:
            outs.append(lm.generate(p, max_new_tokens=8, do_sample=True, temperature=1.2, top_p=0.9, seed=11))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_sampled_tokens_match_transformers_distribution_support(zoo, models):
    """Every sampled token with top_k=3 is among transformers' top 3 at its position (teacher
    forced), i.e. the engine samples from the right logits."""
    name = "opt-tiny"
    lm = models[name]
    p = _prompts(name, seed=4)
    out = lm.generate(p, max_new_tokens=8, do_sample=True, top_k=3, seed=5)
    logits = T.teacher_forced_logits(zoo.reference(name), "opt", out, 8, T.pad_id_of(name))[:, 7:-1]
    top3 = logits.topk(3 if DEVICE_TYPE == "cpu" else 5, dim=-1).indices.numpy()
    ours = out[:, 8:]
    assert (top3 == ours[..., None]).any(-1).all()
