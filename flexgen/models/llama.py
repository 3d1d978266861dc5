"""LLaMA-1/2/3 and the architectures that differ from it only by flags: RMSNorm, rotary positions
(with llama3 / linear scaling), grouped-query attention, SwiGLU MLP, tied or untied output head;
Qwen2/Qwen2.5 (biases on q, k and v only) and Mistral (sliding-window attention, which the engine's
attend applies: the family only names the window)."""
from __future__ import annotations

import dataclasses
import functools
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
    attention_bias: bool = False       # biases on q, k, v and o (LLaMA's flag)
    mlp_bias: bool = False
    qkv_bias: bool = False             # biases on q, k, v only (Qwen2)
    # Sliding-window attention (Mistral, Qwen2 with use_sliding_window): a query sees the last
    # `sliding_window` positions, itself included; window_layers lists the layers that use it
    # (None: all of them)
    sliding_window: int | None = None
    window_layers: tuple | None = None
    arch: str = "llama"                # llama, qwen2, mistral (what the checkpoint calls itself)
    pad_token_id: int = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2

    @property
    def head_dim(self):
        return self.head_dim_ or self.hidden_size // self.n_head

    def miniature(self, num_layers: int) -> "LlamaConfig":
        """ModelFamily.miniature's config: the query and KV heads kept, widths scaled alike, the
        sliding window on the miniature's layers when most real layers have one."""
        from .opt import _multiple, mini_head_dim
        d = mini_head_dim(self.n_head)
        scale = d / self.head_dim
        windowed = self.window_layers is None or 2 * len(self.window_layers) > self.num_hidden_layers
        return dataclasses.replace(self, name=f"{self.name}-mini", num_hidden_layers=num_layers,
                                   hidden_size=_multiple(self.hidden_size * scale), head_dim_=d,
                                   intermediate_size=_multiple(self.intermediate_size * scale), vocab_size=256,
                                   max_seq_len=64, window_layers=None if windowed else ())

    def window_of(self, layer: int) -> int | None:
        if self.sliding_window is None or (self.window_layers is not None and layer not in self.window_layers):
            return None
        return self.sliding_window

    @classmethod
    def from_hf(cls, d: dict, name: str = "llama") -> "LlamaConfig":
        return cls(**cls.hf_fields(d, name))

    @staticmethod
    def hf_fields(d: dict, name: str) -> dict:
        """The constructor arguments for an HF config dict of LLaMA, Qwen2 or Mistral."""
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{d.get('model_type', 'LLaMA')} activation {d.get('hidden_act')!r} is not "
                             "supported (only silu)")
        arch = hf_arch(d)
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
        if pad is None and arch == "qwen2":   # Qwen2 configs name no pad; its tokenizer pads with <|endoftext|>
            pad = d.get("bos_token_id")
        layers = n["num_hidden_layers"]
        window, window_layers = d.get("sliding_window"), None
        if arch == "qwen2":  # Qwen2's window applies only with use_sliding_window, to some layers
            types = d.get("layer_types")
            if not d.get("use_sliding_window", False):
                window = None
            elif types:
                window_layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
            else:
                window_layers = tuple(range(d.get("max_window_layers", 28), layers))
        elif arch == "llama":
            window = None
        return dict(
            name=name, num_hidden_layers=layers, hidden_size=n["hidden_size"],
            n_head=heads, num_key_value_heads=opt["num_key_value_heads"],
            intermediate_size=n["intermediate_size"], vocab_size=n["vocab_size"],
            max_seq_len=opt["max_position_embeddings"], rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta or 10000.0), rope_scaling=rope_scaling, head_dim_=opt.get("head_dim"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
            qkv_bias=arch == "qwen2",
            pad_token_id=0 if pad is None else int(pad), bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            sliding_window=int(window) if window else None, window_layers=window_layers, arch=arch,
        )


# HF architecture / model_type -> our name for the variant
_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral",
          "MixtralForCausalLM": "mixtral"}


