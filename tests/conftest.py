"""Shared fixtures: the compute device under test, tiny checkpoints, their Hugging Face references
and shared weight caches, and a helper that builds a model for a policy and always closes it.

The compute device comes from FLEXGEN_TEST_DEVICE: "cpu" (the default, what CI runs) or "cuda"
(on a GPU machine; the engine then computes in fp16 and the fidelity rule is looser). Tests marked
`gpu` run only when the device is CUDA; everything else runs on either.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import tiny_models  # noqa: E402

DEVICE = os.environ.get("FLEXGEN_TEST_DEVICE", "cpu").strip() or "cpu"
DEVICE_TYPE = torch.device(DEVICE).type


def pytest_configure(config):
    # The tiny models are dominated by per-op overhead; one intra-op thread is faster for them and,
    # on a small shared CI machine, immune to the busy-waiting that makes two OpenMP threads crawl
    # when another process holds a core. FLEXGEN_TEST_THREADS overrides.
    torch.set_num_threads(int(os.environ.get("FLEXGEN_TEST_THREADS", "1")))
    # One machine profile for the session (and the CLI runs it starts): the first run that needs a
    # prediction measures this machine (quick on the CPU) and caches it there.
    os.environ["FLEXGEN_PROFILE"] = os.path.join(tempfile.mkdtemp(prefix="flexgen-test-profile-"), "profile.json")
    config.addinivalue_line("markers", "gpu: needs a CUDA compute device (FLEXGEN_TEST_DEVICE=cuda)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    if DEVICE_TYPE == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"FLEXGEN_TEST_DEVICE={DEVICE} but CUDA is not available")


def pytest_collection_modifyitems(config, items):
    if DEVICE_TYPE == "cuda":
        return
    skip = pytest.mark.skip(reason="needs FLEXGEN_TEST_DEVICE=cuda")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    return f"flexgen compute device: {DEVICE} (FLEXGEN_TEST_DEVICE)"


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def device_type():
    return DEVICE_TYPE


# ---- tiny checkpoints, built once per session ----------------------------------------------------

class TinyZoo:
    """Tiny checkpoints (built on first use), their HF references, and one weight cache root that
    every test shares (the engine converts each checkpoint into it once)."""

    def __init__(self, root):
        self.root = root
        self.cache_root = str(root / "weight_cache")
        self._dirs = {}
        self._refs = {}

    def checkpoint(self, name: str) -> str:
        if name not in self._dirs:
            d = self.root / "ckpt" / name   # the engine names its cache after the dir: keep them unique
            tiny_models.build_checkpoint(name, d)
            self._dirs[name] = str(d)
        return self._dirs[name]

    def reference(self, name: str):
        if name not in self._refs:
            self._refs[name] = tiny_models.load_reference(self.checkpoint(name))
        return self._refs[name]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return TinyZoo(tmp_path_factory.mktemp("tiny"))


def lm_class(family: str):
    if family == "opt":
        from flexgen.flex_opt import OptLM
        return OptLM
    from flexgen.flex_llama import LlamaLM
    return LlamaLM


@pytest.fixture
def offload_dir(tmp_path):
    d = tmp_path / "offload"
    d.mkdir()
    return str(d)


@pytest.fixture
def open_lm(zoo, offload_dir):
    """open_lm(name, policy) -> context manager yielding a ready model on the test device; closes
    the model and the environment (threads, offload files) afterwards."""

    @contextlib.contextmanager
    def _open(name, policy, device=None, model=None):
        from flexgen.flex_opt import ExecutionEnv
        env = ExecutionEnv.create(offload_dir, device=device or DEVICE)
        lm = None
        try:
            cls = lm_class(tiny_models.family_of(name))
            lm = cls(model or zoo.checkpoint(name), env, zoo.cache_root, policy, progress=False)
            yield lm
        finally:
            if lm is not None:
                lm.close()
            env.close_copy_threads()

    return _open


@pytest.fixture
def run_fidelity(zoo, open_lm):
    """run_fidelity(name, policy, ...) -> (output, Comparison): generate greedily on left-padded
    prompts of different real lengths and check the tokens against transformers (teacher forced)."""

    def _run(name, policy, n_prompts=None, prompt_len=10, gen_len=8, seed=0, stop=None, prompts=None,
             min_len=None, attention_mask=None, **gen_kwargs):
        family, kwargs = tiny_models.SPECS[name]
        pad = tiny_models.pad_id_of(name)
        if prompts is None:
            n = policy.block_size if n_prompts is None else n_prompts
            prompts = tiny_models.make_prompts(n, prompt_len, kwargs["vocab_size"], pad, seed=seed,
                                               min_len=min_len)
        n, prompt_len = prompts.shape
        with open_lm(name, policy) as lm:
            if attention_mask is not None:
                gen_kwargs["attention_mask"] = attention_mask
            out = lm.generate(prompts, max_new_tokens=gen_len, stop=stop, **gen_kwargs)
        assert isinstance(out, __import__("numpy").ndarray)
        assert out.shape == (n, prompt_len + gen_len)
        assert (out[:, :prompt_len] == prompts).all(), "the prompt part of the output must be the prompts"
        assert out.min() >= 0 and out.max() < kwargs["vocab_size"]
        stop_ids = () if stop is None else tuple(stop if isinstance(stop, (list, tuple)) else [stop])
        cmp = tiny_models.compare_to_reference(zoo.reference(name), family, out, prompt_len, pad, stop_ids,
                                               prompt_mask=attention_mask)
        tiny_models.assert_matches_reference(cmp, DEVICE_TYPE, what=f"{name} {policy}")
        return out, cmp

    return _run


class LogitRecorder(list):
    """The logits the engine hands its sampler, one (gpu_batch_size, V) tensor per call."""

    def by_row(self, policy, steps):
        """(rows of one block, steps, V): calls run per step, then per GPU batch."""
        ngb = policy.num_gpu_batches
        assert len(self) == steps * ngb, f"expected {steps * ngb} sampler calls, got {len(self)}"
        per_step = [torch.cat(self[i * ngb:(i + 1) * ngb], dim=0) for i in range(steps)]
        return torch.stack(per_step, dim=1)


@pytest.fixture
def record_logits(monkeypatch):
    """Wrap the engine's Sampler so the logits it sees are recorded (float32, on the CPU)."""
    gen = pytest.importorskip("flexgen.engine.generate")
    if not hasattr(gen, "Sampler"):
        pytest.skip("the engine no longer builds its sampler in flexgen.engine.generate")
    base = gen.Sampler
    recorded = LogitRecorder()

    class Recording(base):
        def __call__(self, logits):
            recorded.append(logits.detach().float().cpu().clone())
            return super().__call__(logits)

    monkeypatch.setattr(gen, "Sampler", Recording)
    return recorded
