"""HELM with FlexGen executing the requests (crfm-helm 0.5.x, offline scenarios, CPU).

- helm_run on smollm2-135m over two scenarios that build their data locally: HELM's run directory
  is written, every completion equals transformers' greedy generation on the very prompt HELM
  built, and HELM's exact-match statistic equals the value computed from those generations.
- The adapter on a tiny float32 model: echo_prompt logprobs are log-softmax of transformers'
  logits, top_k_per_token gives the right alternatives, num_completions > 1 is reproducible.
- The plugin path: helm-run with the deployment entries the helper writes gives the same
  completions as helm_run.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

helm = pytest.importorskip("helm", reason="crfm-helm is not installed (pip install -e '.[helm]')")

from helm.common.request import Request  # noqa: E402

from flexgen.apps import helm_run  # noqa: E402
from flexgen.integrations import helm_config  # noqa: E402
from flexgen.integrations.helm_client import Engine, FlexGenToken, parse_engine_flags  # noqa: E402

SCENARIOS = {   # description -> (run directory name, a HELM metric of its run spec)
    "dyck_language:num_parenthesis_pairs=2": ("dyck_language_np=2:model=flexgen_smollm2-135m",
                                              "exact_match_indicator"),
    "synthetic_reasoning:mode=pattern_match": ("synthetic_reasoning:mode=pattern_match,model=flexgen_smollm2-135m",
                                               "quasi_prefix_exact_match"),   # exact_match is 0 for SmolLM2
}
SMOL = "flexgen/smollm2-135m"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("helm")
    yield d
    Engine.close_all()


def smol_flags(work):
    return ["--model", "smollm2-135m", "--path", str(work / "weights"), "--offload-dir", str(work / "off"),
            "--device", "cpu", "--percent", "100", "0", "100", "0", "100", "0", "--gpu-batch-size", "5",
            "--num-gpu-batches", "2", "--verbose", "0"]


@pytest.fixture(scope="module")
def helm_runs(work):
    """helm_run over both scenarios, 10 evaluation instances each (the seed's flags)."""
    out = work / "benchmark_output"
    for desc in SCENARIOS:
        helm_run.main(["--description", desc, "--max-eval-instances", "10", "--output-path", str(out),
                       "--suite", "flexgen", "--local-path", str(work / "prod_env_app")] + smol_flags(work))
    return out / "runs" / "flexgen"


def load(run_dir, name):
    with open(os.path.join(run_dir, name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def hf_smol():
    """transformers on the same GGUF, float32 dequantized: the values the engine's float32 weight
    cache holds for these CPU runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexgen.weights import find_smollm2_gguf
    d, f = os.path.split(find_smollm2_gguf())
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return tok, ref


def hf_greedy(tok, ref, prompt, max_tokens, stops):
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = ref.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.eos_token_id, stop_strings=list(stops) or None, tokenizer=tok)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    cuts = [text.find(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


def test_helm_run_writes_runs_and_matches_transformers(helm_runs, hf_smol):
    from helm.benchmark.metrics.evaluate_reference_metrics import exact_match_indicator, quasi_prefix_exact_match
    fns = {"quasi_prefix_exact_match": quasi_prefix_exact_match, "exact_match_indicator": exact_match_indicator}
    tok, ref = hf_smol
    for desc, (run_name, metric) in SCENARIOS.items():
        run_dir = helm_runs / run_name
        for f in ("run_spec.json", "scenario.json", "scenario_state.json", "stats.json", "per_instance_stats.json"):
            assert (run_dir / f).is_file(), f"{run_dir / f} missing"
        states = load(run_dir, "scenario_state.json")["request_states"]
        assert len(states) == 10
        scores = {}
        for s in states:
            req = s["request"]
            ours = s["result"]["completions"][0]["text"]
            theirs = hf_greedy(tok, ref, req["prompt"], req["max_tokens"], req["stop_sequences"])
            assert ours == theirs, f"{desc}: {req['prompt'][-80:]!r}"
            golds = [r["output"]["text"] for r in s["instance"]["references"] if "correct" in r["tags"]]
            scores[s["instance"]["id"]] = (s["instance"]["split"], max(fns[metric](g, theirs) for g in golds))

        def plain(x, split=None):   # the metric's unperturbed stat (of one evaluation split)
            n = x["name"]
            return n["name"] == metric and "perturbation" not in n and n.get("split") in ((split,) if split else
                                                                                          ("test", "valid"))
        per_instance = {p["instance_id"]: next(x for x in p["stats"] if plain(x))["sum"]
                        for p in load(run_dir, "per_instance_stats.json")}
        assert per_instance == {i: v for i, (_, v) in scores.items()}, desc
        for split in {sp for sp, _ in scores.values()}:   # HELM's aggregate: the mean over instances (one trial)
            stat = next(x for x in load(run_dir, "stats.json") if plain(x, split))
            expect = np.mean([v for sp, v in scores.values() if sp == split])
            assert stat["sum"] / stat["count"] == pytest.approx(expect), (desc, split)


def test_helm_summarize_reads_the_runs(helm_runs):
    import subprocess
    import sys
    out = helm_runs.parent.parent
    p = subprocess.run([sys.executable, "-m", "helm.benchmark.presentation.summarize", "--suite", "flexgen",
                        "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    runs = json.load(open(helm_runs / "runs.json"))
    assert sorted(r["run_spec"]["name"] for r in runs) == sorted(n for n, _ in SCENARIOS.values())


def test_helm_run_prints_a_summary(helm_runs, capsys, work):
    # the fixture ran already; run one more (cheap) scenario to see the summary lines
    helm_run.main(["--description", "dyck_language:num_parenthesis_pairs=2", "--max-eval-instances", "2",
                   "--output-path", str(work / "bo2"), "--local-path", str(work / "prod_env_app")] + smol_flags(work))
    out = capsys.readouterr().out
    assert "exact_match_indicator" in out and "requests: 2," in out and "token/s" in out
    assert "run directory: " + str(work / "bo2" / "runs" / "flexgen") in out


def test_dataset_that_cannot_be_downloaded_is_one_error(work, capsys, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("network is unreachable (test)")
    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(SystemExit) as e:
        helm_run.main(["--description", "mmlu:subject=abstract_algebra", "--max-eval-instances", "2",
                       "--output-path", str(work / "bo3"), "--local-path", str(work / "prod_env_app")] + smol_flags(work))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "hendrycks/data.tar" in err[0] and str(work / "bo3" / "scenarios" / "mmlu" / "data") in err[0]


def test_bad_description_and_flags_exit_2(work, capsys):
    for argv in (["--description", "no_such_scenario:x=1"], ["--description", "dyck_language", "--percent", "1", "2"]):
        with pytest.raises(SystemExit) as e:
            helm_run.main(argv + ["--output-path", str(work / "bo4"), "--local-path", str(work / "pe4"),
                                  "--device", "cpu", "--path", str(work / "weights"), "--verbose", "0"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err


# ---- the plugin path -----------------------------------------------------------------------------

def test_helper_writes_the_shipped_example(tmp_path, work, monkeypatch):
    from flexgen.integrations import helm_client
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "helm", "prod_env")
    # the same tokenizer, from this module's weight cache (rebuilding it from the GGUF takes seconds)
    monkeypatch.setitem(helm_client._tokenizers, ("smollm2-135m", None, None),
                        helm_client.model_tokenizer("smollm2-135m", str(work / "weights")))
    helm_config.main(["--model", "smollm2-135m", "--flags", EXAMPLE_FLAGS, "--out", str(tmp_path)])
    for f in helm_config.FILES.values():
        with open(os.path.join(example, f)) as a, open(tmp_path / f) as b:
            assert a.read() == b.read(), f


EXAMPLE_FLAGS = "--percent 100 0 100 0 100 0 --gpu-batch-size 8 --num-gpu-batches 2"


def test_helm_run_plugin_path_gives_the_same_completions(helm_runs, work):
    from helm.benchmark.run import build_parser, helm_run as helm_run_cli
    prod_env = work / "prod_env_plugin"
    flags = " ".join(smol_flags(work)[2:])       # everything but --model
    helm_config.main(["--model", "smollm2-135m", "--flags", flags, "--out", str(prod_env)])
    Engine.close_all()                           # the plugin must build its own engine from the YAML
    desc = "dyck_language:num_parenthesis_pairs=2"
    for suite, extra in (("plugin", []),
                         ("plugin_whole_run", ["--runner-class-name", "flexgen.integrations.helm_runner.FlexGenRunner"])):
        args = build_parser().parse_args(["--run-entries", f"{desc},model={SMOL}", "--max-eval-instances", "10",
                                          "--suite", suite, "-o", str(work / "benchmark_output"),
                                          "--local-path", str(prod_env), "--disable-cache", "-n", "4"] + extra)
        helm_run_cli(args)
        engine = Engine._pool[SMOL]
        assert engine.args.gpu_batch_size == 5 and engine.args.path == str(work / "weights")
        run_name = SCENARIOS[desc][0]
        ours = {s["instance"]["id"]: s["result"]["completions"][0]["text"]
                for s in load(work / "benchmark_output" / "runs" / suite / run_name, "scenario_state.json")[
                    "request_states"]}
        app = {s["instance"]["id"]: s["result"]["completions"][0]["text"]
               for s in load(helm_runs / run_name, "scenario_state.json")["request_states"]}
        assert ours == app, suite


# ---- the adapter on a tiny float32 model ------------------------------------------------------------

@pytest.fixture(scope="module", params=["llama-tiny-gqa", "opt-tiny"])
def tiny(zoo, work, request):
    """A tiny float32 checkpoint (a LLaMA with GQA, an OPT offloaded to CPU) with a byte-level tokenizer."""
    from test_apps import byte_tokenizer
    name = request.param
    ckpt = work / f"{name}-helm"
    shutil.copytree(zoo.checkpoint(name), ckpt)
    byte_tokenizer(ckpt)
    percent = "100 0 100 0 100 0" if name.startswith("llama") else "50 50 0 100 100 0"
    args = parse_engine_flags(str(ckpt), f"--device cpu --path {work / 'tw'} --offload-dir {work / 'toff'} "
                                         f"--percent {percent} --gpu-batch-size 2 --num-gpu-batches 2 "
                                         "--verbose 0 --seed 7")
    engine = Engine.install("flexgen/tiny-helm", args)
    yield engine, zoo.reference(name), engine.tokenizer
    engine.close()


def req(prompt, **kw):
    return Request(model="flexgen/tiny-helm", model_deployment="flexgen/tiny-helm", prompt=prompt, **kw)


def log_softmax(ref, ids):
    with torch.no_grad():
        return torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_echo_prompt_logprobs_are_log_softmax_of_transformers(tiny):
    engine, ref, tok = tiny
    prompts = ["Question: the of a", "Answer: a", "the the of"]
    results = engine.run([req(p, echo_prompt=True, max_tokens=0, temperature=0) for p in prompts])
    for p, res in zip(prompts, results):
        assert res.success
        (c,) = res.completions
        ids = tok.encode(p)
        assert [t.text for t in c.tokens] == [tok.decode([i]) for i in ids]
        expect = log_softmax(ref, ids)
        assert c.tokens[0].logprob == 0.0    # nothing before the first token, as HELM's HF client
        for n in range(1, len(ids)):
            assert c.tokens[n].logprob == pytest.approx(expect[n - 1, ids[n]].item(), abs=1e-4)
        assert c.logprob == pytest.approx(sum(t.logprob for t in c.tokens))
        assert c.text == p


def test_top_k_per_token_and_chosen_logprobs(tiny):
    engine, ref, tok = tiny
    k = 5
    (res,) = engine.run([req("Question: the", max_tokens=4, temperature=0, top_k_per_token=k)])
    (c,) = res.completions
    prompt_ids = tok.encode("Question: the")
    gen = [tok.encode(t.text, add_special_tokens=False) for t in c.tokens]
    assert len(c.tokens) == 4 and all(isinstance(t, FlexGenToken) for t in c.tokens)
    ids = list(prompt_ids)
    for t in c.tokens:
        lp = log_softmax(ref, ids)[-1]
        top = torch.topk(lp, k)
        expect = {}
        for v, i in zip(top.values.tolist(), top.indices.tolist()):
            expect.setdefault(tok.decode([i]), v)
        assert list(t.top_logprobs) == list(expect)
        assert list(t.top_logprobs.values()) == pytest.approx(list(expect.values()), abs=1e-4)
        best = int(top.indices[0])
        assert t.text == tok.decode([best])                        # greedy: the best token
        assert t.logprob == pytest.approx(top.values[0].item(), abs=1e-4)
        ids.append(best)
    assert gen  # tokens decode to text


def test_num_completions_sampled_reproducibly(tiny):
    engine, _, _ = tiny
    batch = [req("Question: the", max_tokens=6, temperature=1.0, num_completions=3),
             req("Answer: a", max_tokens=6, temperature=1.0, num_completions=3)]
    first = [[c.text for c in r.completions] for r in engine.run(batch)]
    again = [[c.text for c in r.completions] for r in engine.run(batch)]
    assert first == again
    assert all(len(texts) == 3 for texts in first)
    assert any(len(set(texts)) > 1 for texts in first), "three samples all equal: not sampled?"


def test_stop_sequences_cut_text_and_tokens(tiny):
    engine, _, tok = tiny
    (res,) = engine.run([req("Question: the", max_tokens=12, temperature=0)])
    full = res.completions[0].text
    stop = full[len(full) // 2]
    (res,) = engine.run([req("Question: the", max_tokens=12, temperature=0, stop_sequences=[stop])])
    c = res.completions[0]
    assert c.text == full[:full.find(stop)]
    assert c.finish_reason == {"reason": "stop"}
    covered = "".join(t.text for t in c.tokens)
    assert covered.startswith(c.text) and len(c.tokens) < 12
    assert c.logprob == pytest.approx(sum(t.logprob for t in c.tokens))


def test_stand_in_tokenizer_from_a_directory_of_tokenizer_files(tmp_path, monkeypatch):
    """--tokenizer DIR (a stand-in for dummy weights, e.g. a saved tokenizer carried to a machine
    without the model): loaded through the same cache, without deadlocking on its lock."""
    from test_apps import byte_tokenizer
    from flexgen.integrations import helm_client
    monkeypatch.setattr(helm_client, "_tokenizers", {})
    byte_tokenizer(tmp_path / "tok")
    tok = helm_client.model_tokenizer("facebook/opt-30b", "_DUMMY_", str(tmp_path / "tok"))
    assert tok.eos_token == "</s>" and tok("the of a")["input_ids"]
    assert helm_client.model_tokenizer("facebook/opt-30b", "_DUMMY_", str(tmp_path / "tok")) is tok
