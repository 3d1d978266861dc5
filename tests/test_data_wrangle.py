"""The data-wrangling app: serialisation and prompts against hand-written text for every task,
answer parsing and metrics on known predictions, `prepare` on a stand-in sdist, clear errors for
bad CSV files, and on SmolLM2 over the committed slice (tests/data/data_wrangle, from the
py-entitymatching 0.4.2 sdist): exactly transformers' greedy completions, and SIGKILL + rerun
gives every example once with the same predictions."""
import csv
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from kill_resume import kill_after_first_line

from flexgen.apps.data_wrangle import app, prepare as prep
from flexgen.apps.data_wrangle.datasets import DatasetError, read_dataset
from flexgen.apps.data_wrangle.metrics import compute_metrics, parse_answer
from flexgen.apps.data_wrangle.prompts import (build_prompt, hard_pairs, manual_prompt, random_demonstrations,
                                               validation_demonstrations)
from flexgen.apps.data_wrangle.serialize import serialize_imputation, serialize_match_pair, serialize_row

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICE = os.path.join(ROOT, "tests", "data", "data_wrangle")
FZ = os.path.join(SLICE, "entity_matching", "structured", "Fodors-Zagats")
REST = os.path.join(SLICE, "data_imputation", "Restaurant")


def write_csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


# ---- serialisation and prompts -------------------------------------------------------------------

def test_serialize_row_separators_and_missing_values():
    fields = [("name", " oceana "), ("addr", None), ("type", "seafood")]
    assert serialize_row(fields) == "name: oceana. addr: nan. type: seafood"
    assert serialize_row(fields, sep_tok=";", nan_tok="") == "name: oceana ; addr:  ; type: seafood"
    assert serialize_row(fields, sep_tok="") == "name: oceana addr: nan type: seafood"
    assert serialize_imputation([("name", "x")], " What is the city?", sep_tok="|") == "name: x | What is the city? "
    assert serialize_match_pair([("title", "a")], [("title", "b")], " Same Song?", "Song") == \
        "Song A is title: a. Song B is title: b. Same Song? "


def test_entity_matching_prompt(tmp_path):
    d = tmp_path / "entity_matching" / "structured" / "Fodors-Zagats"
    write_csv(d / "tableA.csv", ["id", "name", "city"], [[1, "arts deli", "studio city"], [2, "oceana", ""]])
    write_csv(d / "tableB.csv", ["id", "name", "city"], [[7, "arts delicatessen", "studio city"]])
    write_csv(d / "train.csv", ["ltable_id", "rtable_id", "label"], [[1, 7, 1], [2, 7, 0]])
    write_csv(d / "test.csv", ["ltable_id", "rtable_id", "label"], [[2, 7, 0]])
    ds = read_dataset(str(d))
    assert ds.spec.task == "entity_matching"
    ex = ds.splits["test"][0]
    assert ex.text == ("Product A is name: oceana. city: nan. Product B is name: arts delicatessen. city: studio city."
                       " Are Product A and Product B the same? ")
    assert ex.label_str == "No\n"
    demos = random_demonstrations(ds.splits["train"], 1, seed=3)
    first = ds.splits["train"][__import__("random").Random(3).sample(range(2), 1)[0]]
    assert demos == (first.text + first.label_str).strip() + "\n"
    assert build_prompt(demos, ex) == demos + "\n" + ex.text.strip()
    assert build_prompt("", ex, ds.spec.instruction) == \
        "Are Product A and Product B the same? Yes or No?  " + ex.text.strip()
    # The paper's manual prompt for Fodors-Zagats ends with its last demonstration.
    assert manual_prompt(ds.name, ds.spec, ex).endswith("Are Product A and B the same? Yes\n")


def test_beer_drops_and_renames_columns_itunes_uses_song(tmp_path):
    d = tmp_path / "entity_matching" / "structured" / "Beer"
    cols = ["id", "Beer_Name", "Brew_Factory_Name", "Style", "ABV"]
    write_csv(d / "tableA.csv", cols, [[1, "Red Ale", "Big Brew", "Amber", "5%"]])
    write_csv(d / "tableB.csv", cols, [[1, "Red Ale X", "Big", "Amber", "5%"]])
    write_csv(d / "train.csv", ["ltable_id", "rtable_id", "label"], [[1, 1, 1]])
    ex = read_dataset(str(d)).splits["train"][0]
    assert ex.text == ("Product A is name: Red Ale. factory: Big Brew. Product B is name: Red Ale X. factory: Big."
                       " Are Product A and Product B the same? ")
    assert ex.label_str == "Yes\n"


