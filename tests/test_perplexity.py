"""The accuracy check of compression: perplexity of the embedded SmolLM2 on a shipped text."""
import os
import subprocess
import sys

import pytest

DATA = os.path.join(os.path.dirname(__file__), "data", "sample.txt")


def _ppl(tmp_root, *flags):
    cmd = [sys.executable, "-m", "flexgen.apps.perplexity", "--model", "smollm2-135m", "--path",
           str(tmp_root / "w"), "--offload-dir", str(tmp_root / "off"), "--text", DATA, "--window", "128",
           "--device", "cpu", "--verbose", "0", *flags]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    line = [l for l in p.stdout.splitlines() if l.startswith("perplexity: ")]
    assert line, p.stdout
    return float(line[0].split()[1])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ppl")


def test_four_bit_weights_and_cache_within_five_percent(root):
    base = _ppl(root)
    assert 5 < base < 200, base   # a real language model on English text
    # 4-bit weights in groups of 32 along the input dim (the GGUF file's own block layout) and a
    # 4-bit cache in groups of 32 along the head dim, weights on CPU and cache split GPU/CPU/disk.
    comp = _ppl(root, "--compress-weight", "--compress-cache", "--comp-weight-group", "32", "--comp-weight-dim",
                "1", "--comp-cache-group", "32", "--percent", "0", "100", "50", "25", "100", "0")
    assert abs(comp - base) / base < 0.05, (base, comp)


def test_missing_text_is_a_clear_error(root):
    p = subprocess.run([sys.executable, "-m", "flexgen.apps.perplexity", "--model", "smollm2-135m", "--text",
                        str(root / "nope.txt"), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().startswith("error:") and "Traceback" not in p.stderr
