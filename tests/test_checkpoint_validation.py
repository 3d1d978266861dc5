"""Checkpoints are validated before use: a config without the fields its family needs, tensors
missing or of the wrong shape or dtype, truncated or garbage safetensors / .bin / GGUF files. Each
case, run through the command line, ends with one `error:` line naming the file and what is wrong,
exit status 2, no traceback; nothing is left in the weight cache that a later run would trust."""
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
import torch

from flexgen import weights as W

CLI = ["--prompt-len", "6", "--gen-len", "2", "--gpu-batch-size", "1", "--device", "cpu", "--no-log",
       "--cpu-threads", "1", "--verbose", "0"]


def run_main(module, model, tmp_path, capsys):
    """main() of flex_opt / flex_llama in this process: (exit status, stderr)."""
    import importlib
    main = importlib.import_module(module).main
    code = 0
    try:
        main(["--model", str(model), "--path", str(tmp_path / "cache"), "--offload-dir", str(tmp_path / "off"),
              *CLI])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_error(code, err, *must_mention):
    assert code == 2, f"exit status {code}: {err[-2000:]}"
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    for word in must_mention:
        assert re.search(word, errors[0]), f"{word!r} not in {errors[0]!r}"
    return errors[0]


def copy_checkpoint(src, dst) -> pathlib.Path:
    dst = pathlib.Path(dst)
    shutil.copytree(src, dst)
    return dst


# ---- the config -------------------------------------------------------------------------------------

CONFIG_CASES = {
    # field -> value (None: removed); what the error must say
    "opt_no_layers": ("opt-tiny", {"num_hidden_layers": None}, r"num_hidden_layers.*OPT"),
    "opt_no_sizes": ("opt-tiny", {"num_hidden_layers": None, "hidden_size": None, "ffn_dim": None},
                     r"hidden_size, num_hidden_layers, ffn_dim"),
    "opt_layers_text": ("opt-tiny", {"num_hidden_layers": "three"}, r"num_hidden_layers must be a positive integer"),
    "opt_heads_zero": ("opt-tiny", {"num_attention_heads": 0}, r"num_attention_heads must be a positive integer"),
    "opt_heads_do_not_divide": ("opt-tiny", {"num_attention_heads": 5}, r"not a multiple of num_attention_heads"),
    "opt_activation": ("opt-tiny", {"activation_function": "gelu"}, r"activation 'gelu'"),
    "llama_no_intermediate": ("llama-tiny-gqa", {"intermediate_size": None}, r"intermediate_size.*LLaMA"),
    "llama_kv_do_not_divide": ("llama-tiny-gqa", {"num_key_value_heads": 3},
                               r"not a multiple of num_key_value_heads"),
    "llama_vocab_negative": ("llama-tiny-gqa", {"vocab_size": -5}, r"vocab_size must be a positive integer"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_lacking_or_bad_fields(case, zoo, tmp_path, capsys):
    name, changes, words = CONFIG_CASES[case]
    d = copy_checkpoint(zoo.checkpoint(name), tmp_path / name)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    module = "flexgen.flex_opt" if name.startswith("opt") else "flexgen.flex_llama"
    assert_one_error(*run_main(module, d, tmp_path, capsys), re.escape(str(d / "config.json")), words)


def test_issue_case_opt_config_without_sizes_beside_garbage(tmp_path, capsys):
    """The issue's report: model_type opt, no size fields, a garbage model.safetensors."""
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "opt"}))
    (d / "model.safetensors").write_bytes(b"garbage" * 100)
    assert_one_error(*run_main("flexgen.flex_opt", d, tmp_path, capsys), "config.json", "num_hidden_layers")


@pytest.mark.parametrize("content", ["[1, 2, 3]", "{not json", ""])
def test_config_not_an_object(content, zoo, tmp_path, capsys):
    d = copy_checkpoint(zoo.checkpoint("opt-tiny"), tmp_path / "m")
    (d / "config.json").write_text(content)
    assert_one_error(*run_main("flexgen.flex_opt", d, tmp_path, capsys), "config.json")


# ---- the tensors ------------------------------------------------------------------------------------