def test_imputation_prompt_with_manual_prompt(tmp_path):
    d = tmp_path / "data_imputation" / "Restaurant"
    write_csv(d / "train.csv", ["id", "name", "addr", "city", "phone", "type"],
              [["z-1", "le chardonnay", "8284 melrose ave.", "los angeles", "213/655-8880", "french"]])
    write_csv(d / "test.csv", ["id", "name", "addr", "city", "phone", "type"],
              [["z-2", "oceana", "55 e. 54th st.", "new york", "", "seafood"]])
    ds = read_dataset(str(d), nan_tok="")
    ex = ds.splits["test"][0]
    assert ex.text == "name: oceana. addr: 55 e. 54th st.. phone: . type: seafood. What is the city? "
    assert ex.label_str == "new york\n"
    assert build_prompt(manual_prompt(ds.name, ds.spec, ex), ex) == (
        "name: oceana. addr: 55 e. 54th st.. phone: 212/759-5941. type: seafood. What is the city? new york\n\n"
        "name: oceana. addr: 55 e. 54th st.. phone: 212-759-5941. type: seafood. What is the city? new york city\n\n"
        "name: oceana. addr: 55 e. 54th st.. phone: . type: seafood. What is the city?")
    assert build_prompt("", ex, ds.spec.instruction).startswith("What is the city? san fransisco, new york, denver?  name")


def test_error_detection_prompts(tmp_path):
    d = tmp_path / "error_detection" / "Hospital"
    write_csv(d / "table.csv", ["City", "Score"], [["birmingxam", "12"], ["dothan", "7"]])
    write_csv(d / "train.csv", ["row_id", "col_name", "is_clean"], [[0, "City", 0], [1, "City", 1]])
    ds = read_dataset(str(d))
    a, b = ds.splits["train"]
    assert a.text == "Is there a x spelling error in City: birmingxam? " and a.label_str == "Yes\n"
    assert b.text == "Is there a x spelling error in City: dothan? " and b.label_str == "No\n"
    # The manual prompt is chosen by the column.
    assert manual_prompt(ds.name, ds.spec, a).startswith("Is there a x spelling error in City:")

    d = tmp_path / "error_detection" / "Adult"
    write_csv(d / "train.csv", ["age", "sex", "col_name", "is_clean"], [["39", "male", "sex", 1]])
    ex = read_dataset(str(d)).splits["train"][0]
    assert ex.text == "age: 39. sex: male\n\nIs there an error in sex: male?  " and ex.label_str == "No\n"


def test_schema_matching_prompt(tmp_path):
    d = tmp_path / "schema_matching" / "Synthea"
    write_csv(d / "train.csv", ["omop", "table", "label", "des1"], [["person-person_id", "patients-id", 0, "x"]])
    ds = read_dataset(str(d))
    ex = ds.splits["train"][0]
    assert ex.text == "A is person-person_id. B is patients-id. Are A and B the same? Yes or No? "
    assert ex.label_str == "No\n"
    assert build_prompt("", ex, None) == "A is person-person_id. B is patients-id. Are A and B the same? Yes or No?"


def test_dblp_acm_manual_prompt_keyed_by_venue():
    ds = read_dataset(os.path.join(SLICE, "entity_matching", "structured", "DBLP-ACM"))
    for ex in ds.splits["test"]:
        venue = ex.attrs["venue_A"]
        p = manual_prompt(ds.name, ds.spec, ex)
        if venue and venue.lower() in ("vldb", "sigmod record", "vldb j.", "sigmod conference"):
            assert f"venue: {venue.lower()}. year" in p.split("\n")[0], (venue, p[:300])


def test_task_from_flag_and_errors(tmp_path):
    d = tmp_path / "mine"
    write_csv(d / "train.csv", ["id", "brand", "title"], [[1, "sony", "tv"]])
    with pytest.raises(DatasetError, match="give --task"):
        read_dataset(str(d))
    with pytest.raises(DatasetError, match="--impute_col"):
        read_dataset(str(d), task="data_imputation")
    ex = read_dataset(str(d), task="data_imputation", impute_col="brand").splits["train"][0]
    assert ex.text == "title: tv. What is the brand? " and ex.label_str == "sony\n"


