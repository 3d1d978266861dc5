"""FlexGen's API surface (Policy, CompressionConfig, ExecutionEnv, generate's arguments), the error
messages for bad input (in-process and through the CLI: exit status 2, one `error:` line, no
traceback), and the CLI's benchmark block and log file."""
import dataclasses
import inspect
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import tiny_models as T
from conftest import DEVICE, DEVICE_TYPE

from flexgen.engine.generate import GenerationError
from flexgen.flex_llama import LlamaLM
from flexgen.flex_opt import CompressionConfig, ExecutionEnv, OptLM, Policy
from flexgen.models.registry import ModelNotFound
from flexgen.policy import PolicyError
from flexgen.weights import WeightsError

REPO = pathlib.Path(__file__).resolve().parent.parent

# ---- Policy and CompressionConfig: FlexGen's names and order -------------------------------------

FLEXGEN_POLICY_FIELDS = [
    "gpu_batch_size", "num_gpu_batches", "w_gpu_percent", "w_cpu_percent", "cache_gpu_percent",
    "cache_cpu_percent", "act_gpu_percent", "act_cpu_percent", "overlap", "sep_layer", "pin_weight",
    "cpu_cache_compute", "attn_sparsity", "compress_weight", "comp_weight_config", "compress_cache",
    "comp_cache_config"]


def test_policy_fields_in_flexgen_order():
    assert [f.name for f in dataclasses.fields(Policy)] == FLEXGEN_POLICY_FIELDS
    assert [f.name for f in dataclasses.fields(CompressionConfig)] == ["num_bits", "group_size", "group_dim",
                                                                       "symmetric"]


def test_policy_positional_like_flexgen():
    """The call FlexGen's own scripts make, positionally."""
    p = Policy(4, 2, 20, 30, 40, 50, 60, 10, True, False, True, True, 1.0, False,
               CompressionConfig(num_bits=4, group_size=64, group_dim=0, symmetric=False), False,
               CompressionConfig(num_bits=4, group_size=64, group_dim=2, symmetric=False))
    assert (p.gpu_batch_size, p.num_gpu_batches) == (4, 2)
    assert (p.w_gpu_percent, p.w_cpu_percent, p.w_disk_percent) == (20, 30, 50)
    assert (p.cache_gpu_percent, p.cache_cpu_percent, p.cache_disk_percent) == (40, 50, 10)
    assert (p.act_gpu_percent, p.act_cpu_percent, p.act_disk_percent) == (60, 10, 30)
    assert (p.overlap, p.sep_layer, p.pin_weight, p.cpu_cache_compute) == (True, False, True, True)
    assert p.comp_cache_config.group_dim == 2


@pytest.mark.parametrize("args,kwargs,match", [
    ((0, 1, 100, 0, 100, 0, 100, 0), {}, "gpu_batch_size"),
    ((1, 0, 100, 0, 100, 0, 100, 0), {}, "num_gpu_batches"),
    ((-2, 1, 100, 0, 100, 0, 100, 0), {}, "gpu_batch_size"),
    ((1.5, 1, 100, 0, 100, 0, 100, 0), {}, "gpu_batch_size"),
    ((1, 1, -10, 50, 100, 0, 100, 0), {}, "weights"),
    ((1, 1, 60, 50, 100, 0, 100, 0), {}, "weights"),
    ((1, 1, 100, 0, 70, 40, 100, 0), {}, "cache"),
    ((1, 1, 100, 0, 100, 0, 100, 0.5), {}, "activations"),
    ((1, 1, 100, 0, 100, 0, 101, 0), {}, "activations"),
    ((1, 1, math.nan, 0, 100, 0, 100, 0), {}, "weights"),
    ((1, 1, 100, 0, 100, 0, 100, 0), {"attn_sparsity": 0.0}, "attn_sparsity"),
    ((1, 1, 100, 0, 100, 0, 100, 0), {"attn_sparsity": 1.5}, "attn_sparsity"),
])
def test_policy_rejects_bad_values(args, kwargs, match):
    with pytest.raises(PolicyError, match=match):
        Policy(*args, **kwargs)
    assert issubclass(PolicyError, ValueError)