def rewrite_safetensors(d, edit):
    """Load d/model.safetensors, edit(state dict) in place, save it back."""
    from safetensors.torch import load_file, save_file
    sd = load_file(d / "model.safetensors")
    edit(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def _drop(key):
    return lambda sd: sd.pop(key)


def _reshape(key):
    def edit(sd):
        sd[key] = sd[key][:-1].clone()
    return edit


def _as_int(key):
    def edit(sd):
        sd[key] = sd[key].to(torch.int8)
    return edit


TENSOR_CASES = {
    "missing": (_drop("model.decoder.layers.1.self_attn.k_proj.weight"),
                r"lacks tensor decoder\.layers\.1\.self_attn\.k_proj\.weight"),
    "wrong_shape": (_reshape("model.decoder.layers.0.fc1.weight"),
                    r"model\.safetensors: tensor decoder\.layers\.0\.fc1\.weight has shape \(127, 64\), "
                    r"its config needs \(128, 64\)"),
    "wrong_dtype": (_as_int("model.decoder.layers.2.fc2.bias"),
                    r"model\.safetensors: tensor decoder\.layers\.2\.fc2\.bias has dtype I8"),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_safetensors_tensors_checked(case, zoo, tmp_path, capsys):
    edit, words = TENSOR_CASES[case]
    d = copy_checkpoint(zoo.checkpoint("opt-tiny"), tmp_path / f"opt-{case}")
    rewrite_safetensors(d, edit)
    assert_one_error(*run_main("flexgen.flex_opt", d, tmp_path, capsys), re.escape(str(d)), words)
    for cache in (f"{d.name}-np", f"{d.name}-np-float32"):   # float16 and float32 compute's caches
        assert not W.cache_is_complete(tmp_path / "cache" / cache)
        assert not (tmp_path / "cache" / cache).exists(), "nothing written before the check"


def to_bin(d):
    """The checkpoint as pytorch_model.bin instead of safetensors."""
    from safetensors.torch import load_file
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    return sd


def test_bin_tensors_checked(zoo, tmp_path, capsys):
    d = copy_checkpoint(zoo.checkpoint("opt-tiny"), tmp_path / "opt-bin")
    sd = to_bin(d)
    sd["model.decoder.final_layer_norm.weight"] = sd["model.decoder.final_layer_norm.weight"][:10].clone()
    torch.save(sd, d / "pytorch_model.bin")
    assert_one_error(*run_main("flexgen.flex_opt", d, tmp_path, capsys),
                     r"pytorch_model\.bin: tensor decoder\.final_layer_norm\.weight has shape \(10,\)")


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_or_garbage_hf_files(fmt, how, zoo, tmp_path, capsys):
    d = copy_checkpoint(zoo.checkpoint("opt-tiny"), tmp_path / f"opt-{fmt}-{how}")
    if fmt == "bin":
        to_bin(d)
    f = d / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) * 2 // 3], "garbage": b"\x07garbage" * 64, "empty": b""}[how])
    assert_one_error(*run_main("flexgen.flex_opt", d, tmp_path, capsys),
                     re.escape(str(f)) + " is truncated or corrupt")


# ---- GGUF -------------------------------------------------------------------------------------------

GGUF_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}
GGUF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def write_gguf(path, ckpt_dir, skip_meta=(), edit=None):
    """A LLaMA GGUF from a tiny HF checkpoint: llama.cpp's names, F32 tensors (the values are
    not what these tests check; shapes and names are). edit(name, array) -> array or None (drop)."""
    import gguf
    from safetensors.torch import load_file
    c = json.loads((pathlib.Path(ckpt_dir) / "config.json").read_text())
    w = gguf.GGUFWriter(str(path), "llama")
    meta = {"block_count": (w.add_block_count, c["num_hidden_layers"]),
            "context_length": (w.add_context_length, c["max_position_embeddings"]),
            "embedding_length": (w.add_embedding_length, c["hidden_size"]),
            "feed_forward_length": (w.add_feed_forward_length, c["intermediate_size"]),
            "head_count": (w.add_head_count, c["num_attention_heads"]),
            "head_count_kv": (w.add_head_count_kv, c["num_key_value_heads"]),
            "vocab_size": (w.add_vocab_size, c["vocab_size"])}
    for key, (add, value) in meta.items():
        if key not in skip_meta:
            add(value)
    for k, t in load_file(pathlib.Path(ckpt_dir) / "model.safetensors").items():
        base = k.rsplit(".", 1)[0]
        if base in GGUF_GLOBAL:
            name = GGUF_GLOBAL[base] + ".weight"
        else:
            parts = base.split(".", 3)
            name = f"blk.{parts[2]}.{GGUF_BLOCK[parts[3]]}.weight"
        a = t.float().numpy()
        if edit is not None:
            a = edit(name, a)
        if a is not None:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_valid_baseline_runs(zoo, tmp_path, capsys):
    """The writer above makes a GGUF that runs, so the failures below come from what each breaks."""
    path = write_gguf(tmp_path / "tiny.gguf", zoo.checkpoint("llama-tiny-gqa"))
    code, err = run_main("flexgen.flex_llama", path, tmp_path, capsys)
    assert code == 0, err


GGUF_CASES = {
    "missing_tensor": (dict(edit=lambda n, a: None if n == "blk.1.ffn_up.weight" else a),
                       r"lacks tensor layers\.1\.mlp\.up_proj\.weight"),
    "wrong_shape": (dict(edit=lambda n, a: a[:, :-2].copy() if n == "blk.0.attn_v.weight" else a),
                    r"tensor layers\.0\.self_attn\.v_proj\.weight has shape \(16, 62\), its config needs \(16, 64\)"),
    "wrong_dtype": (dict(edit=lambda n, a: a.astype(np.int32) if n == "output_norm.weight" else a),
                    r"tensor norm\.weight has dtype I32"),
    "no_size_metadata": (dict(skip_meta=("block_count", "feed_forward_length")),
                         r"lacks the metadata llama\.block_count, llama\.feed_forward_length"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_checked(case, zoo, tmp_path, capsys):
    kwargs, words = GGUF_CASES[case]
    path = write_gguf(tmp_path / f"tiny-{case}.gguf", zoo.checkpoint("llama-tiny-gqa"), **kwargs)
    assert_one_error(*run_main("flexgen.flex_llama", path, tmp_path, capsys), re.escape(str(path)), words)


@pytest.mark.parametrize("how", ["truncated", "truncated_header", "garbage", "empty"])
def test_gguf_truncated_or_garbage(how, zoo, tmp_path, capsys):
    path = write_gguf(tmp_path / "tiny.gguf", zoo.checkpoint("llama-tiny-gqa"))
    data = path.read_bytes()
    cut = {"truncated": data[: len(data) - 1000], "truncated_header": data[:300],
           "garbage": b"GGUF" + b"\xff" * 400, "empty": b""}[how]
    bad = tmp_path / f"bad-{how}.gguf"
    bad.write_bytes(cut)
    assert_one_error(*run_main("flexgen.flex_llama", bad, tmp_path, capsys), re.escape(str(bad)))
