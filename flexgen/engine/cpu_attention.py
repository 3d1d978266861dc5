"""Decode attention on the CPU, next to a KV cache held in host memory.

The cache is read in blocks of positions in its stored dtype (fp16/bf16, or unpacked from 4-bit
block by block); each block is widened to float32, scored, and folded into a running softmax
(max, sum, weighted values: the log-sum-exp merge), so the extra memory is one block, never a
float32 copy of the whole cache. The new token's key and value come last, at full precision.
Torch's intra-op threads (--cpu-threads) parallelise each block's matmuls.
"""
from __future__ import annotations

import torch

BLOCK = 512


def cpu_decode_attention(q, past_rows, n_past: int, k_new, v_new, invalid, scale: float, block: int = BLOCK):
    """q: (b, 1, heads, d) on the CPU; past_rows(a, b) -> (k, v) rows [a, b) as (n, b, kv_heads, d);
    k_new, v_new: (1, b, kv_heads, d); invalid: (b, n_past + 1) True where a position is padding.
    Returns (b, 1, heads, d) float32."""
    b, _, heads, d = q.shape
    g = k_new.shape[2]
    qg = q.reshape(b, g, heads // g, d).float() * scale                # (b, g, rep, d)
    m = torch.full(qg.shape[:-1], float("-inf"))                        # running max (b, g, rep)
    total = torch.zeros(qg.shape[:-1])                                  # running sum of exp
    acc = torch.zeros(qg.shape)                                         # running weighted values

    def fold(kb, vb, inv):
        nonlocal m, total, acc
        scores = torch.einsum("bgrd,sbgd->bgrs", qg, kb.float())
        scores.masked_fill_(inv[:, None, None, :], float("-inf"))
        m_new = torch.maximum(m, scores.amax(-1))
        # rows with nothing valid yet keep -inf: shift by 0 there so exp() gives 0, not NaN
        shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(scores - shift[..., None])
        corr = torch.exp(m - shift)
        total = total * corr + p.sum(-1)
        acc = acc * corr[..., None] + torch.einsum("bgrs,sbgd->bgrd", p, vb.float())
        m = m_new

    for a in range(0, n_past, block):
        e = min(a + block, n_past)
        kb, vb = past_rows(a, e)
        fold(kb, vb, invalid[:, a:e])
    fold(k_new, v_new, invalid[:, n_past:n_past + 1])
    return (acc / total[..., None]).reshape(b, 1, heads, d)