def hf_arch(d: dict) -> str:
    for a in d.get("architectures") or []:
        if a in _ARCHS:
            return _ARCHS[a]
    return d.get("model_type") if d.get("model_type") in _ARCHS.values() else "llama"


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


# Qwen2.5 (q/k/v biases, large rope theta; the 7B and larger heads are untied). Base models end
# with <|endoftext|>, instruct models' turns with <|im_end|>; the base configs name 128K
# positions, the instruct ones 32K (YaRN beyond that is not applied by default).
_Q25 = dict(vocab_size=152064, max_seq_len=131072, rms_norm_eps=1e-5, rope_theta=1000000.0, qkv_bias=True,
            pad_token_id=151643, bos_token_id=151643, eos_token_id=151643, arch="qwen2")
for _size, _shape, _eps in (("7b", (28, 3584, 28, 18944, 4), 1e-6), ("14b", (48, 5120, 40, 13824, 8), 1e-5),
                            ("32b", (64, 5120, 40, 27648, 8), 1e-5), ("72b", (80, 8192, 64, 29568, 8), 1e-5)):
    _l, _h, _n, _i, _kv = _shape
    KNOWN_CONFIGS[f"qwen2.5-{_size}"] = _llama(f"Qwen2.5-{_size.upper()}", _l, _h, _n, _i, kv=_kv,
                                               **dict(_Q25, rms_norm_eps=_eps))
    KNOWN_CONFIGS[f"qwen2.5-{_size}-instruct"] = _llama(f"Qwen2.5-{_size.upper()}-Instruct", _l, _h, _n, _i, kv=_kv,
                                                        **dict(_Q25, rms_norm_eps=_eps, max_seq_len=32768,
                                                               eos_token_id=151645))
# Mistral-7B: v0.3 (32768-token vocabulary, full attention) and v0.1 (4096-position sliding window)
_M7 = dict(max_seq_len=32768, rms_norm_eps=1e-5, rope_theta=1000000.0, vocab_size=32768, arch="mistral")
KNOWN_CONFIGS["mistral-7b-v0.3"] = _llama("Mistral-7B-v0.3", 32, 4096, 32, 14336, kv=8, **_M7)
KNOWN_CONFIGS["mistral-7b-instruct-v0.3"] = _llama("Mistral-7B-Instruct-v0.3", 32, 4096, 32, 14336, kv=8, **_M7)
KNOWN_CONFIGS["mistral-7b-v0.1"] = _llama("Mistral-7B-v0.1", 32, 4096, 32, 14336, kv=8,
                                          **dict(_M7, vocab_size=32000, rope_theta=10000.0, sliding_window=4096))


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


def rope_angles(positions, inv_freq, dtype):
    """cos and signed sin (b, s, 1, d) for positions (b, s), computed in float32 as HF does. The
    sin's first half is negated so that rotating is one roll (apply_rope): HF's rotate_half(x) *
    sin = cat(-x2, x1) * sin = roll(x) * cat(-sin1, sin2), exactly (negation is exact)."""
    freqs = positions.float()[..., None] * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    sin[..., : freqs.shape[-1]].neg_()
    return emb.cos().to(dtype)[:, :, None, :], sin.to(dtype)[:, :, None, :]


