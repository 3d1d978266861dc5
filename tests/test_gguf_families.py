"""GGUF files of the new families, written from the tiny checkpoints the way llama.cpp lays them out:
Qwen2 as architecture "qwen2" (q/k/v biases, no rope permutation), Mixtral as "llama" with an
expert count (q/k permuted, experts as 3-D ffn_*_exps tensors, or one tensor per expert as older
files have them). The engine on the GGUF must give transformers' tokens on the original
checkpoint; for Qwen2, transformers' own GGUF reader on our file must agree with the original too
(so the file is laid out as transformers expects it)."""
import os

import numpy as np
import pytest
import torch

import tiny_models as T
from conftest import DEVICE_TYPE

_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "block_sparse_moe.gate": "ffn_gate_inp"}
_EXPERT = {"w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down"}


def _permute(w, n_head):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute (n_head: the KV head count for k)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(ckpt_dir, path, arch, merged_experts=True):
    import gguf
    from safetensors.numpy import load_file
    import json
    cfg = json.load(open(os.path.join(ckpt_dir, "config.json")))
    sd = load_file(os.path.join(ckpt_dir, "model.safetensors"))
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base((cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta"))
    w.add_vocab_size(cfg["vocab_size"])
    if "num_local_experts" in cfg:
        w.add_expert_count(cfg["num_local_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    experts = {}
    for k, a in sd.items():
        a = a.astype(np.float32)
        base, suffix = k.rsplit(".", 1)
        if base in _GLOBAL:
            w.add_tensor(f"{_GLOBAL[base]}.{suffix}", a)
            continue
        _, _, i, part = base.split(".", 3)
        if ".experts." in part:
            e, kind = part.split(".")[2:4]
            if merged_experts:
                experts.setdefault((i, kind), {})[int(e)] = a
            else:
                w.add_tensor(f"blk.{i}.{_EXPERT[kind]}.{e}.weight", a)
            continue
        if arch == "llama" and part == "self_attn.q_proj":
            a = _permute(a, heads)
        elif arch == "llama" and part == "self_attn.k_proj":
            a = _permute(a, kv)
        w.add_tensor(f"blk.{i}.{_BLOCK[part]}.{suffix}", a.astype(np.float16) if a.ndim == 2 else a)
    for (i, kind), per in sorted(experts.items()):
        w.add_tensor(f"blk.{i}.{_EXPERT[kind]}_exps.weight", np.stack([per[e] for e in sorted(per)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.mark.skipif(DEVICE_TYPE != "cpu", reason="exact float32 comparison")
def test_transformers_reads_our_qwen2_gguf_as_the_original(zoo, gguf_dir):
    from transformers import AutoModelForCausalLM
    path = write_gguf(zoo.checkpoint("qwen2-tiny"), str(gguf_dir / "qwen2-tiny-a.gguf"), "qwen2")
    theirs = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=os.path.basename(path),
                                                  dtype=torch.float32).eval()
    prompts = T.make_prompts(3, 12, 320, 0, seed=1)
    a = T.teacher_forced_logits(zoo.reference("qwen2-tiny"), "qwen2", prompts, 12, 0)
    b = T.teacher_forced_logits(theirs, "qwen2", prompts, 12, 0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name,arch,merged", [("qwen2-tiny", "qwen2", True), ("mixtral-tiny", "llama", True),
                                              ("mixtral-tiny", "llama", False)])
def test_gguf_matches_transformers(zoo, open_lm, gguf_dir, name, arch, merged):
    from flexgen.weights import read_checkpoint_config
    path = write_gguf(zoo.checkpoint(name), str(gguf_dir / f"{name}-{'m' if merged else 'e'}.gguf"), arch, merged)
    cfg = read_checkpoint_config(path)
    assert cfg["model_type"] == ("qwen2" if arch == "qwen2" else "mixtral")
    policy = T.make_policy("mixed_ngb3")
    prompts = T.make_prompts(policy.block_size, 10, 320, T.pad_id_of(name), seed=3)
    with open_lm(name, policy, model=path) as lm:
        assert type(lm.family).__name__ == ("LlamaFamily" if arch == "qwen2" else "MixtralFamily")
        out = lm.generate(prompts, max_new_tokens=8)
    cmp = T.compare_to_reference(zoo.reference(name), T.family_of(name), out, 10, T.pad_id_of(name))
    T.assert_matches_reference(cmp, DEVICE_TYPE, what=f"{name} from GGUF")
