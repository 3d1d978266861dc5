"""The attention core, on whichever device its inputs are: dense (SDPA) or top-k sparse decode.

Shapes: q (b, s, heads, d); k, v (b, S, kv_heads, d) hold every attended position, the s new
ones last; valid (b, S) marks real (non-padding) positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand_kv(x, n_rep):
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def attention_mask(valid: torch.Tensor, s: int) -> torch.Tensor:
    """(b, 1, s, S) boolean mask: causal among the last s positions, padding keys hidden.

    A query may always see itself, so padding rows never become all-masked (NaN)."""
    S = valid.shape[1]
    qpos = torch.arange(S - s, S, device=valid.device)[:, None]
    kpos = torch.arange(S, device=valid.device)[None, :]
    mask = (kpos <= qpos)[None] & valid[:, None, :]
    mask |= (kpos == qpos)[None]
    return mask[:, None]


def attend(q, k, v, valid, scale, sparsity: float = 1.0):
    b, s, heads, d = q.shape
    n_rep = heads // k.shape[2]
    qh = q.transpose(1, 2)
    kh = _expand_kv(k.transpose(1, 2), n_rep)
    vh = _expand_kv(v.transpose(1, 2), n_rep)
    if s == 1 and sparsity < 1.0:
        out = _sparse_decode(qh, kh, vh, valid, scale, sparsity)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attention_mask(valid, s), scale=scale)
    return out.transpose(1, 2)


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