# ---- parsing, metrics, demonstration choice --------------------------------------------------------

def test_parse_answers():
    assert parse_answer(" Yes", "entity_matching") == "yes"
    assert parse_answer(" No, Product", "entity_matching") == "no"
    assert parse_answer("Nope", "entity_matching") == "nope"
    assert parse_answer(" yes\nProduct A", "error_detection_spelling") == "yes"
    assert parse_answer(" New York ", "data_imputation") == "new york"
    assert parse_answer(" new york city", "data_imputation") == "new york city"


def test_metrics_on_known_predictions():
    recs = [{"parsed": p, "gold": g} for p, g in
            [("yes", "Yes"), ("yes", "Yes"), ("no", "Yes"), ("no", "No"), ("yes", "No"), ("maybe", "No")]]
    m = compute_metrics(recs, "entity_matching")
    # tp 2, fn 1, tn 1, fp 2 (a No example answered other than No counts as a false positive)
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (2, 1, 1, 2)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["accuracy"] == pytest.approx(0.5)
    m = compute_metrics([{"parsed": "new york", "gold": "New York"}, {"parsed": "ny", "gold": "new york"}],
                        "data_imputation")
    assert m == {"examples": 2, "accuracy": 0.5, "correct": 1}
    assert compute_metrics([{"parsed": "no", "gold": "Yes"}], "entity_matching")["f1"] == 0.0


def test_hard_pairs_and_validation_clusters(tmp_path, monkeypatch):
    # 0 and 1 are nearly the same with different labels and 1 was wrong: they are picked first.
    emb = [[1, 0], [0.99, 0.1], [0, 1], [0.1, 0.99]]
    assert hard_pairs(emb, ["yes", "no", "no", "no"], {1}, 2) == [0, 1]
    # Only pairs with 1 and a "no" qualify: (1, 3) is more similar than (1, 2).
    assert hard_pairs(emb, ["yes", "yes", "no", "no"], {1}, 4) == [1, 3, 2]
    assert hard_pairs(emb, ["yes", "no", "no", "no"], set(), 2) == []    # no mistakes, no pairs

    d = tmp_path / "entity_matching" / "structured" / "Fodors-Zagats"
    write_csv(d / "tableA.csv", ["id", "name"], [[i, f"a{i}"] for i in range(4)])
    write_csv(d / "tableB.csv", ["id", "name"], [[i, f"b{i}"] for i in range(4)])
    write_csv(d / "train.csv", ["ltable_id", "rtable_id", "label"], [[0, 0, 1]])
    write_csv(d / "valid.csv", ["ltable_id", "rtable_id", "label"], [[i, i, int(i < 1)] for i in range(4)])
    val = read_dataset(str(d)).splits["validation"]
    preds = tmp_path / "val.jsonl"
    preds.write_text("".join(json.dumps({"id": i, "correct": i != 1}) + "\n" for i in range(4)))
    demos = validation_demonstrations(val, str(preds), 2, "entity_matching", 0, embed=lambda texts: emb)
    assert demos == (val[0].text + val[0].label_str).strip() + "\n\n" + (val[1].text + val[1].label_str).strip() + "\n"

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)   # not installed
    with pytest.raises(DatasetError, match="needs sentence-transformers"):
        validation_demonstrations(val, str(preds), 2, "entity_matching", 0)


# ---- prepare ---------------------------------------------------------------------------------------

