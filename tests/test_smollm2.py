"""The embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1) against transformers reading the
same file: identical greedy tokens in float32 on the CPU."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from flexgen.flex_llama import ExecutionEnv, LlamaLM, Policy
from flexgen.weights import find_smollm2_gguf

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


@pytest.fixture(scope="module")
def gguf():
    return find_smollm2_gguf()


@pytest.fixture(scope="module")
def reference(gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    # transformers' own float32 dequantization of the Q4_1 blocks: the CPU's float32 weight cache
    # holds the same values (a float16 cache would round them)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def weight_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("smol_weights"))


def test_greedy_matches_transformers(reference, weight_root, tmp_path):
    tok, ref = reference
    env = ExecutionEnv.create(str(tmp_path), device="cpu")
    lm = LlamaLM("smollm2-135m", env, weight_root, Policy(1, 1, 100, 0, 100, 0, 100, 0), progress=False)
    try:
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                expected = ref.generate(ids, max_new_tokens=16, do_sample=False).numpy()
            got = lm.generate(ids.numpy(), max_new_tokens=16)
            assert np.array_equal(got, expected), (prompt, tok.decode(got[0]), tok.decode(expected[0]))
    finally:
        lm.close()
        env.close_copy_threads()


def test_batched_chat_prompts_with_offloading(reference, weight_root, tmp_path):
    """Left-padded chat prompts (whose pad id is the end-of-turn token, a real token inside the
    template) with the cache on disk and weights split: each row equals running it alone."""
    tok, _ = reference
    env = ExecutionEnv.create(str(tmp_path), device="cpu")
    msgs = ["What is the capital of France?", "Name a color."]
    rows = [tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True, tokenize=True)
            for m in msgs]
    rows = [list(r["input_ids"]) if hasattr(r, "keys") else list(r) for r in rows]
    width = max(len(r) for r in rows)
    pad = 0
    ids = np.array([[pad] * (width - len(r)) + r for r in rows])
    mask = np.array([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    lm = LlamaLM("smollm2-135m", env, weight_root, Policy(1, 2, 30, 40, 0, 50, 100, 0), progress=False)
    try:
        together = lm.generate(ids, max_new_tokens=8, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = lm.generate(np.array([r]), max_new_tokens=8, attention_mask=np.ones((1, len(r)), bool))
            assert together[i, width:].tolist() == alone[0, len(r):].tolist()
    finally:
        lm.close()
        env.close_copy_threads()


def test_main_command_prints_text_and_benchmark(weight_root, tmp_path):
    cmd = [sys.executable, "-m", "flexgen.flex_llama", "--model", "smollm2-135m", "--path", weight_root,
           "--offload-dir", str(tmp_path), "--prompt-len", "32", "--gen-len", "8", "--gpu-batch-size", "2",
           "--device", "cpu", "--log-file", str(tmp_path / "run.log")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Paris is the capital city of" in p.stdout
    assert "total throughput:" in p.stdout and "decode throughput:" in p.stdout
    assert "total throughput:" in (tmp_path / "run.log").read_text()
