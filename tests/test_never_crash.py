"""Never crash on a small machine: the allocator set up before CUDA starts, --cpu-mem as a real
cap, running out of memory at run time as one clear error (injected here: CPU-only CI has no GPU
to exhaust), the batch runner's retry with a smaller batch, and this machine's profile measured
when missing and refused when foreign."""
import json
import os
import subprocess
import sys

import pytest
import torch

import tiny_models as T
from conftest import DEVICE_TYPE
from test_policy_and_cli import REPO, assert_user_error, run_cli

from flexgen import cli
from flexgen.engine.schedule import BlockRunner
from flexgen.env import HostBytes
from flexgen.memory.oom import ALLOCATOR_DEFAULT, HostMemoryCapExceeded


def _py(code, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    e.update(env, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


def test_allocator_uses_expandable_segments_unless_the_user_chose():
    code = "import os, flexgen; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"
    assert _py(code).stdout.strip() == ALLOCATOR_DEFAULT
    assert _py(code, PYTORCH_CUDA_ALLOC_CONF="garbage_collection_threshold:0.6").stdout.strip() == \
        "garbage_collection_threshold:0.6"
    assert _py(code, PYTORCH_ALLOC_CONF="expandable_segments:False").stdout.strip() == "None"


def test_host_cap_refuses_past_it_and_counts_nothing():
    hb = HostBytes(cap=1000)
    free = hb.hold(600, pinned=False)
    with pytest.raises(HostMemoryCapExceeded, match="--cpu-mem"):
        hb.hold(500, pinned=True)
    assert hb.pinned == 0 and hb.pageable == 600
    free()
    hb.hold(1000, pinned=True)


def _tiny_cli_args(zoo, tmp_path, *extra):
    return ["--model", zoo.checkpoint("opt-tiny"), "--path", str(tmp_path / "cache"), "--offload-dir",
            str(tmp_path / "off"), "--prompt-len", "8", "--gen-len", "4", "--gpu-batch-size", "2",
            "--num-gpu-batches", "2", "--device", "cpu", "--no-log", *extra]


def test_cpu_mem_is_the_memory_checks_budget_and_a_real_cap(zoo, tmp_path):
    # planned: the check refuses a policy whose CPU tier exceeds the cap, before loading
    res = run_cli(_tiny_cli_args(zoo, tmp_path, "--percent", "0", "100", "100", "0", "100", "0",
                                 "--cpu-mem", "64KiB"))
    assert_user_error(res, "does not fit", "host memory")
    # enforced: forced past the check, the first allocation over the cap ends the run clearly
    res = run_cli(_tiny_cli_args(zoo, tmp_path, "--percent", "0", "100", "100", "0", "100", "0",
                                 "--cpu-mem", "64KiB", "--force"))
    assert_user_error(res, "out of host memory", "--cpu-mem")


@pytest.mark.skipif(DEVICE_TYPE != "cpu", reason="runs the CLI on the CPU")
def test_out_of_memory_mid_generation_is_one_clear_error(zoo, tmp_path, monkeypatch, capsys):
    real = BlockRunner._run_step

    def run_step(self, step, *a, **kw):
        if step.i == 2:   # the third step of the benchmark run: the cache has grown, then CUDA refuses
            raise MemoryError("cannot allocate 1.50 GiB")   # what a CPU run meets
        return real(self, step, *a, **kw)

    monkeypatch.setattr(BlockRunner, "_run_step", run_step)
    monkeypatch.setenv("FLEXGEN_CUDA_GRAPHS", "0")   # the eager decode step is where the failure is injected
    from flexgen.flex_opt import OptLM
    with pytest.raises(SystemExit) as exc:
        cli.main(OptLM, "facebook/opt-1.3b", "~/opt_weights", "flex_opt",
                 _tiny_cli_args(zoo, tmp_path, "--percent", "100", "0", "100", "0", "100", "0", "--verbose", "0"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = [line for line in err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("error: out of host memory with --percent 100 0 100 0 100 0")
    assert "a policy that should fit: --percent" in err[0] and "cannot allocate 1.50 GiB" in err[0]
    assert "should fit: --percent 100 0 100 0 100 0 --gpu-batch-size 2" not in err[0]
    assert not os.listdir(tmp_path / "off")   # offload files removed


@pytest.fixture
def text_lm(zoo, tmp_path):
    """The tiny LLaMA checkpoint, copied with a word-level tokenizer beside it (text in, text out)."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from flexgen.flex_llama import ExecutionEnv, LlamaLM
    d = tmp_path / "llama-tiny-text"
    shutil.copytree(zoo.checkpoint("llama-tiny"), d)
    vocab = {f"w{i}": i for i in range(T.SPECS["llama-tiny"][1]["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0", eos_token="w2",
                            bos_token="w1").save_pretrained(d)
    env = ExecutionEnv.create(str(tmp_path / "off"), device="cpu")
    lm = LlamaLM(str(d), env, str(tmp_path / "cache"), T.make_policy("mixed_ngb3"), progress=False)
    yield lm
    lm.close()
    env.close_copy_threads()


def test_batch_runner_retries_a_block_that_ran_out_of_memory(text_lm, tmp_path):
    from flexgen.apps.batch import run_batch
    lm = text_lm
    reqs = [{"id": i, "prompt": " ".join(f"w{3 + (i * 7 + j) % 300}" for j in range(2 + i % 5)),
             "max_new_tokens": 3} for i in range(11)]
    expected = run_batch(lm, reqs, str(tmp_path / "expected.jsonl"), progress=False, log=lambda m: None)
    real = lm.run_rows

    def run_rows(ids, *a, **kw):   # more than one sequence per GPU batch "runs out of GPU memory"
        if lm.policy.gpu_batch_size > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")
        return real(ids, *a, **kw)

    lm.run_rows = run_rows
    out = tmp_path / "out.jsonl"
    printed = []
    summary = run_batch(lm, reqs, str(out), progress=False, log=printed.append)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == list(range(11))          # every id exactly once
    want = {json.loads(line)["id"]: json.loads(line)["completion"]
            for line in (tmp_path / "expected.jsonl").read_text().splitlines()}
    assert {r["id"]: r["completion"] for r in rows} == want           # and the same answers
    assert any("retrying with --gpu-batch-size 1" in m for m in printed), printed
    assert summary["prompts"] == expected["prompts"] == 11


def test_profile_is_measured_when_missing_and_refused_when_foreign(zoo, tmp_path):
    prof = tmp_path / "profile.json"
    env = {"FLEXGEN_PROFILE": str(prof)}
    args = _tiny_cli_args(zoo, tmp_path, "--percent", "100", "0", "100", "0", "100", "0")
    res = run_cli(args, env=env)
    assert res.returncode == 0, res.stderr
    assert "no profile of this machine: measured this machine in" in res.stdout and prof.exists()
    assert "predicted vs measured:" in res.stdout
    res = run_cli(args, env=env)
    assert "measured this machine" not in res.stdout            # cached and this machine's: used
    data = json.loads(prof.read_text())
    data["machine"]["gpu"] = {"name": "NVIDIA H100 80GB HBM3", "mem_bytes": 85 * 2**30}
    data["machine"]["cores"] += 14
    prof.write_text(json.dumps(data))
    res = run_cli(args, env=env)
    assert res.returncode == 0, res.stderr
    line = next(l for l in res.stdout.splitlines() if "another machine's" in l)
    assert "GPU NVIDIA H100 80GB HBM3 there, none here" in line and "measured this machine in" in line
    assert json.loads(prof.read_text())["machine"]["gpu"] is None   # replaced by this machine's


def test_apps_check_the_policy_fits_before_loading(zoo, tmp_path):
    """The apps open their model through cli.open_model, which runs flex_*'s pre-flight check:
    a policy that cannot fit ends with one error line naming a policy that would, before any
    weight is read (the batch runner here; HELM, data wrangling and lm-eval go the same way)."""
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "the of a", "max_tokens": 2}\n')
    args = _tiny_cli_args(zoo, tmp_path, "--percent", "0", "100", "100", "0", "100", "0", "--cpu-mem", "64KiB",
                          "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl")
    res = run_cli([a for a in args if a != "--no-log"], module="flexgen.apps.batch")
    assert_user_error(res, "does not fit", "host memory")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