def _csv_bytes(header, rows):
    s = io.StringIO()
    w = csv.writer(s, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return s.getvalue().encode()


def test_prepare_from_an_sdist(tmp_path):
    """A stand-in sdist with the real files' names and columns: layout, stratified split, SOURCE.md."""
    rc = ["id", "name", "addr", "city", "phone", "type"]
    files = {
        "end-to-end/restaurants/fodors.csv": _csv_bytes(rc, [[100 + i, f"f{i}", "a", "la", "1", "x"] for i in range(10)]),
        "end-to-end/restaurants/zagats.csv": _csv_bytes(rc, [[i, f"z{i}", "a", "la" if i else "", "1", "x"]
                                                             for i in range(10)]),
        "end-to-end/restaurants/lbl_restnt_wf1.csv": _csv_bytes(
            ["_id", "ltable_id", "rtable_id", "gold"], [[i, 100 + i, i, int(i < 5)] for i in range(10)]),
        "DBLP.csv": _csv_bytes(["id", "title", "authors", "venue", "year"], [["conf/a", "t", "x", "VLDB", "1999.0"]]),
        "ACM.csv": _csv_bytes(["id", "title", "authors", "venue", "year"], [[5, "t", "x", "VLDB", "1999"]]),
        "dblp_acm_demo_labels.csv": _csv_bytes(["_id", "ltable.id", "rtable.id", "gold"],
                                               [[i, "conf/a", 5, i % 2] for i in range(5)]),
    }
    sdist = tmp_path / "py-entitymatching-0.4.2.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        for rel, data in files.items():
            info = tarfile.TarInfo("py-entitymatching-0.4.2/py_entitymatching/datasets/" + rel)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    out = tmp_path / "datasets"
    assert app.main(["prepare", "--out", str(out), "--sdist", str(sdist)]) is None
    fz = out / "entity_matching" / "structured" / "Fodors-Zagats"
    ds = read_dataset(str(fz))
    assert [len(ds.splits[s]) for s in ("train", "validation", "test")] == [6, 2, 2]
    for s in ds.splits.values():   # stratified: one of each label per 2 in valid/test
        assert sum(e.label_str == "Yes\n" for e in s) * 2 == len(s)
    assert "lbl_restnt_wf1.csv" in (fz / "SOURCE.md").read_text()
    dblp = (out / "entity_matching" / "structured" / "DBLP-ACM" / "tableA.csv").read_text()
    assert dblp.endswith("conf/a,t,x,VLDB,1999\n")
    rest = read_dataset(str(out / "data_imputation" / "Restaurant"))
    assert sum(len(s) for s in rest.splits.values()) == 19      # the row without a city is left out
    assert prep.split_indices(10, 0, False) == prep.split_indices(10, 0, False)


# ---- command-line errors ---------------------------------------------------------------------------

def _error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        app.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_csv_files_exit_2(tmp_path, capsys):
    d = tmp_path / "entity_matching" / "structured" / "Fodors-Zagats"
    write_csv(d / "tableA.csv", ["id", "name"], [[1, "a"]])
    write_csv(d / "tableB.csv", ["id", "name"], [[1, "b"]])
    write_csv(d / "test.csv", ["ltable_id", "rtable_id", "label"], [[1, 1, 1]])
    argv = ["--data_dir", str(d), "--do_test", "--dry_run", "--k", "0"]
    write_csv(d / "train.csv", ["ltable_id", "rtable_id", "label"], [[1, 1, 2]])
    assert "train.csv line 2: label must be 0 or 1, got '2'" in _error(capsys, argv)
    write_csv(d / "train.csv", ["ltable_id", "rtable_id"], [[1, 1]])
    assert "missing column(s) label" in _error(capsys, argv)
    (d / "train.csv").write_text('ltable_id,rtable_id,label\n1,1,1\n1,"1,0\n')
    assert "malformed CSV" in _error(capsys, argv)
    (d / "train.csv").write_text("ltable_id,rtable_id,label\n1,1,1\n1,1\n")
    assert "train.csv line 3: 2 fields, the header has 3" in _error(capsys, argv)
    write_csv(d / "train.csv", ["ltable_id", "rtable_id", "label"], [[1, 9, 1]])
    assert "rtable_id '9' is not an id of" in _error(capsys, argv)
    assert "no such directory" in _error(capsys, ["--data_dir", str(tmp_path / "nope"), "--dry_run"])
    write_csv(d / "train.csv", ["ltable_id", "rtable_id", "label"], [[1, 1, 1]])
    assert "no valid.csv (add --do_test for test.csv)" in _error(capsys, argv[:2] + ["--dry_run"])
    app.main(argv)   # now all is well
    assert "dry run: 1 examples" in capsys.readouterr().out


# ---- the app on SmolLM2 ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weight_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("smol_weights"))


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexgen.weights import find_smollm2_gguf
    gguf = find_smollm2_gguf()
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    return tok, AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()


def model_flags(weight_root, tmp_path, gbs=1):
    return ["--model", "smollm2-135m", "--path", weight_root, "--offload-dir", str(tmp_path / "offload"),
            "--device", "cpu", "--gpu-batch-size", str(gbs), "--num-gpu-batches", "1",
            "--percent", "100", "0", "100", "0", "100", "0", "--verbose", "0", "--no-progress"]


def hf_completion(tok, ref, prompt, max_new):
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False)
    gen = out[0, ids.shape[1]:].tolist()
    nl = tok.encode("\n", add_special_tokens=False)
    stops = set(nl if len(nl) == 1 else []) | {ref.generation_config.eos_token_id}
    cut = next((i for i, t in enumerate(gen) if t in stops), None)
    gen = gen if cut is None else gen[:cut + 1]
    return tok.decode(gen, skip_special_tokens=True).split("\n")[0]


