"""The attention core, on whichever device its inputs are: dense (SDPA) or top-k sparse decode.

Shapes: q (b, s, heads, d); k, v (b, S, kv_heads, d) hold every attended position, the s new
ones last; valid (b, S) marks real (non-padding) positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_decode


def _expand_kv(x, n_rep):
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def attention_mask(valid: torch.Tensor, s: int, window: int | None = None) -> torch.Tensor:
    """(b, 1, s, S) boolean mask: causal among the last s positions, padding keys hidden; with a
    sliding window, a query sees only the last `window` positions (itself included).

    A query may always see itself, so padding rows never become all-masked (NaN)."""
    S = valid.shape[1]
    qpos = torch.arange(S - s, S, device=valid.device)[:, None]
    kpos = torch.arange(S, device=valid.device)[None, :]
    causal = kpos <= qpos
    if window is not None:
        causal &= kpos > qpos - window
    mask = causal[None] & valid[:, None, :]
    mask |= (kpos == qpos)[None]
    return mask[:, None]


def in_window(valid: torch.Tensor, window: int | None) -> torch.Tensor:
    """valid (b, S) of a decode step (one query, the last position) with the keys outside a
    sliding window of `window` positions marked invalid too."""
    if window is None or window >= valid.shape[1]:
        return valid
    out = valid.clone()
    out[:, :valid.shape[1] - window] = False
    return out


def attend(q, k, v, valid, scale, sparsity: float = 1.0, invalid=None, window: int | None = None,
           unpadded: bool = False):
    """invalid (= ~valid) may be passed in when the caller has it, to save a kernel per layer.
    window: sliding-window attention (positions are columns: the left padding is all before the
    real tokens, so column distance is token distance). unpadded: the caller knows every position
    is real, so a GPU prefill runs the mask-free causal kernel (FlashAttention); the CPU keeps the
    masked call, whose float32 results the tests compare with transformers."""
    b, s, heads, d = q.shape
    if s == 1 and window is not None and window < valid.shape[1]:
        valid, invalid = in_window(valid, window), None
    n_rep = heads // k.shape[2]
    if s == 1 and sparsity >= 1.0:
        return _dense_decode(q, k, v, ~valid if invalid is None else invalid, scale)
    qh = q.transpose(1, 2)
    kh = _expand_kv(k.transpose(1, 2), n_rep)
    vh = _expand_kv(v.transpose(1, 2), n_rep)
    if s == 1:
        out = _sparse_decode(qh, kh, vh, valid, scale, sparsity)
    else:
        with _prefill_backends():
            if unpadded and window is None and s == k.shape[1] and q.is_cuda:
                out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
            else:
                out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attention_mask(valid, s, window),
                                                     scale=scale)
    return out.transpose(1, 2)


def _prefill_backends():
    """SDPA without the cuDNN backend: it rebuilds its plan for every new sequence length, which
    costs milliseconds of host time per call."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    except ImportError:  # torch < 2.3
        import contextlib
        return contextlib.nullcontext()


def _dense_decode(q, k, v, invalid, scale):
    """One query per sequence: on a GPU one pass over the cache (triton_decode); else plain batched
    matmuls, with the query heads of a KV group side by side so grouped-query attention needs no
    copy of the cache per head."""
    if triton_decode.usable(q, k, v):
        return triton_decode.attend(q, k, v, invalid, scale, _matmul_decode)
    return _matmul_decode(q, k, v, invalid, scale)


def _matmul_decode(q, k, v, invalid, scale):
    b, _, heads, d = q.shape
    kv_heads = k.shape[2]
    if scale != 1.0:
        q = q * scale
    qg = q.view(b, kv_heads, heads // kv_heads, d)                     # (b, g, rep, d)
    scores = qg @ k.permute(0, 2, 3, 1)                                # (b, g, rep, S)
    scores = scores.masked_fill(invalid[:, None, None, :], float("-inf"))
    # an accelerator's half softmax accumulates in float32 and rounds once, as float32 then a
    # cast does: one kernel fewer per layer there (meta tensors count what a GPU runs)
    probs = (scores.softmax(-1) if scores.device.type != "cpu"
             else scores.softmax(-1, dtype=torch.float32).to(v.dtype))
    out = probs @ v.transpose(1, 2)                                    # (b, g, rep, d)
    return out.reshape(b, 1, heads, d)


def _sparse_decode(qh, kh, vh, valid, scale, sparsity):
    """FlexGen's top-k attention: of the cached positions keep the k highest scores, always keep
    the new token, and softmax over that selection only."""
    S = kh.shape[2]
    scores = (qh @ kh.transpose(-1, -2)).float() * scale                    # (b, h, 1, S)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    topk = max(1, min(S - 1, int(sparsity * S)))
    past_scores, idx = scores[..., : S - 1].topk(topk, dim=-1)
    sel = torch.cat([past_scores, scores[..., S - 1:]], dim=-1).softmax(-1).to(vh.dtype)
    idx = torch.cat([idx, torch.full_like(idx[..., :1], S - 1)], dim=-1)  # (b, h, 1, topk+1)
    picked = vh.gather(2, idx.squeeze(2)[..., None].expand(-1, -1, -1, vh.shape[-1]))
    return sel @ picked
