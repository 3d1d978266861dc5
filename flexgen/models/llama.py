"""LLaMA-1/2/3: RMSNorm, rotary positions (with llama3 / linear scaling), grouped-query attention,
SwiGLU MLP, tied or untied output head."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import LayerSpec, ModelFamily, ModelInfo, WeightSpec, require_sizes, stacked


@dataclass
class LlamaConfig:
    name: str = "llama"
    num_hidden_layers: int = 32
    hidden_size: int = 4096
    n_head: int = 32
    num_key_value_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = 32000
    max_seq_len: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    head_dim_: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    pad_token_id: int = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2

    @property
    def head_dim(self):
        return self.head_dim_ or self.hidden_size // self.n_head

    @classmethod
    def from_hf(cls, d: dict, name: str = "llama") -> "LlamaConfig":
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"LLaMA activation {d.get('hidden_act')!r} is not supported (only silu)")
        n = require_sizes(d, "LLaMA", ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                       "intermediate_size", "vocab_size"))
        heads = n["num_attention_heads"]
        optional = {"num_key_value_heads": d.get("num_key_value_heads") or heads,
                    "max_position_embeddings": d.get("max_position_embeddings", 2048)}
        if d.get("head_dim") is not None:
            optional["head_dim"] = d["head_dim"]
        elif n["hidden_size"] % heads:
            raise ValueError(f"hidden_size {n['hidden_size']} is not a multiple of num_attention_heads {heads}")
        opt = require_sizes(optional, "LLaMA", tuple(optional))
        if heads % opt["num_key_value_heads"]:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads "
                             f"{opt['num_key_value_heads']}")
        pad = d.get("pad_token_id")
        if isinstance(pad, list):
            pad = pad[0] if pad else None
        rope_scaling = d.get("rope_scaling")
        theta = d.get("rope_theta")
        params = d.get("rope_parameters")  # transformers >= 5 folds theta and scaling in here
        if isinstance(params, dict):
            theta = params.get("rope_theta", theta)
            if params.get("rope_type", "default") != "default":
                rope_scaling = params
        return cls(
            name=name, num_hidden_layers=n["num_hidden_layers"], hidden_size=n["hidden_size"],
            n_head=heads, num_key_value_heads=opt["num_key_value_heads"],
            intermediate_size=n["intermediate_size"], vocab_size=n["vocab_size"],
            max_seq_len=opt["max_position_embeddings"], rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta or 10000.0), rope_scaling=rope_scaling, head_dim_=opt.get("head_dim"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
            pad_token_id=0 if pad is None else int(pad), bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
        )


def _llama(name, layers, hidden, heads, inter, kv=None, **kw):
    return LlamaConfig(name=name, num_hidden_layers=layers, hidden_size=hidden, n_head=heads,
                       num_key_value_heads=kv or heads, intermediate_size=inter, **kw)


_L2 = dict(max_seq_len=4096, rms_norm_eps=1e-5)
_L3 = dict(vocab_size=128256, max_seq_len=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
           bos_token_id=128000, eos_token_id=128001)
_L31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_L31 = dict(_L3, max_seq_len=131072, rope_scaling=_L31_SCALING)
_INSTRUCT_EOS = [128001, 128008, 128009]

KNOWN_CONFIGS = {
    "llama-7b": _llama("llama-7b", 32, 4096, 32, 11008),
    "llama-13b": _llama("llama-13b", 40, 5120, 40, 13824),
    "llama-30b": _llama("llama-30b", 60, 6656, 52, 17920),
    "llama-65b": _llama("llama-65b", 80, 8192, 64, 22016),
    "llama-2-7b-hf": _llama("Llama-2-7b-hf", 32, 4096, 32, 11008, **_L2),
    "llama-2-13b-hf": _llama("Llama-2-13b-hf", 40, 5120, 40, 13824, **_L2),
    "llama-2-70b-hf": _llama("Llama-2-70b-hf", 80, 8192, 64, 28672, kv=8, **_L2),
    "meta-llama-3-8b": _llama("Meta-Llama-3-8B", 32, 4096, 32, 14336, kv=8, **_L3),
    "meta-llama-3-70b": _llama("Meta-Llama-3-70B", 80, 8192, 64, 28672, kv=8, **_L3),
    "llama-3.1-8b": _llama("Llama-3.1-8B", 32, 4096, 32, 14336, kv=8, **_L31),
    "llama-3.1-70b": _llama("Llama-3.1-70B", 80, 8192, 64, 28672, kv=8, **_L31),
}
for _k in ("llama-2-7b", "llama-2-13b", "llama-2-70b"):
    KNOWN_CONFIGS[f"{_k}-chat-hf"] = dataclasses.replace(KNOWN_CONFIGS[f"{_k}-hf"], name=f"{_k}-chat-hf")
for _k in ("meta-llama-3-8b", "meta-llama-3-70b"):
    KNOWN_CONFIGS[f"{_k}-instruct"] = dataclasses.replace(KNOWN_CONFIGS[_k], eos_token_id=[128001, 128009])
for _k in ("llama-3.1-8b", "llama-3.1-70b"):
    KNOWN_CONFIGS[f"{_k}-instruct"] = dataclasses.replace(KNOWN_CONFIGS[_k], eos_token_id=_INSTRUCT_EOS)


def get_llama_config(name: str, **overrides) -> LlamaConfig:
    key = name.split("/")[-1].lower()
    if key not in KNOWN_CONFIGS:
        raise KeyError(name)
    cfg = KNOWN_CONFIGS[key]
    return dataclasses.replace(cfg, name=name.split("/")[-1], **overrides)


# ---- rotary embeddings ------------------------------------------------------------------------

def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = cfg.rope_scaling
    if not sc:
        return inv
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":
        factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_angles(positions, inv_freq, dtype):
    """cos and sin (b, s, 1, d) for positions (b, s), computed in float32 as HF does."""
    freqs = positions.float()[..., None] * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, :, None, :], emb.sin().to(dtype)[:, :, None, :]


def apply_rope(q, k, cos, sin):
    """q, k: (b, s, heads, d) rotated by the angles of rope_angles."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rms_norm(x, weight, eps):
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class LlamaFamily(ModelFamily):
    family = "llama"

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.inv_freq = rope_inv_freq(config)
        self._inv_freq_on = {}

    def info(self) -> ModelInfo:
        c = self.config
        return ModelInfo(name=c.name, family="llama", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                         num_layers=c.num_hidden_layers, num_heads=c.n_head,
                         num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                         max_seq_len=c.max_seq_len, pad_token_id=c.pad_token_id,
                         eos_token_id=c.eos_token_id, bos_token_id=c.bos_token_id)

    def layers(self) -> list[LayerSpec]:
        c = self.config
        h, d = c.hidden_size, c.head_dim
        qd, kvd = c.n_head * d, c.num_key_value_heads * d

        def lin(prefix, key, out_dim, in_dim, bias):
            specs = [WeightSpec(f"{key}.weight", f"{prefix}.weight", (out_dim, in_dim))]
            if bias:
                specs.append(WeightSpec(f"{key}.bias", f"{prefix}.bias", (out_dim,), "zeros"))
            return specs

        out = [LayerSpec("embed", [WeightSpec("tok", "embed_tokens.weight", (c.vocab_size, h))], self.embed)]
        for i in range(c.num_hidden_layers):
            p = f"layers.{i}"
            ab, mb = c.attention_bias, c.mlp_bias
            qkv = [f"{p}.self_attn.{n}_proj" for n in "qkv"]
            attn = ([WeightSpec("norm", f"{p}.input_layernorm.weight", (h,), "ones")]
                    + [stacked("qkv.weight", [f"{f}.weight" for f in qkv], (qd, kvd, kvd), (h,))]
                    + ([stacked("qkv.bias", [f"{f}.bias" for f in qkv], (qd, kvd, kvd), (), "zeros")] if ab else [])
                    + lin(f"{p}.self_attn.o_proj", "o", h, qd, ab))
            mlp = ([WeightSpec("norm", f"{p}.post_attention_layernorm.weight", (h,), "ones")]
                   + lin(f"{p}.mlp.gate_proj", "gate", c.intermediate_size, h, mb)
                   + lin(f"{p}.mlp.up_proj", "up", c.intermediate_size, h, mb)
                   + lin(f"{p}.mlp.down_proj", "down", h, c.intermediate_size, mb))
            out.append(LayerSpec("attention", attn, self.attention, kv_heads=c.num_key_value_heads, head_dim=d))
            out.append(LayerSpec("mlp", mlp, self.mlp))
        head_file = "embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        out.append(LayerSpec("head", [WeightSpec("norm", "norm.weight", (h,), "ones"),
                                      WeightSpec("lm_head", head_file, (c.vocab_size, h))], self.head))
        return out

    def embed(self, w, h, ctx):
        return F.embedding(ctx.input_ids, w["tok"])

    def attention(self, w, h, ctx):
        c = self.config
        b, s, _ = h.shape
        x = rms_norm(h, w["norm"], c.rms_norm_eps)
        kvd = c.num_key_value_heads * c.head_dim
        q, k, v = F.linear(x, w["qkv.weight"], w.get("qkv.bias")).split([c.n_head * c.head_dim, kvd, kvd], dim=-1)
        q = q.view(b, s, c.n_head, c.head_dim)
        k = k.view(b, s, c.num_key_value_heads, c.head_dim)
        v = v.view(b, s, c.num_key_value_heads, c.head_dim)
        if "rope" not in ctx.extra:  # the same angles serve every layer of this step
            dev = ctx.positions.device
            if dev not in self._inv_freq_on:
                self._inv_freq_on[dev] = self.inv_freq.to(dev)
            ctx.extra["rope"] = rope_angles(ctx.positions.clamp(min=0), self._inv_freq_on[dev], q.dtype)
        q, k = apply_rope(q, k, *ctx.extra["rope"])
        o = ctx.attend(q, k, v, c.head_dim ** -0.5)
        return h + F.linear(o.reshape(b, s, -1), w["o.weight"], w.get("o.bias"))

    def mlp(self, w, h, ctx):
        c = self.config
        x = rms_norm(h, w["norm"], c.rms_norm_eps)
        x = F.silu(F.linear(x, w["gate.weight"], w.get("gate.bias"))) * F.linear(x, w["up.weight"], w.get("up.bias"))
        return h + F.linear(x, w["down.weight"], w.get("down.bias"))

    def head(self, w, h, ctx):
        return F.linear(rms_norm(h, w["norm"], self.config.rms_norm_eps), w["lm_head"])