def apply_rope(x, cos, sin):
    """x: (b, s, heads, d) rotated by the angles of rope_angles. The attention passes q and k as
    one strided view of the qkv projection, so both rotate in the same four kernels."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def rms_norm(x, weight, eps):
    if x.device.type != "cpu" and x.dtype != torch.float32:
        # on an accelerator one fused kernel instead of eight (small-batch decode is bound by
        # kernel count); it multiplies by the weight before rounding to half, HF after: within
        # fp16 rounding. (Meta tensors take this path too: the cost model counts what a GPU runs.)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    dtype = x.dtype   # HF's order of operations exactly: the float32 reference on the CPU
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
            qkv_b, o_b = c.attention_bias or c.qkv_bias, c.attention_bias
            qkv = [f"{p}.self_attn.{n}_proj" for n in "qkv"]
            attn = ([WeightSpec("norm", f"{p}.input_layernorm.weight", (h,), "ones")]
                    + [stacked("qkv.weight", [f"{f}.weight" for f in qkv], (qd, kvd, kvd), (h,))]
                    + ([stacked("qkv.bias", [f"{f}.bias" for f in qkv], (qd, kvd, kvd), (), "zeros")] if qkv_b else [])
                    + lin(f"{p}.self_attn.o_proj", "o", h, qd, o_b))
            window = c.window_of(i)
            forward = self.attention if window is None else functools.partial(self.attention, window=window)
            out.append(LayerSpec("attention", attn, forward, kv_heads=c.num_key_value_heads, head_dim=d))
            out.append(self.mlp_layer(i, p))
        head_file = "embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        out.append(LayerSpec("head", [WeightSpec("norm", "norm.weight", (h,), "ones"),
                                      WeightSpec("lm_head", head_file, (c.vocab_size, h))], self.head))
        return out

    def mlp_layer(self, i: int, p: str) -> LayerSpec:
        """Layer i's feed-forward part (a mixture of experts in MixtralFamily)."""
        c, h, mb = self.config, self.config.hidden_size, self.config.mlp_bias

        def lin(prefix, key, out_dim, in_dim):
            specs = [WeightSpec(f"{key}.weight", f"{prefix}.weight", (out_dim, in_dim))]
            return specs + ([WeightSpec(f"{key}.bias", f"{prefix}.bias", (out_dim,), "zeros")] if mb else [])

        mlp = ([WeightSpec("norm", f"{p}.post_attention_layernorm.weight", (h,), "ones")]
               + lin(f"{p}.mlp.gate_proj", "gate", c.intermediate_size, h)
               + lin(f"{p}.mlp.up_proj", "up", c.intermediate_size, h)
               + lin(f"{p}.mlp.down_proj", "down", h, c.intermediate_size))
        return LayerSpec("mlp", mlp, self.mlp)

    def embed(self, w, h, ctx):
        return F.embedding(ctx.input_ids, w["tok"])

    def attention(self, w, h, ctx, window=None):
        c = self.config
        b, s, _ = h.shape
        x = rms_norm(h, w["norm"], c.rms_norm_eps)
        kvd = c.num_key_value_heads * c.head_dim
        qkv = F.linear(x, w["qkv.weight"], w.get("qkv.bias"))
        qk, v = qkv.split([(c.n_head + c.num_key_value_heads) * c.head_dim, kvd], dim=-1)
        if "rope" not in ctx.extra:  # the same angles serve every layer of this step
            dev = ctx.positions.device
            if dev not in self._inv_freq_on:
                self._inv_freq_on[dev] = self.inv_freq.to(dev)
            ctx.extra["rope"] = rope_angles(ctx.positions.clamp(min=0), self._inv_freq_on[dev], qkv.dtype)
        qk = apply_rope(qk.view(b, s, c.n_head + c.num_key_value_heads, c.head_dim), *ctx.extra["rope"])
        q, k = qk.split([c.n_head, c.num_key_value_heads], dim=2)
        v = v.view(b, s, c.num_key_value_heads, c.head_dim)
        o = ctx.attend(q, k, v, c.head_dim ** -0.5) if window is None else \
            ctx.attend(q, k, v, c.head_dim ** -0.5, window=window)
        return h + F.linear(o.reshape(b, s, -1), w["o.weight"], w.get("o.bias"))

    def mlp(self, w, h, ctx):
        c = self.config
        x = rms_norm(h, w["norm"], c.rms_norm_eps)
        x = F.silu(F.linear(x, w["gate.weight"], w.get("gate.bias"))) * F.linear(x, w["up.weight"], w.get("up.bias"))
        return h + F.linear(x, w["down.weight"], w.get("down.bias"))

    def head(self, w, h, ctx):
        return F.linear(rms_norm(h, w["norm"], self.config.rms_norm_eps), w["lm_head"])
