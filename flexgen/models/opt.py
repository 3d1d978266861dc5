"""OPT: learned positions (offset 2), pre- or post-LayerNorm, ReLU MLP, tied output embedding."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import LayerSpec, ModelFamily, ModelInfo, WeightSpec, require_sizes, stacked


@dataclass
class OptConfig:
    name: str = "opt-125m"
    num_hidden_layers: int = 12
    max_seq_len: int = 2048
    hidden_size: int = 768
    n_head: int = 12
    input_dim: int = 768           # word_embed_proj_dim
    ffn_embed_dim: int = 3072
    vocab_size: int = 50272
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    enable_bias: bool = True

    @property
    def head_dim(self):
        return self.hidden_size // self.n_head

    def miniature(self, num_layers: int) -> "OptConfig":
        """ModelFamily.miniature's config: the heads kept, head dim mini_head_dim, widths scaled alike."""
        d = mini_head_dim(self.n_head)
        hidden = self.n_head * d
        scale = hidden / self.hidden_size
        return dataclasses.replace(self, name=f"{self.name}-mini", num_hidden_layers=num_layers, hidden_size=hidden,
                                   input_dim=_multiple(self.input_dim * scale), max_seq_len=64, vocab_size=256,
                                   ffn_embed_dim=_multiple(self.ffn_embed_dim * scale))

    @classmethod
    def from_hf(cls, d: dict, name: str = "opt") -> "OptConfig":
        act = d.get("activation_function", "relu")
        if act != "relu":
            raise ValueError(f"OPT activation {act!r} is not supported (only relu)")
        if not d.get("layer_norm_elementwise_affine", True):
            raise ValueError("OPT checkpoints without LayerNorm affine parameters are not supported")
        n = require_sizes(d, "OPT", ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
                                     "vocab_size"))
        hidden = n["hidden_size"]
        if hidden % n["num_attention_heads"]:
            raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads "
                             f"{n['num_attention_heads']}")
        extra = require_sizes({"word_embed_proj_dim": d.get("word_embed_proj_dim") or hidden,
                               "max_position_embeddings": d.get("max_position_embeddings", 2048)}, "OPT",
                              ("word_embed_proj_dim", "max_position_embeddings"))
        return cls(
            name=name, num_hidden_layers=n["num_hidden_layers"],
            max_seq_len=extra["max_position_embeddings"], hidden_size=hidden,
            n_head=n["num_attention_heads"], input_dim=extra["word_embed_proj_dim"],
            ffn_embed_dim=n["ffn_dim"], vocab_size=n["vocab_size"],
            pad_token_id=_int_or(d.get("pad_token_id"), 1), bos_token_id=_int_or(d.get("bos_token_id"), 2),
            eos_token_id=_int_or(d.get("eos_token_id"), 2),
            do_layer_norm_before=d.get("do_layer_norm_before", True),
            remove_final_layer_norm=d.get("_remove_final_layer_norm", False),
            enable_bias=d.get("enable_bias", True),
        )


def mini_head_dim(heads: int) -> int:
    """The smallest head dim at which `heads` heads make a width of whole groups of 64 (compression's
    default group): the miniature's packed weights need no padding the real ones do not."""
    return next(d for d in (8, 16, 32, 64) if heads * d % 64 == 0)


def _multiple(x: float, of: int = 64) -> int:
    return max(of, int(round(x / of)) * of)


def _int_or(v, default):
    if isinstance(v, list):
        v = v[0] if v else None
    return default if v is None else int(v)


def _opt(name, layers, hidden, heads, ffn=None, **kw):
    return OptConfig(name=name, num_hidden_layers=layers, hidden_size=hidden, n_head=heads,
                     input_dim=kw.pop("input_dim", hidden), ffn_embed_dim=ffn or 4 * hidden, **kw)


KNOWN_CONFIGS = {
    "opt-125m": _opt("opt-125m", 12, 768, 12),
    "opt-350m": _opt("opt-350m", 24, 1024, 16, input_dim=512, do_layer_norm_before=False,
                     remove_final_layer_norm=True),
    "opt-1.3b": _opt("opt-1.3b", 24, 2048, 32),
    "opt-2.7b": _opt("opt-2.7b", 32, 2560, 32),
    "opt-6.7b": _opt("opt-6.7b", 32, 4096, 32),
    "opt-13b": _opt("opt-13b", 40, 5120, 40),
    "opt-30b": _opt("opt-30b", 48, 7168, 56),
    "opt-66b": _opt("opt-66b", 64, 9216, 72),
    "opt-175b": _opt("opt-175b", 96, 12288, 96),
    # one pipeline stage's share of OPT-175B (a quarter of its layers), as FlexGen's bench_suite runs it
    "opt-175b-stage": _opt("opt-175b-stage", 24, 12288, 96),
    "galactica-30b": _opt("galactica-30b", 48, 7168, 56, vocab_size=50000, bos_token_id=0),
}


def get_opt_config(name: str, **overrides) -> OptConfig:
    """FlexGen's helper: a known OPT config by name ("facebook/opt-30b" or "opt-30b")."""
    key = name.split("/")[-1].lower()
    # OPT-IML (instruction-tuned) models have the shape of the OPT of the same size, as in FlexGen.
    arch = key.replace("-iml-max", "").replace("-iml", "")
    if arch not in KNOWN_CONFIGS:
        raise KeyError(name)
    return dataclasses.replace(KNOWN_CONFIGS[arch], name=key, **overrides)


# ---- the math ---------------------------------------------------------------------------------

