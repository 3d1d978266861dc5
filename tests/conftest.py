"""Shared fixtures: the compute device under test, tiny checkpoints, their Hugging Face references
and shared weight caches, and a helper that builds a model for a policy and always closes it.

The compute device comes from FLEXGEN_TEST_DEVICE: "cpu" (the default, what CI runs) or "cuda"
(on a GPU machine; the engine then computes in fp16 and the fidelity rule is looser). Tests marked
`gpu` run only when the device is CUDA; everything else runs on either.
"""
from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import tiny_models  # noqa: E402

DEVICE = os.environ.get("FLEXGEN_TEST_DEVICE", "cpu").strip() or "cpu"
DEVICE_TYPE = torch.device(DEVICE).type


def pytest_configure(config):
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
