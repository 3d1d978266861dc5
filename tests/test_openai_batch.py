"""OpenAI Batch API files through the batch runner: chat and completion lines, bad requests
answered with 400 lines, n > 1 with a seed, logprobs in both endpoints' shapes, SIGKILL and
resume with every custom_id exactly once; every output line is checked against the documented
fields of the batch output format."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

import tiny_models
from tiny_tokenizer import save_tiny_tokenizer

from flexgen.apps import batch
from flexgen.apps.openai_batch import CHAT_URL, COMPLETIONS_URL, chat_prompt_ids, output_id
from flexgen.flex_llama import ExecutionEnv, LlamaLM, Policy
from flexgen.requests import GenerationRequest, RequestRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("oa") / "llama-tiny-gqa"
    tiny_models.build_checkpoint("llama-tiny-gqa", d)
    save_tiny_tokenizer(d, "llama")
    return str(d)


@pytest.fixture(scope="module")
def weight_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("oa_weights"))


@pytest.fixture(scope="module")
def lm(ckpt, weight_root, tmp_path_factory):
    env = ExecutionEnv.create(str(tmp_path_factory.mktemp("oa_off")), device="cpu", cpu_threads=1)
    model = LlamaLM(ckpt, env, weight_root, Policy(2, 2, 0, 50, 0, 50, 100, 0), progress=False)
    yield model
    model.close()
    env.close_copy_threads()


def chat(cid, content, **body):
    return {"custom_id": cid, "method": "POST", "url": CHAT_URL,
            "body": dict({"model": "tiny", "messages": [{"role": "user", "content": content}]}, **body)}


def completion(cid, prompt, **body):
    return {"custom_id": cid, "method": "POST", "url": COMPLETIONS_URL, "body": dict({"prompt": prompt}, **body)}


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def read_lines(path):
    text = open(path).read()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# ---- the documented output format ------------------------------------------------------------

def _token_entry(e):
    assert set(e) >= {"token", "logprob", "bytes"}
    assert isinstance(e["token"], str) and isinstance(e["logprob"], float) and e["logprob"] <= 0
    assert e["bytes"] == list(e["token"].encode("utf-8"))


def check_output_line(line, url):
    """The fields of one batch output line (OpenAI's BatchRequestOutput and the endpoint's body)."""
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert isinstance(line["id"], str) and line["id"] == output_id(line["custom_id"])
    resp = line["response"]
    assert set(resp) == {"status_code", "request_id", "body"} and isinstance(resp["request_id"], str)
    body = resp["body"]
    if resp["status_code"] != 200:
        assert resp["status_code"] == 400 and line["error"] is None
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
        return body["error"]
    assert line["error"] is None
    assert set(body) >= {"id", "object", "created", "model", "choices", "usage"}
    assert isinstance(body["created"], int) and isinstance(body["model"], str)
    usage = body["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 0
    assert [c["index"] for c in body["choices"]] == list(range(len(body["choices"])))
    for c in body["choices"]:
        assert c["finish_reason"] in ("stop", "length")
        if url == CHAT_URL:
            assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
            assert set(c) == {"index", "message", "logprobs", "finish_reason"}
            assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
            if c["logprobs"] is not None:
                assert set(c["logprobs"]) == {"content", "refusal"}
                for e in c["logprobs"]["content"]:
                    _token_entry(e)
                    for t in e["top_logprobs"]:
                        _token_entry(t)
        else:
            assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
            assert set(c) == {"text", "index", "logprobs", "finish_reason"} and isinstance(c["text"], str)
            if c["logprobs"] is not None:
                lp = c["logprobs"]
                assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
                assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"])
                assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"])
                assert lp["text_offset"] == sorted(lp["text_offset"])
    return body


def by_custom_id(lines):
    out = {}
    for line in lines:
        assert line["custom_id"] not in out, f"custom_id {line['custom_id']} written twice"
        out[line["custom_id"]] = line
    return out


# ---- tests -------------------------------------------------------------------------------------

def test_chat_completion_errors_n_and_logprobs(lm, tmp_path):
    rows = [
        chat("chat-greedy", "What color is the sky?", max_tokens=6, temperature=0),
        completion("cmpl-greedy", "Paris is the capital of", max_tokens=5, temperature=0),
        completion("cmpl-ids", [1, 291, 288, 301], max_tokens=4, temperature=0),
        "{this is not json",
        chat("bad-temperature", "Hi", temperature=5),
        chat("bad-penalty", "Hi", frequency_penalty=1.0),
        chat("harmless-fields", "Hi", max_tokens=2, temperature=0, user="u1", logit_bias={}, stream=False,
             response_format={"type": "text"}, metadata={"k": "v"}),
        {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        chat("too-long", "Once upon a time " * 10, max_tokens=60),
        {"method": "POST", "url": CHAT_URL, "body": {}},                      # no custom_id: cannot answer
        chat("n-seeded", "Tell me a story", max_tokens=6, temperature=1.0, n=3, seed=7),
        chat("chat-logprobs", "Count to three", max_tokens=5, temperature=0, logprobs=True, top_logprobs=2),
        completion("cmpl-logprobs", "One, two,", max_tokens=4, temperature=0, logprobs=2, stop=["\n"]),
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    requests, problems = batch.read_requests(tmp_path / "in.jsonl", 8)
    assert [n for n, _ in problems] == [4, 10]
    summary = batch.run_batch(lm, requests, tmp_path / "out.jsonl", progress=False, seed=1)
    lines = read_lines(tmp_path / "out.jsonl")
    urls = {r["custom_id"]: r["url"] for r in rows if isinstance(r, dict) and "custom_id" in r}
    got = by_custom_id(lines)
    assert sorted(got) == sorted(urls)
    bodies = {cid: check_output_line(line, urls[cid]) for cid, line in got.items()}
    assert sorted(summary["refused"]) == ["bad-penalty", "bad-temperature", "bad-url", "too-long"]
    assert bodies["bad-temperature"]["param"] == "temperature"
    assert bodies["bad-penalty"]["param"] == "frequency_penalty"
    assert bodies["harmless-fields"]["usage"]["completion_tokens"] >= 1
    assert bodies["too-long"]["code"] == "context_length_exceeded"

    # the chat template is applied, and the answer is the request layer's greedy answer
    runner = RequestRunner(lm, progress=False)
    want = runner.generate([GenerationRequest([{"role": "user", "content": "What color is the sky?"}],
                                              max_new_tokens=6)])[0]
    body = bodies["chat-greedy"]
    assert body["choices"][0]["message"]["content"] == want.completions[0].text
    assert body["usage"]["prompt_tokens"] == len(want.prompt_token_ids) == len(chat_prompt_ids(
        lm.tokenizer, [{"role": "user", "content": "What color is the sky?"}]))
    assert body["model"] == "tiny"
    assert bodies["cmpl-ids"]["usage"]["prompt_tokens"] == 4
    assert bodies["cmpl-greedy"]["model"] == lm.info.name      # no model in the body: ours

    # n sampled choices: different, and the same again for the same seed
    choices = [c["message"]["content"] for c in bodies["n-seeded"]["choices"]]
    assert len(choices) == 3 and len(set(choices)) > 1, choices
    write_jsonl(tmp_path / "again.jsonl", [r for r in rows if isinstance(r, dict) and r.get("custom_id") == "n-seeded"])
    batch.run_batch(lm, batch.read_requests(tmp_path / "again.jsonl", 8)[0], tmp_path / "again_out.jsonl",
                    progress=False, seed=99)
    again = read_lines(tmp_path / "again_out.jsonl")[0]["response"]["body"]
    assert [c["message"]["content"] for c in again["choices"]] == choices

    # logprobs: greedy, so each token is its own best alternative
    content = bodies["chat-logprobs"]["choices"][0]["logprobs"]["content"]
    assert len(content) == bodies["chat-logprobs"]["usage"]["completion_tokens"] > 0
    for e in content:
        assert len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"]
        assert e["token"] == e["top_logprobs"][0]["token"] and math.isclose(e["logprob"], e["top_logprobs"][0]["logprob"],
                                                                           abs_tol=1e-5)
    lp = bodies["cmpl-logprobs"]["choices"][0]["logprobs"]
    assert lp["text_offset"][0] == len("One, two,")
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert 1 <= len(top) <= 3 and top[token] == logprob        # the 2 best and the chosen token
        assert max(top.values()) == logprob                        # greedy: the chosen one is the best
    assert bodies["chat-greedy"]["choices"][0]["logprobs"] is None


def test_duplicate_custom_ids_stop_before_any_work(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [chat("a", "x"), chat("b", "y"), chat("a", "z")])
    with pytest.raises(batch.BatchInputError, match='custom_id "a" on lines 1 and 3'):
        batch.read_requests(tmp_path / "in.jsonl")


def test_sigkill_then_resume_every_custom_id_once(lm, ckpt, weight_root, tmp_path):
    rows = [chat(f"c{i}", f"Question {i}: what is {i} plus {i}?", max_tokens=10, temperature=0) if i % 2 else
            completion(f"p{i}", f"The number {i} is", max_tokens=10, temperature=0.8) for i in range(12)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    flags = ["--model", ckpt, "--path", weight_root, "--offload-dir", str(tmp_path), "--device", "cpu",
             "--cpu-threads", "1", "--gpu-batch-size", "1", "--num-gpu-batches", "1", "--verbose", "0",
             "--percent", "100", "0", "100", "0", "100", "0"]
    reference = subprocess.run([sys.executable, "-m", "flexgen.apps.batch"] + flags + [
        "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "ref.jsonl"), "--no-progress"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = by_custom_id(read_lines(tmp_path / "ref.jsonl"))

    out_path = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "flexgen.apps.batch"] + flags + [
        "--input", str(tmp_path / "in.jsonl"), "--output", str(out_path), "--chunk-blocks", "1", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    with open(tmp_path / "log1", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if out_path.exists() and out_path.read_bytes().count(b"\n") >= 1:
                    break
                time.sleep(0.005)
            finished = proc.poll() is not None
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert not finished, "the run ended before it could be killed: " + (tmp_path / "log1").read_text()[-2000:]
    first = out_path.read_bytes().count(b"\n")
    assert 1 <= first < 12, first

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    got = by_custom_id(read_lines(out_path))
    assert sorted(got) == sorted(expected)
    url = {r["custom_id"]: r["url"] for r in rows}
    for cid, line in got.items():
        check_output_line(line, url[cid])
        a, b = line["response"]["body"], expected[cid]["response"]["body"]
        assert (a["choices"], a["usage"]) == (b["choices"], b["usage"]), cid
    third = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "0 prompts done (12 already in" in third.stdout, third.stdout