def _ln(x, w, prefix, eps):
    return F.layer_norm(x, (x.shape[-1],), w[prefix + ".weight"], w[prefix + ".bias"], eps)


def _linear_relu(x, weight, bias):
    """relu(x W^T + b): on CUDA one GEMM with cuBLASLt's bias+ReLU epilogue instead of a GEMM and
    a ReLU kernel (a small-batch decode step is bound by its kernel count); the same values. A
    weight that is not a plain tensor takes F.linear, which it overrides (__torch_function__)."""
    if bias is None or not isinstance(weight, torch.Tensor):
        return F.relu(F.linear(x, weight, bias))
    return torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t()).view(*x.shape[:-1], -1)


class OptFamily(ModelFamily):
    family = "opt"

    def info(self) -> ModelInfo:
        c = self.config
        return ModelInfo(name=c.name, family="opt", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                         num_layers=c.num_hidden_layers, num_heads=c.n_head, num_kv_heads=c.n_head,
                         head_dim=c.head_dim, max_seq_len=c.max_seq_len, pad_token_id=c.pad_token_id,
                         eos_token_id=c.eos_token_id, bos_token_id=c.bos_token_id)

    def layers(self) -> list[LayerSpec]:
        c = self.config
        h, v = c.hidden_size, c.vocab_size
        bias = c.enable_bias

        def lin(prefix, key, out_dim, in_dim, with_bias=bias):
            specs = [WeightSpec(f"{key}.weight", f"{prefix}.weight", (out_dim, in_dim))]
            if with_bias:
                specs.append(WeightSpec(f"{key}.bias", f"{prefix}.bias", (out_dim,), "zeros"))
            return specs

        def ln(prefix, key):
            return [WeightSpec(f"{key}.weight", f"{prefix}.weight", (h,), "ones"),
                    WeightSpec(f"{key}.bias", f"{prefix}.bias", (h,), "zeros")]

        embed = [WeightSpec("tok", "decoder.embed_tokens.weight", (v, c.input_dim)),
                 WeightSpec("pos", "decoder.embed_positions.weight", (c.max_seq_len + 2, h))]
        head = [WeightSpec("tok", "decoder.embed_tokens.weight", (v, c.input_dim))]
        if c.input_dim != h:
            embed.append(WeightSpec("proj_in.weight", "decoder.project_in.weight", (h, c.input_dim)))
            head.append(WeightSpec("proj_out.weight", "decoder.project_out.weight", (c.input_dim, h)))
        if c.do_layer_norm_before and not c.remove_final_layer_norm:
            head += ln("decoder.final_layer_norm", "ln")

        out = [LayerSpec("embed", embed, self.embed)]
        for i in range(c.num_hidden_layers):
            p = f"decoder.layers.{i}"
            qkv = [f"{p}.self_attn.{n}_proj" for n in "qkv"]
            attn = (ln(f"{p}.self_attn_layer_norm", "ln")
                    + [stacked("qkv.weight", [f"{f}.weight" for f in qkv], (h, h, h), (h,))]
                    + ([stacked("qkv.bias", [f"{f}.bias" for f in qkv], (h, h, h), (), "zeros")] if bias else [])
                    + lin(f"{p}.self_attn.out_proj", "o", h, h))
            mlp = (ln(f"{p}.final_layer_norm", "ln") + lin(f"{p}.fc1", "fc1", c.ffn_embed_dim, h)
                   + lin(f"{p}.fc2", "fc2", h, c.ffn_embed_dim))
            out.append(LayerSpec("attention", attn, self.attention, kv_heads=c.n_head, head_dim=c.head_dim))
            out.append(LayerSpec("mlp", mlp, self.mlp))
        out.append(LayerSpec("head", head, self.head))
        return out

    def embed(self, w, h, ctx):
        x = F.embedding(ctx.input_ids, w["tok"])
        if "proj_in.weight" in w:
            x = F.linear(x, w["proj_in.weight"])
        # OPT's learned positions are offset by 2; padding positions (-1) map to row 1.
        return x + F.embedding(ctx.positions + 2, w["pos"])

    def attention(self, w, h, ctx):
        c = self.config
        b, s, _ = h.shape
        x = _ln(h, w, "ln", c.layer_norm_eps) if c.do_layer_norm_before else h
        q, k, v = F.linear(x, w["qkv.weight"], w.get("qkv.bias")).split(c.hidden_size, dim=-1)
        shape = (b, s, c.n_head, c.head_dim)
        o = ctx.attend(q.view(shape), k.view(shape), v.view(shape), c.head_dim ** -0.5)
        h = h + F.linear(o.reshape(b, s, c.hidden_size), w["o.weight"], w.get("o.bias"))
        return h if c.do_layer_norm_before else _ln(h, w, "ln", c.layer_norm_eps)

    def mlp(self, w, h, ctx):
        c = self.config
        x = _ln(h, w, "ln", c.layer_norm_eps) if c.do_layer_norm_before else h
        x = _linear_relu(x, w["fc1.weight"], w.get("fc1.bias"))
        h = h + F.linear(x, w["fc2.weight"], w.get("fc2.bias"))
        return h if c.do_layer_norm_before else _ln(h, w, "ln", c.layer_norm_eps)

    def head(self, w, h, ctx):
        c = self.config
        if "ln.weight" in w:
            h = _ln(h, w, "ln", c.layer_norm_eps)
        if "proj_out.weight" in w:
            h = F.linear(h, w["proj_out.weight"])
        return F.linear(h, w["tok"])