def test_policy_percent_edges_are_fine():
    p = Policy(1, 1, 0, 0, 0, 100, 33.3, 66.7)
    assert p.w_disk_percent == 100 and p.cache_disk_percent == 0
    assert p.percents("act") == (33.3, 66.7, pytest.approx(0.0))
    assert p.block_size == 1
    assert Policy(3, 4, 100, 0, 100, 0, 100, 0).block_size == 12


# ---- ExecutionEnv ---------------------------------------------------------------------------------

def test_env_cpu(tmp_path):
    env = ExecutionEnv.create(str(tmp_path / "a" / "b"), device="cpu")
    try:
        assert env.device.type == "cpu"
        assert os.path.isdir(tmp_path / "a" / "b"), "a missing offload dir is created"
    finally:
        env.close_copy_threads()


def test_env_offload_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PolicyError, match="cannot be written"):
        ExecutionEnv.create(str(blocker / "sub"), device="cpu")


@pytest.mark.skipif(DEVICE_TYPE == "cuda", reason="CUDA is there")
def test_env_cuda_missing_is_a_clear_error(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(PolicyError, match="CUDA"):
        ExecutionEnv.create(str(tmp_path), device="cuda")


def test_offload_files_removed_after_close(zoo, tmp_path):
    """Everything written to the offload dir is gone once the model and env are closed."""
    off = tmp_path / "off"
    env = ExecutionEnv.create(str(off), device=DEVICE)
    lm = OptLM(zoo.checkpoint("opt-tiny"), env, zoo.cache_root, T.make_policy("all_disk"), progress=False)
    try:
        prompts = T.make_prompts(4, 6, 320, 1)
        lm.generate(prompts, max_new_tokens=3)
        assert any(not n.startswith(".") for n in os.listdir(off)), "all_disk must put files in the offload dir"
    finally:
        lm.close()
        env.close_copy_threads()
    assert [n for n in os.listdir(off)] == []


# ---- generate(): arguments and errors -------------------------------------------------------------

@pytest.fixture(scope="module")
def opt_lm(zoo, tmp_path_factory):
    env = ExecutionEnv.create(str(tmp_path_factory.mktemp("off")), device=DEVICE)
    lm = OptLM(zoo.checkpoint("opt-tiny"), env, zoo.cache_root, T.make_policy("mixed"), progress=False)
    yield lm
    lm.close()
    env.close_copy_threads()


def test_generate_signature_matches_flexgen():
    """FlexGen: generate(inputs, max_new_tokens=32, do_sample=False, temperature=1.0, stop=None,
    debug_mode=None, cut_gen_len=None, verbose=0). Scripts that pass max_new_tokens positionally
    (model.generate(ids, 32)) must not end up sampling with do_sample=32."""
    params = list(inspect.signature(OptLM.generate).parameters)
    assert params[:9] == ["self", "inputs", "max_new_tokens", "do_sample", "temperature", "stop", "debug_mode",
                          "cut_gen_len", "verbose"], params


def test_generate_accepts_lists_and_single_rows(opt_lm):
    prompts = T.make_prompts(2, 6, 320, 1, seed=2, min_len=6)
    arr = opt_lm.generate(prompts, max_new_tokens=3)
    lst = opt_lm.generate(prompts.tolist(), max_new_tokens=3)
    np.testing.assert_array_equal(arr, lst)
    one = opt_lm.generate(prompts[0].tolist(), max_new_tokens=3)
    assert one.shape == (1, 9)
    np.testing.assert_array_equal(one[0], arr[0])


def test_cut_gen_len_keeps_flexgen_output_width(opt_lm):
    """FlexGen's generate with cut_gen_len still returns prompt_len + max_new_tokens columns (the
    uncut part is padding): the docstring promises that width too."""
    prompts = T.make_prompts(4, 6, 320, 1, seed=3)
    full = opt_lm.generate(prompts, max_new_tokens=6)
    cut = opt_lm.generate(prompts, max_new_tokens=6, cut_gen_len=2)
    assert cut.shape == full.shape
    np.testing.assert_array_equal(cut[:, :8], full[:, :8])
    assert (cut[:, 8:] == 1).all()


@pytest.mark.parametrize("inputs,kwargs,match", [
    ([[5, 6, 7], [5, 6]], {}, "equally long"),
    ([[5, 6, 320]], {}, "token ids"),
    ([[5, -1, 7]], {}, "token ids"),
    ([[]], {}, "non-empty"),
    ([[5, 6, 7]], {"max_new_tokens": 0}, "max_new_tokens"),
    ([[5] * 60], {"max_new_tokens": 5}, "64"),           # 65 positions > the model's 64
    ([[5, 6, 7]], {"do_sample": True, "temperature": -1.0}, "temperature"),
    ([[5, 6, 7]], {"do_sample": True, "top_p": 0.0}, "top_p"),
    ([[5, 6, 7]], {"do_sample": True, "top_k": -1}, "top_k"),
    ([[5, 6, 7]], {"stop": "hello"}, "tokenizer"),
])
def test_generate_rejects_bad_input(opt_lm, inputs, kwargs, match):
    kwargs.setdefault("max_new_tokens", 2)
    with pytest.raises(GenerationError, match=match):
        opt_lm.generate(inputs, **kwargs)


def test_generate_at_the_context_limit(opt_lm):
    out = opt_lm.generate([[5] * 60], max_new_tokens=4)   # exactly 64 positions
    assert out.shape == (1, 64)


# ---- models: names, directories, checkpoints -----------------------------------------------------

def _env(tmp_path):
    return ExecutionEnv.create(str(tmp_path / "off"), device=DEVICE)


@pytest.mark.parametrize("cls,model,match", [
    (OptLM, "facebook/opt-999b", "unknown model"),
    (OptLM, "no-such-model", "unknown model"),
    (LlamaLM, "facebook/opt-125m", "unknown model|OPT"),
    (OptLM, "/nonexistent/checkpoint/dir", "no such file"),
])
def test_unknown_models(tmp_path, cls, model, match):
    env = _env(tmp_path)
    try:
        with pytest.raises(ModelNotFound, match=match):
            cls(model, env, str(tmp_path / "cache"), Policy(1, 1, 100, 0, 100, 0, 100, 0), progress=False)
    finally:
        env.close_copy_threads()


def test_wrong_family_for_checkpoint(zoo, tmp_path):
    env = _env(tmp_path)
    try:
        with pytest.raises(ModelNotFound, match="flex_opt"):
            LlamaLM(zoo.checkpoint("opt-tiny"), env, str(tmp_path / "c"), T.make_policy("all_compute"))
        with pytest.raises(ModelNotFound, match="flex_llama"):
            OptLM(zoo.checkpoint("llama-tiny"), env, str(tmp_path / "c"), T.make_policy("all_compute"))
    finally:
        env.close_copy_threads()


def test_model_dir_as_pathlib_path(zoo, tmp_path):
    """A checkpoint directory given as a pathlib.Path works like the same path as a str."""
    env = _env(tmp_path)
    try:
        lm = OptLM(pathlib.Path(zoo.checkpoint("opt-tiny")), env, zoo.cache_root, T.make_policy("all_compute"),
                   progress=False)
        assert lm.generate([[5, 6, 7]], max_new_tokens=2).shape == (1, 5)
        lm.close()
    finally:
        env.close_copy_threads()


def _broken_checkpoint(zoo, tmp_path, how):
    """A copy of the tiny OPT checkpoint with its safetensors file missing or truncated."""
    import shutil
    src = pathlib.Path(zoo.checkpoint("opt-tiny"))
    d = tmp_path / f"broken-{how}"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    if how == "truncated":
        data = (src / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return d


@pytest.mark.parametrize("how", ["missing", "truncated"])
def test_broken_checkpoint_api(zoo, tmp_path, how):
    d = _broken_checkpoint(zoo, tmp_path, how)
    env = _env(tmp_path)
    try:
        with pytest.raises(WeightsError, match="safetensors|truncated|corrupt|no weight files"):
            OptLM(str(d), env, str(tmp_path / "cache"), T.make_policy("all_compute"), progress=False)
    finally:
        env.close_copy_threads()
    for cache in (f"{d.name}-np", f"{d.name}-np-float32"):   # float16 and float32 compute's caches
        assert not (tmp_path / "cache" / cache / ".flexgen_complete").exists()


def test_dummy_weights_need_no_checkpoint(tmp_path):
    """--path _DUMMY_: a known config, no checkpoint, valid ids out."""
    from flexgen.flex_opt import get_opt_config
    env = _env(tmp_path)
    cfg = get_opt_config("facebook/opt-125m", num_hidden_layers=2, hidden_size=64, n_head=4, input_dim=64,
                         ffn_embed_dim=128, vocab_size=512, max_seq_len=64)
    lm = OptLM(cfg, env, "/nonexistent/_DUMMY_", T.make_policy("mixed"), progress=False)
    try:
        out = lm.generate(T.make_prompts(4, 8, 512, 1), max_new_tokens=4)
        assert out.shape == (4, 12) and out.min() >= 0 and out.max() < 512
    finally:
        lm.close()
        env.close_copy_threads()


# ---- the command line -----------------------------------------------------------------------------

def run_cli(args, module="flexgen.flex_opt", cwd=None, timeout=180, env=None):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def assert_user_error(res, *must_mention):
    """Exit status 2, exactly one `error: ...` line on stderr (the last one), no traceback."""
    err = res.stderr
    assert res.returncode == 2, f"exit status {res.returncode}\nstdout: {res.stdout[-2000:]}\nstderr: {err[-2000:]}"
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.strip()]
    error_lines = [l for l in lines if re.search(r"(^|: )error: \S", l)]
    assert len(error_lines) == 1, f"want one error line, got: {err!r}"
    assert error_lines[0] == lines[-1], f"the error line must come last: {err!r}"
    for word in must_mention:
        assert re.search(word, error_lines[0], re.I), f"{word!r} not in {error_lines[0]!r}"


BAD_CLI = {
    "percent_three_numbers": (["--percent", 100, 0, 100], ["six"]),
    "percent_seven_numbers": (["--percent", 100, 0, 100, 0, 100, 0, 0], ["six"]),
    "percent_negative": (["--percent", -10, 50, 100, 0, 100, 0], ["weights"]),
    "percent_weights_over_100": (["--percent", 60, 50, 100, 0, 100, 0], ["weights", "100"]),
    "percent_cache_over_100": (["--percent", 100, 0, 50, 60, 100, 0], ["cache", "100"]),
    "percent_act_over_100": (["--percent", 100, 0, 100, 0, 100, 1], ["activations", "100"]),
    "percent_not_a_number": (["--percent", "a", 0, 100, 0, 100, 0], ["percent"]),
    "gpu_batch_size_zero": (["--gpu-batch-size", 0], ["gpu-batch-size"]),
    "num_gpu_batches_negative": (["--num-gpu-batches", -1], ["num-gpu-batches"]),
    "attn_sparsity_zero": (["--attn-sparsity", 0], ["sparsity"]),
    "unknown_model": (["--model", "facebook/opt-999b"], ["opt-999b"]),
    "missing_model_dir": (["--model", "/nonexistent/opt-dir"], ["nonexistent"]),
}
# Flags every bad-input run starts from (cheap: dummy weights, tiny lengths, nothing allocated yet).
_BASE = ["--model", "facebook/opt-125m", "--path", "_DUMMY_", "--prompt-len", 8, "--gen-len", 2,
         "--gpu-batch-size", 1, "--device", "cpu", "--no-log"]


def _args_with(overrides):
    args = list(_BASE)
    for item in overrides:                 # an overridden flag replaces its base value
        if isinstance(item, str) and item.startswith("--") and item in args:
            i = args.index(item)
            del args[i:i + 2]
    return args + list(overrides)


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_cli_bad_input(case, tmp_path):
    overrides, words = BAD_CLI[case]
    res = run_cli(_args_with(overrides) + ["--offload-dir", tmp_path / "off"], cwd=tmp_path)
    assert_user_error(res, *words)


def test_cli_offload_dir_not_writable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = run_cli(_BASE + ["--offload-dir", blocker / "sub"], cwd=tmp_path)
    assert_user_error(res, "offload")


def test_cli_context_too_long(zoo, tmp_path):
    """The tiny OPT has 64 positions: 60 + 8 does not fit."""
    res = run_cli(["--model", zoo.checkpoint("opt-tiny"), "--path", zoo.cache_root, "--prompt-len", 60,
                   "--gen-len", 8, "--gpu-batch-size", 1, "--device", "cpu", "--no-log",
                   "--offload-dir", tmp_path / "off"], cwd=tmp_path)
    assert_user_error(res, "64")


@pytest.mark.parametrize("how", ["missing", "truncated"])
def test_cli_broken_checkpoint(zoo, tmp_path, how):
    d = _broken_checkpoint(zoo, tmp_path, how)
    res = run_cli(["--model", d, "--path", tmp_path / "cache", "--prompt-len", 8, "--gen-len", 2,
                   "--gpu-batch-size", 1, "--device", "cpu", "--no-log", "--offload-dir", tmp_path / "off"],
                  cwd=tmp_path)
    assert_user_error(res, "safetensors|truncated|corrupt|weight")


def test_cli_wrong_family(zoo, tmp_path):
    res = run_cli(["--model", zoo.checkpoint("opt-tiny"), "--path", zoo.cache_root, "--prompt-len", 8,
                   "--gen-len", 2, "--gpu-batch-size", 1, "--device", "cpu", "--no-log",
                   "--offload-dir", tmp_path / "off"], module="flexgen.flex_llama", cwd=tmp_path)
    assert_user_error(res, "flex_opt")


_NUM = r"\d+\.\d{3}"
BENCHMARK_BLOCK = re.compile(
    rf"^model size: (?P<model>{_NUM}) GB\tcache size: {_NUM} GB\thidden size \(p\): {_NUM} GB\n"
    rf"peak gpu mem: {_NUM} GB\tprojected: (?:True|False)\n"
    rf"prefill latency: (?P<prefill>{_NUM}) s\tprefill throughput: {_NUM} token/s\n"
    rf"decode latency: (?P<decode>{_NUM}) s\tdecode throughput: {_NUM} token/s\n"
    rf"total latency: (?P<total>{_NUM}) s\ttotal throughput: (?P<tput>{_NUM}) token/s$", re.M)


def _check_block(text, num_prompts, gen_len):
    m = BENCHMARK_BLOCK.search(text)
    assert m, f"no FlexGen benchmark block in:\n{text}"
    prefill, decode, total = float(m["prefill"]), float(m["decode"]), float(m["total"])
    assert float(m["model"]) >= 0
    assert total == pytest.approx(prefill + decode, abs=2e-3)
    # throughput = prompts * gen_len / total latency (the latency printed rounded to 1 ms)
    lo, hi = num_prompts * gen_len / (total + 6e-4), num_prompts * gen_len / max(total - 6e-4, 1e-9)
    assert lo * 0.999 <= float(m["tput"]) <= hi * 1.001, (m["tput"], total)
    return m


def test_cli_dummy_benchmark_block(tmp_path):
    res = run_cli(["--model", "facebook/opt-125m", "--path", "_DUMMY_", "--prompt-len", 16, "--gen-len", 4,
                   "--gpu-batch-size", 2, "--device", "cpu", "--no-log", "--offload-dir", tmp_path / "off"],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    m = _check_block(res.stdout, 2, 4)
    assert 0.2 < float(m["model"]) < 0.3, "opt-125m is about 0.23 GB in fp16"
    assert not list(tmp_path.glob("*.log")), "--no-log must not write a log file"


def test_cli_checkpoint_run_appends_log(zoo, tmp_path):
    """A local checkpoint through the CLI, offloaded, with FlexGen's flags; --log-file appends."""
    log = tmp_path / "bench.log"
    log.write_text("an earlier line\n")
    args = ["--model", zoo.checkpoint("opt-tiny"), "--path", zoo.cache_root, "--prompt-len", 12, "--gen-len", 3,
            "--gpu-batch-size", 2, "--num-gpu-batches", 2, "--percent", 30, 40, 50, 25, 0, 100,
            "--overlap", "false", "--sep-layer", "false", "--cpu-cache-compute", "--device", "cpu",
            "--offload-dir", tmp_path / "off", "--log-file", log]
    res = run_cli(args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    _check_block(res.stdout, 4, 3)
    text = log.read_text()
    assert text.startswith("an earlier line\n")
    _check_block(text, 4, 3)
    res = run_cli(args, cwd=tmp_path)                    # a second run appends a second block
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(BENCHMARK_BLOCK.findall(log.read_text())) == 2


def test_cli_llama_checkpoint(zoo, tmp_path):
    res = run_cli(["--model", zoo.checkpoint("llama-tiny-gqa"), "--path", zoo.cache_root, "--prompt-len", 10,
                   "--gen-len", 3, "--gpu-batch-size", 1, "--num-gpu-batches", 3, "--percent", 0, 50, 0, 50, 0, 50,
                   "--attn-sparsity", 0.5, "--pin-weight", "false", "--device", "cpu", "--no-log",
                   "--offload-dir", tmp_path / "off"], module="flexgen.flex_llama", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    _check_block(res.stdout, 3, 3)
