"""The completion app and the batch runner on the embedded SmolLM2 (CPU): every id exactly once,
resume after SIGKILL gives what an uninterrupted run gives, a partial last line is repaired,
malformed lines are reported with their line numbers, duplicate ids stop the run before any work."""
import json
import os
import shutil
import subprocess
import sys
import types

import pytest

from kill_resume import kill_after_first_line

from flexgen.apps import batch, completion
from flexgen.cli import lm_class_for
from flexgen.flex_llama import ExecutionEnv, LlamaLM, Policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Hello", "def add(a, b):", "Once upon a time",
           "The best way to learn a language is", "Water boils at", "A long time ago in a galaxy far, far away,"]


@pytest.fixture(scope="module")
def weight_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("smol_weights"))


@pytest.fixture(scope="module")
def smol(weight_root, tmp_path_factory):
    """One block of one prompt: every prompt runs alone, so results do not depend on chunking."""
    env = ExecutionEnv.create(str(tmp_path_factory.mktemp("off")), device="cpu")
    lm = LlamaLM("smollm2-135m", env, weight_root, Policy(1, 1, 100, 0, 100, 0, 100, 0), progress=False)
    yield lm
    lm.close()
    env.close_copy_threads()


@pytest.fixture
def shared_model(smol, monkeypatch):
    """The batch CLI loads the module's model instead of a new one (loading is tested elsewhere)."""
    class Shared:
        def __getattr__(self, name):
            return getattr(smol, name)

        def close(self):
            pass

    monkeypatch.setattr(batch, "open_model",
                        lambda args, policy, **kw: (Shared(), types.SimpleNamespace(close_copy_threads=lambda: None)))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def read_results(path):
    with open(path) as f:
        text = f.read()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def requests(n=8, max_new_tokens=6):
    return [{"id": f"p{i}" if i % 2 else i, "prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": max_new_tokens}
            for i in range(n)]


def model_flags(weight_root, tmp_path, block=(1, 1)):
    return ["--model", "smollm2-135m", "--path", weight_root, "--offload-dir", str(tmp_path / "offload"),
            "--device", "cpu", "--gpu-batch-size", str(block[0]), "--num-gpu-batches", str(block[1]),
            "--percent", "100", "0", "100", "0", "100", "0", "--verbose", "0"]


# ---- completion app --------------------------------------------------------------------------

def test_completion_app_picks_the_family():
    from flexgen.flex_opt import OptLM
    assert lm_class_for("facebook/opt-125m") is OptLM
    assert lm_class_for("huggyllama/llama-7b") is LlamaLM


def test_completion_app_prints_prompts_and_completions(smol, weight_root, tmp_path, capsys, monkeypatch):
    import flexgen.weights
    tok = smol.tokenizer
    monkeypatch.setattr(flexgen.weights, "load_tokenizer", lambda source: tok)  # the same file; saves 6 s
    completion.main(model_flags(weight_root, tmp_path, block=(2, 1)) + ["--gen-len", "8", "--seed", "0"])
    out = capsys.readouterr().out
    assert "Outputs:" in out and "Shutdown..." in out
    for i, prompt in enumerate(completion.PROMPTS):
        assert f"{i}: {prompt}" in out
    # each completion stops at a newline: the line after the prompt's last line is the separator
    for prompt in completion.PROMPTS:
        after = out.split(prompt, 1)[1]
        assert after.split("\n", 1)[1].startswith("-" * 70)


