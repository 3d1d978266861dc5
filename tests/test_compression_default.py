"""The command line's compression grouping: with no grouping flag, --compress-weight and
--compress-cache use the measured default (a GGUF model: its own block layout, 32 along dim 1),
each grouping flag given overrides its own part, the run header says which grouping is in use and
why, and the Python API's CompressionConfig keeps FlexGen's meaning."""
import pytest

from flexgen import cli
from flexgen.flex_llama import LlamaLM
from flexgen.flex_opt import OptLM
from flexgen.policy import CompressionConfig, Policy

FLAGS = ["--compress-weight", "--compress-cache"]


def policy(lm_class, *argv):
    return cli.policy_from_args(cli.build_parser(lm_class, "m", "p").parse_args(list(argv)))


def test_python_api_keeps_flexgen_meaning():
    assert CompressionConfig() == CompressionConfig(num_bits=4, group_size=64, group_dim=0, symmetric=False)
    p = Policy(1, 1, 100, 0, 100, 0, 100, 0, compress_weight=True, compress_cache=True)
    assert (p.comp_weight_config.group_size, p.comp_weight_config.group_dim) == (64, 0)
    assert (p.comp_cache_config.group_size, p.comp_cache_config.group_dim) == (64, 2)
    explicit = CompressionConfig(4, 32, 1, True)
    assert Policy(1, 1, 100, 0, 100, 0, 100, 0, compress_weight=True, comp_weight_config=explicit) \
        .comp_weight_config == explicit


@pytest.mark.parametrize("model", ["facebook/opt-1.3b", "/some/checkpoint-dir"])
def test_default_grouping_without_flags(model):
    p = policy(OptLM, "--model", model, *FLAGS)
    wg, wd = cli.DEFAULT_WEIGHT_GROUPING
    assert p.comp_weight_config == CompressionConfig(4, wg, wd, False)
    assert p.comp_cache_config == CompressionConfig(4, cli.DEFAULT_CACHE_GROUP, 2, False)


@pytest.mark.parametrize("model", ["smollm2-135m", "/models/tiny.Q4_0.gguf", "x.GGUF"])
def test_gguf_model_keeps_its_block_layout(model):
    p = policy(LlamaLM, "--model", model, *FLAGS)
    assert p.comp_weight_config == CompressionConfig(4, 32, 1, False) == CompressionConfig(4, *cli.GGUF_WEIGHT_GROUPING)
    assert p.comp_cache_config.group_size == cli.DEFAULT_CACHE_GROUP


def test_each_flag_overrides_its_part():
    p = policy(OptLM, "--model", "facebook/opt-1.3b", *FLAGS, "--comp-weight-dim", "0")
    assert (p.comp_weight_config.group_size, p.comp_weight_config.group_dim) == (cli.DEFAULT_WEIGHT_GROUPING[0], 0)
    p = policy(OptLM, "--model", "facebook/opt-1.3b", *FLAGS, "--comp-weight-group", "128", "--comp-cache-group", "16",
               "--comp-bits", "8")
    assert p.comp_weight_config == CompressionConfig(8, 128, cli.DEFAULT_WEIGHT_GROUPING[1], False)
    assert p.comp_cache_config == CompressionConfig(8, 16, 2, False)
    p = policy(LlamaLM, "--model", "smollm2-135m", *FLAGS, "--comp-weight-group", "64", "--comp-weight-dim", "0",
               "--comp-cache-group", "64")
    assert p.comp_weight_config == CompressionConfig() and p.comp_cache_config == CompressionConfig(group_dim=2)


def _run(module_main, argv, capsys):
    module_main(argv)
    return capsys.readouterr().out


def test_header_reports_the_default(zoo, tmp_path, capsys):
    from flexgen.flex_opt import main
    base = ["--model", zoo.checkpoint("opt-tiny"), "--path", zoo.cache_root, "--prompt-len", "6", "--gen-len", "2",
            "--gpu-batch-size", "2", "--device", "cpu", "--cpu-threads", "1", "--no-log", "--verbose", "1",
            "--offload-dir", str(tmp_path / "off")]
    wg, wd = cli.DEFAULT_WEIGHT_GROUPING
    out = _run(main, base + FLAGS, capsys)
    assert (f"compression: weights 4-bit in groups of {wg} along dim {wd} (default); cache 4-bit in groups of "
            f"{cli.DEFAULT_CACHE_GROUP} along the head dim (default)") in out.splitlines(), out
    out = _run(main, base + ["--compress-weight", "--comp-weight-group", "64", "--comp-weight-dim", "0"], capsys)
    assert "compression: weights 4-bit in groups of 64 along dim 0 (given)" in out.splitlines(), out
    out = _run(main, base, capsys)
    assert "compression:" not in out


def test_header_reports_a_gguf_layout(zoo, tmp_path, capsys):
    from test_checkpoint_validation import write_gguf
    from flexgen.flex_llama import main
    path = write_gguf(tmp_path / "tiny.gguf", zoo.checkpoint("llama-tiny-gqa"))
    out = _run(main, ["--model", str(path), "--path", str(tmp_path / "cache"), "--prompt-len", "6", "--gen-len", "2",
                      "--gpu-batch-size", "1", "--device", "cpu", "--cpu-threads", "1", "--no-log", "--verbose", "1",
                      "--offload-dir", str(tmp_path / "off"), "--compress-weight"], capsys)
    assert "compression: weights 4-bit in groups of 32 along dim 1 (the GGUF file's block layout)" in out.splitlines()