@pytest.mark.parametrize("data_dir, extra", [
    (FZ, ["--k", "1", "--max_tokens", "3", "--batch_run", "--pad-to-seq-len", "200"]),
    (REST, ["--sample_method", "manual", "--max_tokens", "4", "--batch_run"]),
], ids=["fodors-zagats-random-k1-padded", "restaurant-manual"])
def test_app_equals_transformers_greedy(reference, weight_root, tmp_path, capsys, data_dir, extra):
    tok, ref = reference
    out = tmp_path / "out"
    argv = ["--data_dir", data_dir, "--do_test", "--output_dir", str(out)] + extra + model_flags(weight_root, tmp_path, 2)
    app.main(argv)
    printed = capsys.readouterr().out
    args = app.build_parser().parse_args(argv)
    ds = read_dataset(data_dir)
    examples = ds.splits["test"]
    prompts = app.build_prompts(args, ds, examples, 0)
    got = {r["id"]: r for r in map(json.loads, (out / "trial_0.jsonl").read_text().splitlines())}
    assert sorted(got) == [e.id for e in examples]
    want = []
    for e, p in zip(examples, prompts):
        text = hf_completion(tok, ref, p, args.max_tokens)
        assert got[e.id]["completion"] == text, (e.id, got[e.id], text)
        assert got[e.id]["prompt_tokens"] == len(tok(p).input_ids)
        want.append({"parsed": parse_answer(text, ds.spec.task), "gold": e.label_str})
    summary = json.loads((out / "summary.json").read_text())
    expected = compute_metrics(want, ds.spec.task)
    assert summary["per_trial"][0] == expected
    assert f"accuracy {expected['accuracy']:.3f}" in printed and "input+output tokens/s" in printed


def test_sigkill_then_rerun_every_example_once(weight_root, tmp_path, capsys):
    # Ten imputation examples (the slice's train and test rows), one a block, so that a kill lands mid-run.
    d = tmp_path / "data_imputation" / "Restaurant"
    os.makedirs(d)
    rows = [open(os.path.join(REST, f)).read().splitlines() for f in ("train.csv", "test.csv")]
    (d / "train.csv").write_text("\n".join(rows[0]) + "\n")
    (d / "test.csv").write_text("\n".join(rows[0] + rows[1][1:]) + "\n")
    flags = ["--data_dir", str(d), "--do_test", "--k", "1", "--max_tokens", "2"] + model_flags(weight_root, tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base = [sys.executable, "-m", "flexgen.apps.data_wrangle"]
    app.main(flags + ["--output_dir", str(tmp_path / "ref")])   # the uninterrupted run, in this process
    expected = sorted((tmp_path / "ref" / "trial_0.jsonl").read_text().splitlines())
    assert len(expected) == 10

    out = tmp_path / "out" / "trial_0.jsonl"
    cmd = base + flags + ["--output_dir", str(tmp_path / "out")]
    first = kill_after_first_line(cmd, ROOT, env, out, tmp_path / "log1", timeout=600)
    assert 1 <= first < 10, first
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    lines = out.read_text().splitlines()
    assert sorted(lines) == expected       # every example once, the same predictions
    assert f"this run: {10 - first} prompts" in second.stdout, second.stdout
    # A rerun with other settings into the same folder is refused.
    capsys.readouterr()
    assert "holds a run with other settings (k: 1 -> 2)" in _error(capsys, cmd[3:] + ["--k", "2"])