def test_completion_app_errors_exit_2(tmp_path, capsys):
    for argv in (["--model", "no-such-model"], ["--percent", "1", "2", "3"]):
        with pytest.raises(SystemExit) as e:
            completion.main(argv + ["--offload-dir", str(tmp_path)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")


def byte_tokenizer(directory):
    """A byte-level BPE tokenizer small enough for the tiny checkpoints' 320-token vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Question: Answer: the of a"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(directory)


def test_apps_on_an_opt_checkpoint(zoo, tmp_path, capsys):
    """The family comes from the model: a tiny OPT checkpoint runs through OptLM, offloaded."""
    ckpt = tmp_path / "opt-apps"
    shutil.copytree(zoo.checkpoint("opt-tiny"), ckpt)
    byte_tokenizer(ckpt)
    flags = ["--model", str(ckpt), "--path", str(tmp_path / "w"), "--offload-dir", str(tmp_path / "off"),
             "--device", "cpu", "--percent", "50", "50", "0", "100", "100", "0", "--verbose", "0"]
    completion.main(flags + ["--prompt", "Question: the", "--prompt", "Answer: a", "--gen-len", "6", "--seed", "1"])
    out = capsys.readouterr().out
    assert "0: Question: the" in out and "1: Answer: a" in out

    write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "the a"}, {"id": 2, "prompt": "of " * 80},
                                        {"id": 3, "prompt": "Question:", "temperature": 1.0}])
    args = flags + ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--gen-len", "4"]
    with pytest.raises(SystemExit) as e:     # id 2 does not fit the 64-position context
        batch.main(args + ["--strict"])
    assert e.value.code == 2 and "id 2" in capsys.readouterr().err
    batch.main(args)
    assert "line 2: id 2: " in capsys.readouterr().err
    results = read_results(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in results) == [1, 3]
    assert all(1 <= r["completion_tokens"] <= 4 and r["finish_reason"] in ("stop", "length") for r in results)


# ---- batch runner ----------------------------------------------------------------------------

def test_batch_cli_runs_every_id_once(shared_model, weight_root, tmp_path, capsys):
    rows = requests(8)
    rows[1].update(temperature=0.8, top_p=0.9)
    rows[3].update(stop=["\n"], max_new_tokens=10)
    rows[5].update(stop=",")
    write_jsonl(tmp_path / "in.jsonl", rows)
    out_path = tmp_path / "out.jsonl"
    batch.main(model_flags(weight_root, tmp_path) + ["--input", str(tmp_path / "in.jsonl"), "--output", str(out_path),
                                                     "--logprobs", "--chunk-blocks", "2"])
    results = read_results(out_path)
    assert sorted(map(json.dumps, (r["id"] for r in results))) == sorted(map(json.dumps, (r["id"] for r in rows)))
    by_id = {json.dumps(r["id"]): r for r in results}
    for row in rows:
        r = by_id[json.dumps(row["id"])]
        assert set(r) == {"id", "completion", "prompt_tokens", "completion_tokens", "finish_reason", "logprobs"}
        assert isinstance(r["completion"], str) and r["prompt_tokens"] > 0
        assert 1 <= r["completion_tokens"] <= row["max_new_tokens"]
        assert len(r["logprobs"]) == r["completion_tokens"] and all(lp <= 0 for lp in r["logprobs"])
        assert r["finish_reason"] in ("stop", "length")
    captured = capsys.readouterr()
    assert "8 prompts done" in captured.out and "tokens/s" in captured.out

    # a rerun has nothing to do and adds nothing
    batch.main(model_flags(weight_root, tmp_path) + ["--input", str(tmp_path / "in.jsonl"), "--output", str(out_path)])
    assert read_results(out_path) == results
    assert "0 prompts done (8 already in" in capsys.readouterr().out


def test_sampled_run_resumes_reproducibly(smol, tmp_path):
    """A run resumed after its first chunks samples what the uninterrupted run sampled."""
    rows = [dict(r, temperature=0.9, top_p=0.95) for r in requests(4, max_new_tokens=8)]
    a = batch.run_batch(smol, rows, tmp_path / "a.jsonl", progress=False, seed=3)
    assert a["prompts"] == 4 and a["generated_tokens"] > 0
    full = (tmp_path / "a.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "b.jsonl").write_text("".join(full[:2]))
    b = batch.run_batch(smol, rows, tmp_path / "b.jsonl", progress=False, seed=3)
    assert b["already_done"] == 2 and b["prompts"] == 2
    assert read_results(tmp_path / "b.jsonl") == read_results(tmp_path / "a.jsonl")


def test_sigkill_then_resume_equals_uninterrupted_run(smol, weight_root, tmp_path):
    rows = requests(8, max_new_tokens=12)
    write_jsonl(tmp_path / "in.jsonl", rows)
    reference = batch.run_batch(smol, rows, tmp_path / "ref.jsonl", progress=False)
    assert reference["prompts"] == 8
    expected = {json.dumps(r["id"]): r for r in read_results(tmp_path / "ref.jsonl")}

    out_path = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "flexgen.apps.batch"] + model_flags(weight_root, tmp_path) + [
        "--input", str(tmp_path / "in.jsonl"), "--output", str(out_path), "--chunk-blocks", "1", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    first = kill_after_first_line(cmd, ROOT, env, out_path, tmp_path / "log1", timeout=240)
    assert 1 <= first < 8, first

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-2000:]
    results = read_results(out_path)
    ids = [json.dumps(r["id"]) for r in results]
    assert sorted(ids) == sorted(expected) and len(set(ids)) == len(ids)
    assert {json.dumps(r["id"]): r for r in results} == expected
    assert f"{8 - first} prompts done ({first} already in {out_path}" in second.stdout, second.stdout


def test_truncated_last_line_is_repaired(smol, tmp_path, capsys):
    rows = requests(3)
    out_path = tmp_path / "out.jsonl"
    good = {"id": 0, "completion": "KEPT", "prompt_tokens": 1, "completion_tokens": 1, "finish_reason": "length"}
    out_path.write_text(json.dumps(good) + "\n" + '{"id": "p1", "completion": " Par')
    summary = batch.run_batch(smol, rows, out_path, progress=False)
    assert summary["already_done"] == 1 and summary["prompts"] == 2
    assert "repaired" in capsys.readouterr().err
    results = read_results(out_path)
    assert results[0] == good                        # kept, not redone
    assert sorted(json.dumps(r["id"]) for r in results) == sorted(json.dumps(r["id"]) for r in rows)

    # a bad line followed by good ones is not a crash artefact: refuse, change nothing
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(good) + "\nnot json\n" + json.dumps(dict(good, id="p1")) + "\n")
    before = broken.read_bytes()
    with pytest.raises(batch.BatchOutputError, match="line 2"):
        batch.run_batch(smol, rows, broken, progress=False)
    assert broken.read_bytes() == before


def test_malformed_lines_reported_and_skipped(shared_model, weight_root, tmp_path, capsys):
    lines = [json.dumps({"id": "a", "prompt": "Hello", "max_new_tokens": 3}),
             '{"id": "b", "prompt": ',                                       # 2: bad JSON
             json.dumps({"id": "c", "prompt": "Water boils at", "max_new_tokens": 3}),
             json.dumps({"prompt": "no id"}),                                 # 4: missing id
             json.dumps({"id": [1], "prompt": "x"}),                          # 5: id of the wrong type
             "",                                                              # 6: blank, ignored
             json.dumps({"id": "g", "prompt": "x", "max_new_tokens": "5"}),   # 7: wrong type
             json.dumps({"id": "h", "prompt": "x", "temperature": -1}),       # 8: out of range
             json.dumps({"id": 9, "prompt": "1, 2, 3,", "max_new_tokens": 3, "stop": [","]})]
    write_jsonl(tmp_path / "in.jsonl", lines)
    out_path = tmp_path / "out.jsonl"
    args = model_flags(weight_root, tmp_path) + ["--input", str(tmp_path / "in.jsonl"), "--output", str(out_path)]

    with pytest.raises(SystemExit) as e:
        batch.main(args + ["--strict"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and not out_path.exists()
    for n in (2, 4, 5, 7, 8):
        assert f"line {n}:" in err
    assert "line 6:" not in err

    batch.main(args)
    err = capsys.readouterr().err
    for n in (2, 4, 5, 7, 8):
        assert f"line {n}:" in err
    assert sorted(json.dumps(r["id"]) for r in read_results(out_path)) == sorted(['"a"', '"c"', "9"])


def test_duplicate_ids_fail_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(batch, "open_model", lambda *a: pytest.fail("the model must not be loaded"))
    write_jsonl(tmp_path / "in.jsonl", [{"id": "x", "prompt": "a"}, {"id": 2, "prompt": "b"},
                                        {"id": "x", "prompt": "c"}, {"id": "2", "prompt": "d"}])
    out_path = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as e:
        batch.main(["--input", str(tmp_path / "in.jsonl"), "--output", str(out_path),
                    "--offload-dir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'id "x" on lines 1 and 3' in err and "error:" in err
    assert not out_path.exists()

    with pytest.raises(batch.BatchInputError, match="duplicate id"):
        batch.run_batch(None, [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}], out_path)
    assert not out_path.exists()
