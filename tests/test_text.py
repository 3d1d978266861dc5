"""Text in, text out on the embedded SmolLM2: grouping by length keeps input order and gives each
prompt what it gets alone; stop strings and end of sequence end a completion."""
import pytest

from flexgen.flex_llama import ExecutionEnv, LlamaLM, Policy
from flexgen.text import generate_text

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Hello", "A long time ago in a galaxy far, far away, there",
           "def add(a, b):"]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    env = ExecutionEnv.create(str(tmp_path_factory.mktemp("off")), device="cpu")
    lm = LlamaLM("smollm2-135m", env, str(tmp_path_factory.mktemp("w")), Policy(2, 2, 100, 0, 50, 50, 100, 0),
                 progress=False)
    yield lm
    lm.close()
    env.close_copy_threads()


def test_grouped_equals_alone_in_input_order(smol):
    together = generate_text(smol, PROMPTS, max_new_tokens=6)
    assert [c.prompt_tokens for c in together] == [len(smol.tokenizer.encode(p)) for p in PROMPTS]
    for prompt, c in zip(PROMPTS, together):
        alone = generate_text(smol, [prompt], max_new_tokens=6)[0]
        assert c.token_ids == alone.token_ids and c.text == alone.text
        assert c.completion_tokens == len(c.token_ids) <= 6


def test_stop_strings_and_logprobs(smol):
    free = generate_text(smol, ["1, 2, 3, 4,"], max_new_tokens=8, logprobs=True)[0]
    assert free.finish_reason == "length" and len(free.logprobs) == 8
    assert all(lp <= 0 for lp in free.logprobs)
    stop = free.text.strip()[:1]   # the first character it generates ("5")
    cut = generate_text(smol, ["1, 2, 3, 4,"], max_new_tokens=8, stop=[stop])[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert free.text.startswith(cut.text)


def test_temperature_zero_is_greedy_and_chat(smol):
    greedy = generate_text(smol, PROMPTS[:2], max_new_tokens=5)
    t0 = generate_text(smol, PROMPTS[:2], max_new_tokens=5, do_sample=True, temperature=0)
    assert [c.text for c in greedy] == [c.text for c in t0]
    chat = generate_text(smol, ["What is the capital of France? Answer in one word."], max_new_tokens=12,
                         chat=True)[0]
    assert "Paris" in chat.text
