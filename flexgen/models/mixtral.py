"""Mixtral: Mistral's attention with a routed mixture of SwiGLU experts in place of the MLP.

The router (a linear map to one logit per expert) picks each token's top-k experts; their
softmax probabilities, renormalised over the k chosen, weight the experts' outputs (as
transformers' MixtralTopKRouter does: softmax in float32, top-k, divide by the sum).

A layer's weights are its router and every expert, so they are placed, compressed and moved
like a dense layer's; only the compute is routed (models/moe.py groups the tokens by expert).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn.functional as F

from .base import LayerSpec, WeightSpec, stacked
from .llama import LlamaConfig, LlamaFamily, rms_norm
from .moe import route_top_k, routed_experts


@dataclass
class MixtralConfig(LlamaConfig):
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    arch: str = "mixtral"

    @classmethod
    def from_hf(cls, d: dict, name: str = "mixtral") -> "MixtralConfig":
        fields = LlamaConfig.hf_fields(d, name)
        experts, top_k = int(d["num_local_experts"]), int(d["num_experts_per_tok"])
        if not 1 <= top_k <= experts:
            raise ValueError(f"num_experts_per_tok {top_k} must be within 1..num_local_experts {experts}")
        return cls(**fields, num_local_experts=experts, num_experts_per_tok=top_k)


def _mixtral(name, layers, hidden, heads, inter, vocab, max_seq, **kw):
    return MixtralConfig(name=name, num_hidden_layers=layers, hidden_size=hidden, n_head=heads,
                         num_key_value_heads=8, intermediate_size=inter, vocab_size=vocab, max_seq_len=max_seq,
                         rms_norm_eps=1e-5, rope_theta=1000000.0, bos_token_id=1, eos_token_id=2, **kw)


KNOWN_CONFIGS = {
    "mixtral-8x7b-v0.1": _mixtral("Mixtral-8x7B-v0.1", 32, 4096, 32, 14336, 32000, 32768),
    "mixtral-8x7b-instruct-v0.1": _mixtral("Mixtral-8x7B-Instruct-v0.1", 32, 4096, 32, 14336, 32000, 32768),
    "mixtral-8x22b-v0.1": _mixtral("Mixtral-8x22B-v0.1", 56, 6144, 48, 16384, 32000, 65536),
    "mixtral-8x22b-instruct-v0.1": _mixtral("Mixtral-8x22B-Instruct-v0.1", 56, 6144, 48, 16384, 32768, 65536),
}


def get_mixtral_config(name: str, **overrides) -> MixtralConfig:
    key = name.split("/")[-1].lower()
    if key not in KNOWN_CONFIGS:
        raise KeyError(name)
    return dataclasses.replace(KNOWN_CONFIGS[key], name=name.split("/")[-1], **overrides)


class MixtralFamily(LlamaFamily):
    """Runs with flex_llama's LM (family "llama"): everything but the feed-forward is LLaMA's."""

    def mlp_layer(self, i: int, p: str) -> LayerSpec:
        c = self.config
        h, inter, n = c.hidden_size, c.intermediate_size, c.num_local_experts
        share = c.num_experts_per_tok / n
        moe = f"{p}.block_sparse_moe"
        weights = [WeightSpec("norm", f"{p}.post_attention_layernorm.weight", (h,), "ones"),
                   # the router stays at full precision: quantising it would move tokens between experts
                   WeightSpec("router", f"{moe}.gate.weight", (n, h), packable=False)]
        for e in range(n):
            ex = f"{moe}.experts.{e}"
            # w1 (gate) and w3 (up) as one matrix: one matmul per expert, as transformers does
            weights.append(stacked(f"experts.{e}.gate_up", [f"{ex}.w1.weight", f"{ex}.w3.weight"], (inter, inter),
                                   (h,), share=share))
            weights.append(WeightSpec(f"experts.{e}.down", f"{ex}.w2.weight", (h, inter), share=share))
        return LayerSpec("moe", weights, self.moe, top_k=c.num_experts_per_tok)

    def moe(self, w, h, ctx):
        c = self.config
        b, s, hidden = h.shape
        x = rms_norm(h, w["norm"], c.rms_norm_eps).reshape(b * s, hidden)
        experts, weights = route_top_k(F.linear(x, w["router"]), c.num_experts_per_tok)

        def expert(e, xe):
            gate, up = F.linear(xe, w[f"experts.{e}.gate_up"]).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, w[f"experts.{e}.down"])

        return h + routed_experts(x, experts, weights, expert, c.num_local_experts).view(b, s, hidden)
