"""Tiny random OPT, LLaMA, Qwen2, Mistral and Mixtral checkpoints built with transformers, and the
reference check.

Every model is built from a fixed seed, its weights rounded to fp16 (fp16 compute reads a float16
weight cache, so the Hugging Face reference must run on exactly the same values; float32 compute's
cache holds them unchanged) and saved with
`save_pretrained` as safetensors: the engine loads it through its real conversion code.

The reference check is teacher forcing: Hugging Face runs once over the engine's whole output
rows (prompt + generated tokens); for every generated column t, its argmax at column t - 1 must be
the engine's token at t. That compares every step even after an early disagreement, and needs one
forward pass per output instead of a generation loop.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

# ---- the models ----------------------------------------------------------------------------------

OPT_BASE = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, ffn_dim=128,
                max_position_embeddings=64, word_embed_proj_dim=64, init_std=0.2)

# name -> (family, transformers config kwargs)
SPECS = {
    # OPT, pre-LayerNorm (every OPT size but 350m)
    "opt-tiny": ("opt", dict(OPT_BASE)),
    # word_embed_proj_dim != hidden_size: project_in / project_out (like opt-350m)
    "opt-tiny-proj": ("opt", dict(OPT_BASE, word_embed_proj_dim=32, num_hidden_layers=2)),
    # post-LayerNorm with the final LayerNorm removed (opt-350m's layout)
    "opt-tiny-postln": ("opt", dict(OPT_BASE, do_layer_norm_before=False, _remove_final_layer_norm=True,
                                    word_embed_proj_dim=48, num_hidden_layers=2)),
    # LLaMA-1-like: no GQA
    "llama-tiny": ("llama", dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                 rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False)),
    # grouped-query attention: 8 query heads share 2 KV heads
    "llama-tiny-gqa": ("llama", dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                                     rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False)),
    # LLaMA-3.1 rope scaling with a large theta; the short original context (16) puts the tiny
    # head_dim's frequencies into all three bands (kept, smoothed, divided by factor)
    "llama-tiny-rope3": ("llama", dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False,
                                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                        "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 16})),
    # tied input/output embeddings (no lm_head.weight in the checkpoint)
    "llama-tiny-tied": ("llama", dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.2, tie_word_embeddings=True)),
    # explicit head_dim != hidden / heads (hidden 48, 4 heads of 16: q is 64 wide, o maps 64 -> 48)
    "llama-tiny-headdim": ("llama", dict(vocab_size=320, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=64, initializer_range=0.2,
                                         tie_word_embeddings=False)),
    # Qwen2: biases on q, k, v (not o), GQA, rope theta 1e6
    "qwen2-tiny": ("qwen2", dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False,
                                 rope_theta=1000000.0)),
    # Qwen2 with tied embeddings and its sliding window on the layers from max_window_layers on
    # (layer 0 full attention, layers 1-2 a window of 5)
    "qwen2-tiny-tied-swa": ("qwen2", dict(vocab_size=320, hidden_size=64, intermediate_size=96,
                                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, initializer_range=0.2,
                                          tie_word_embeddings=True, use_sliding_window=True, sliding_window=5,
                                          max_window_layers=1)),
    # Qwen2 with SmolLM2's vocabulary (49152), for a real tokenizer and its ChatML chat template
    "qwen2-tiny-chat": ("qwen2", dict(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      initializer_range=0.2, tie_word_embeddings=True, eos_token_id=2)),
    # Mistral with a sliding window (4) shorter than the tests' prompts (10)
    "mistral-tiny-swa": ("mistral", dict(vocab_size=320, hidden_size=64, intermediate_size=112,
                                         num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                                         max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.2,
                                         tie_word_embeddings=False, sliding_window=4)),
    # Mixtral: 6 experts, top-2, router rows scaled unevenly (ROUTER_SCALES) so routing is uneven
    "mixtral-tiny": ("mixtral", dict(vocab_size=320, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     initializer_range=0.2, tie_word_embeddings=False, num_local_experts=6,
                                     num_experts_per_tok=2)),
    # Mixtral with top-3 of 4 experts and a sliding window of 6
    "mixtral-tiny-swa": ("mixtral", dict(vocab_size=320, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                         initializer_range=0.2, tie_word_embeddings=False, num_local_experts=4,
                                         num_experts_per_tok=3, sliding_window=6)),
}

OPT_MODELS = [n for n, (f, _) in SPECS.items() if f == "opt"]
LLAMA_MODELS = [n for n, (f, _) in SPECS.items() if f == "llama"]
# per-expert router biases (through a constant feature, see _skew_router): a few popular
# experts, a few rarely chosen
ROUTER_BIAS = (2.0, 1.0, 0.4, 0.0, -1.0, -2.0)


def family_of(name: str) -> str:
    return SPECS[name][0]


def _hf_classes(family):
    import transformers
    prefix = {"opt": "OPT", "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "mixtral": "Mixtral"}[family]
    return getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForCausalLM")


def _skew_router(model):
    """Route tokens unevenly: hidden feature 0 of every token embedding is set to 1 (it stays
    positive along the residual stream), and each router's column 0 gets ROUTER_BIAS, so that
    feature adds a per-expert bias to the router logits (Mixtral's router has no bias of its own)."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 1.0
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight") and p.dim() == 2:
                n = p.shape[0]
                p[:, 0] += torch.tensor((ROUTER_BIAS + (0.0,) * n)[:n])


def _perturb_constants(model, seed):
    """transformers initialises norm gains to 1 and biases to 0; make them random so that a
    mixed-up or missing bias / norm weight changes the answer."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))


def build_checkpoint(name: str, directory, seed: int = 0, round_fp16: bool = True):
    """Build the model `name`, round its weights to fp16 (unless round_fp16=False), save it into
    `directory` (safetensors)."""
    family, kwargs = SPECS[name]
    config_cls, model_cls = _hf_classes(family)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    _perturb_constants(model, seed)
    if family == "mixtral":
        _skew_router(model)
    if round_fp16:   # fp16 compute (the GPU tests) reads a float16 cache: the reference uses those values
        model = model.half().float()
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    names = os.listdir(directory)
    assert any(n.endswith(".safetensors") for n in names), names
    return directory


def load_reference(directory):
    """The Hugging Face model from a saved tiny checkpoint, float32, eval mode."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


def pad_id_of(name: str) -> int:
    family, kwargs = SPECS[name]
    if family == "opt":
        return kwargs.get("pad_token_id", 1)
    pad = kwargs.get("pad_token_id")
    return 0 if pad is None else pad


# ---- prompts -------------------------------------------------------------------------------------

def make_prompts(n: int, length: int, vocab: int, pad: int, seed: int = 0, min_len: int | None = None,
                 avoid=()) -> np.ndarray:
    """n left-padded prompts of `length` columns with real lengths spread over [min_len, length]
    (the first row is always full length). Real tokens never equal the pad id (or `avoid`)."""
    rng = np.random.default_rng(seed)
    min_len = max(1, length // 2) if min_len is None else min_len
    banned = {pad, *avoid}
    allowed = np.array([t for t in range(3, vocab) if t not in banned])
    rows = np.full((n, length), pad, dtype=np.int64)
    for i in range(n):
        real = length if i == 0 else int(rng.integers(min_len, length + 1))
        rows[i, length - real:] = rng.choice(allowed, size=real)
    return rows


# ---- the reference check -------------------------------------------------------------------------

def teacher_forced_logits(ref, family: str, out: np.ndarray, prompt_len: int, pad: int,
                          prompt_mask=None) -> torch.Tensor:
    """Hugging Face float32 logits over whole output rows (b, L, V).

    The mask hides prompt padding; generated columns are all real (a row that emitted a stop token
    gets pad afterwards, but those columns are not compared). LLaMA gets explicit positions from
    the mask; OPT computes its positions from the mask itself."""
    ids = torch.as_tensor(np.asarray(out), dtype=torch.long)
    mask = torch.ones_like(ids)
    if prompt_mask is None:
        mask[:, :prompt_len] = (ids[:, :prompt_len] != pad).long()
    else:
        mask[:, :prompt_len] = torch.as_tensor(np.asarray(prompt_mask)).long()
    kwargs = dict(input_ids=ids, attention_mask=mask)
    if family != "opt":
        kwargs["position_ids"] = (mask.cumsum(-1) * mask - 1).clamp(min=0)
    with torch.no_grad():
        return ref(**kwargs).logits.float()


def reference_token_logprobs(ref, family: str, out: np.ndarray, prompt_len: int, pad: int) -> np.ndarray:
    """Hugging Face float32 log-probabilities (b, T) of the tokens generated after prompt_len."""
    lp = torch.log_softmax(teacher_forced_logits(ref, family, out, prompt_len, pad), -1)
    picked = torch.as_tensor(np.asarray(out)[:, prompt_len:])[..., None]
    return lp[:, prompt_len - 1:-1].gather(-1, picked).squeeze(-1).numpy()


@dataclass
class Comparison:
    ours: np.ndarray          # (b, T) our generated tokens
    theirs: np.ndarray        # (b, T) HF's teacher-forced argmax
    margin: np.ndarray        # (b, T) HF's top-1 minus top-2 logit at each compared position
    compared: np.ndarray      # (b, T) bool: positions that are compared (before / at a stop)
    logits: torch.Tensor      # (b, T, V) HF's logits predicting each generated column

    @property
    def agreement(self) -> float:
        return float((self.ours == self.theirs)[self.compared].mean())

    def mismatches(self):
        return [(int(r), int(t), int(self.ours[r, t]), int(self.theirs[r, t]), float(self.margin[r, t]))
                for r, t in zip(*np.nonzero((self.ours != self.theirs) & self.compared))]


def compare_to_reference(ref, family, out, prompt_len, pad, stop_ids=(), prompt_mask=None) -> Comparison:
    out = np.asarray(out)
    logits = teacher_forced_logits(ref, family, out, prompt_len, pad, prompt_mask)
    pred = logits[:, prompt_len - 1:-1]                         # predicts columns prompt_len ..
    top2 = pred.topk(2, dim=-1).values
    ours = out[:, prompt_len:]
    compared = np.ones(ours.shape, dtype=bool)
    if stop_ids:
        for r in range(ours.shape[0]):
            hits = np.nonzero(np.isin(ours[r], list(stop_ids)))[0]
            if len(hits):
                compared[r, hits[0] + 1:] = False
    return Comparison(ours=ours, theirs=pred.argmax(-1).numpy(), margin=(top2[..., 0] - top2[..., 1]).numpy(),
                      compared=compared, logits=pred)


def assert_matches_reference(cmp: Comparison, device_type: str = "cpu", what: str = ""):
    """CPU (float32): identical greedy tokens. CUDA (fp16 compute): a disagreement is allowed only
    where HF's own top-2 margin is within fp16 noise, and at least 90% of positions agree."""
    bad = cmp.mismatches()
    if device_type == "cpu":
        assert not bad, f"{what}: greedy tokens differ from transformers (row, step, ours, hf, hf margin): {bad[:8]}"
        return
    real = [m for m in bad if m[4] > FP16_MARGIN]
    assert not real, f"{what}: tokens differ where transformers is sure (margin > {FP16_MARGIN}): {real[:8]}"
    assert cmp.agreement >= 0.9, f"{what}: only {cmp.agreement:.1%} top-1 agreement; mismatches {bad[:8]}"


# A disagreement on CUDA is fp16 noise only where HF's top-2 logits are this close.
FP16_MARGIN = 5e-2


def distinct_generated(out: np.ndarray, prompt_len: int) -> int:
    return len(np.unique(np.asarray(out)[:, prompt_len:]))


# ---- placements ----------------------------------------------------------------------------------
# name -> (six percents, extra Policy arguments). Percents are (weight gpu, cpu, cache gpu, cpu,
# act gpu, cpu); "gpu" is the compute device, whatever it is; the rest of each goes to disk.

PLACEMENTS = {
    "all_compute": ((100, 0, 100, 0, 100, 0), {}),
    "weights_cpu": ((0, 100, 100, 0, 100, 0), {}),
    "weights_cpu_disk": ((0, 50, 100, 0, 100, 0), {}),
    "cache_cpu": ((100, 0, 0, 100, 100, 0), {}),
    "cache_disk": ((100, 0, 0, 0, 100, 0), {}),
    "act_cpu": ((100, 0, 100, 0, 0, 100), {}),
    "act_disk": ((100, 0, 100, 0, 0, 0), {}),
    "all_disk": ((0, 0, 0, 0, 0, 0), {}),
    # weights 30/40/30, cache 50/25/25, activations on the CPU
    "mixed": ((30, 40, 50, 25, 0, 100), {}),
    # every kind split over all three tiers
    "mixed_all_tiers": ((20, 30, 40, 30, 30, 40), {}),
    "mixed_ngb3": ((30, 40, 50, 25, 0, 100), {"num_gpu_batches": 3}),
    "all_disk_ngb3": ((0, 0, 0, 0, 0, 0), {"num_gpu_batches": 3}),
    "mixed_no_overlap": ((30, 40, 50, 25, 0, 100), {"overlap": False}),
    "mixed_no_sep_layer": ((30, 40, 50, 25, 0, 100), {"sep_layer": False}),
    "disk_no_overlap_no_sep": ((0, 30, 0, 40, 0, 50), {"overlap": False, "sep_layer": False}),
    "cache_cpu_cpu_attn": ((100, 0, 0, 100, 100, 0), {"cpu_cache_compute": True}),
    "cache_split_cpu_attn": ((50, 50, 25, 50, 100, 0), {"cpu_cache_compute": True}),
    "cache_split_no_cpu_attn": ((50, 50, 25, 50, 100, 0), {"cpu_cache_compute": False}),
    "cache_cpu_disk_cpu_attn_ngb3": ((0, 100, 0, 50, 0, 100), {"cpu_cache_compute": True, "num_gpu_batches": 3,
                                                                "overlap": True}),
    "no_pin": ((0, 100, 0, 100, 100, 0), {"pin_weight": False}),
}

# A smaller set for the other shapes of each family: the plainest, the busiest, and CPU attention.
SHAPE_PLACEMENTS = ["all_compute", "mixed_ngb3", "cache_split_cpu_attn"]


def make_policy(placement: str, gpu_batch_size: int = 2, **overrides):
    from flexgen.flex_opt import Policy
    percents, extra = PLACEMENTS[placement]
    kwargs = dict(num_gpu_batches=2, overlap=True, sep_layer=True, pin_weight=True, cpu_cache_compute=False,
                  attn_sparsity=1.0)
    kwargs.update(extra)
    kwargs.update(overrides)
    ngb = kwargs.pop("num_gpu_batches")
    return Policy(gpu_batch_size, ngb, *percents, **kwargs)


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor, device_type: str = "cpu"):
    """float32: max abs diff within 1e-4 of the logits' scale; fp16: within fp16 noise."""
    scale = max(1.0, float(theirs.abs().max()))
    diff = float((ours - theirs).abs().max())
    tol = (1e-4 if device_type == "cpu" else 2e-2) * scale
    assert diff <= tol, f"logits differ from transformers by {diff:.3g} (tolerance {tol:.3g}, scale {scale:.3g})"


def prompts_with_pad_inside(name: str, n: int, length: int, seed: int = 0):
    """Left-padded prompts whose real part also holds the pad id (as chat prompts do when the pad
    is the end-of-turn token), and their attention mask."""
    pad = pad_id_of(name)
    prompts = make_prompts(n, length, SPECS[name][1]["vocab_size"], pad, seed=seed)
    mask = prompts != pad
    rng = np.random.default_rng(seed + 100)
    for r in range(n):
        real = np.nonzero(mask[r])[0]
        prompts[r, rng.choice(real[1:], size=min(2, len(real) - 1), replace=False)] = pad
    return prompts, mask


def assert_matches_hf_generate(open_lm, ref, name: str, max_new_tokens: int):
    """Unpadded equal-length prompts: our whole output equals transformers' own generate
    (do_sample=False; its incremental decoding and cache), on a split cache with CPU attention."""
    pad = pad_id_of(name)
    prompts = make_prompts(3, 9, 320, pad, seed=5, min_len=9)
    with open_lm(name, make_policy("cache_split_cpu_attn", gpu_batch_size=3, num_gpu_batches=1)) as lm:
        ours = lm.generate(prompts, max_new_tokens=max_new_tokens)
    theirs = ref.generate(torch.as_tensor(prompts), do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=None, pad_token_id=pad, attention_mask=torch.ones(prompts.shape, dtype=torch.long))
    np.testing.assert_array_equal(ours, theirs.numpy())
