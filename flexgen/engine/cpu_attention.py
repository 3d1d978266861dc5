"""Decode attention on the CPU, next to a KV cache held in host memory.

With CPU attention on, the CPU part of the cache is stored heads-major (batch, kv_heads, positions,
d; see kv_cache.py), so for every (sequence, kv head) the past keys and values are one contiguous
(positions, d) matrix. Decode attention is then two batched matrix products over those matrices,
read in place in the stored dtype (torch's CPU GEMMs use the cores' fp16/bf16 units where they
exist): scores = q K^T, then softmax, then p V. Nothing of the size of the cache is copied.

Rows that arrive in another layout (read from disk, or unpacked from 4-bit) go in blocks of
positions, each block rearranged and folded into a running softmax (max, sum, weighted values:
the log-sum-exp merge), so the extra memory is one block. The new token's key and value come
last, at full precision. Torch's intra-op threads (--cpu-threads) parallelise each product.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

BLOCK = 512
MATMUL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def cpu_decode_attention(q, past_rows, n_past: int, k_new, v_new, invalid, scale: float, block: int = BLOCK,
                         workers: int | None = None):
    """q: (b, 1, heads, d) on the CPU; past_rows(a, b) -> (k, v) rows [a, b) as (n, b, kv_heads, d);
    k_new, v_new: (1, b, kv_heads, d); invalid: (b, n_past + 1) True where a position is padding.
    workers: the (sequence, kv head) matrices are split into this many chunks computed by as many
    threads (torch's CPU GEMMs in fp16 are single-threaded on many CPUs); default: torch's thread
    count. Returns (b, 1, heads, d) float32."""
    b, _, heads, d = q.shape
    g = k_new.shape[2]
    rep = heads // g
    workers = max(1, min(workers or torch.get_num_threads(), b * g))
    first = past_rows(0, min(block, n_past)) if n_past else None
    if first is not None and _heads_major(first[0]):
        blocks = [(0, n_past, past_rows(0, n_past))]   # views of the store: the whole past at once
    else:
        blocks = [(a, min(a + block, n_past), None) for a in range(0, n_past, block)]
        if blocks:
            blocks[0] = (0, blocks[0][1], first)
    qm = q.reshape(b * g, rep, d).float() * scale
    new = (_matrices(k_new.float()), _matrices(v_new.float()))
    inv = invalid.repeat_interleave(g, dim=0)          # per (sequence, kv head) matrix
    bounds = [(i * b * g // workers, (i + 1) * b * g // workers) for i in range(workers)]

    def chunk(lo, hi):
        state = _Softmax(qm[lo:hi], inv[lo:hi])
        for a, e, rows in blocks:
            kb, vb = rows if rows is not None else past_rows(a, e)
            state.fold(_matrices(kb)[lo:hi], _matrices(vb)[lo:hi], a, e)
        state.fold(new[0][lo:hi], new[1][lo:hi], n_past, n_past + 1)
        return state.result()

    if workers == 1 or len(blocks) > 1:   # blocks read in turn (disk rows, unpacked 4-bit): one thread
        out = chunk(0, b * g)
    else:
        out = torch.cat(list(_pool(workers).map(lambda r: chunk(*r), bounds)))
    return out.reshape(b, 1, heads, d)


_POOLS = {}


def _pool(n: int) -> ThreadPoolExecutor:
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="flexgen-cpu-attn")
    return _POOLS[n]


def _heads_major(rows) -> bool:
    """(n, b, g, d) rows whose memory is (b, g, n, d): each head's positions one contiguous matrix."""
    return rows.stride(3) == 1 and rows.stride(0) == rows.shape[3] and rows.stride(1) == rows.shape[2] * rows.stride(2)


def _matrices(rows):
    """(n, b, g, d) -> (b * g, n, d): a view for heads-major rows, else one copy."""
    n, b, g, d = rows.shape
    m = rows.permute(1, 2, 0, 3)
    if rows.dtype not in MATMUL_DTYPES:
        m = m.float()
    return m.reshape(b * g, n, d)


class _Softmax:
    """A running softmax over blocks of positions for every (sequence x kv head, query head)."""

    def __init__(self, q, invalid):
        self.q, self.invalid = q, invalid          # q: (m, rep, d) float32; invalid: (m, n_past + 1)
        self.m = torch.full(q.shape[:-1], float("-inf"))                # running max (m, rep)
        self.total = torch.zeros(q.shape[:-1])                          # running sum of exp
        self.acc = torch.zeros(q.shape)                                 # running weighted values
        self._q_as = {torch.float32: q}

    def fold(self, k, v, a, e):
        """k, v: (m, e - a, d) in one dtype, positions [a, e)."""
        q = self._q_as.get(k.dtype)
        if q is None:
            q = self._q_as[k.dtype] = self.q.to(k.dtype)
        scores = torch.bmm(q, k.transpose(1, 2)).float()                # (m, rep, n)
        scores.masked_fill_(self.invalid[:, None, a:e], float("-inf"))
        m_new = torch.maximum(self.m, scores.amax(-1))
        # rows with nothing valid yet keep -inf: shift by 0 there so exp() gives 0, not NaN
        shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(scores - shift[..., None])
        corr = torch.exp(self.m - shift)
        self.total = self.total * corr + p.sum(-1)
        self.acc = self.acc * corr[..., None] + torch.bmm(p.to(v.dtype), v).float()
        self.m = m_new

    def result(self):
        return self.acc / self.total[..., None]
