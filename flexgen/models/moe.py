"""Mixture-of-experts math shared by any routed family: top-k routing and expert compute grouped
by expert.

The tokens of a whole GPU batch are sorted by the expert they were routed to, so each expert that
any token chose runs once, as one matmul over all of its tokens (no loop over tokens), and the
weighted results are added back into the tokens' rows in one index_add_.
"""
from __future__ import annotations

import torch


def route_top_k(router_logits: torch.Tensor, top_k: int, renormalize: bool = True):
    """(experts, weights), each (tokens, top_k): the top-k experts of each token and their
    softmax probabilities (float32), renormalised over the k chosen (Mixtral)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return experts, weights


def routed_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, expert_fn, num_experts: int):
    """sum_j weights[t, j] * expert_fn(experts[t, j], x[t]) for every token t of x (tokens, hidden).

    expert_fn(e, xs) runs expert e on the rows xs (n, hidden). The sum for a token runs over its
    experts in ascending expert order, as transformers' loop over experts adds them."""
    tokens, k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)           # routed slots grouped by expert
    counts = torch.bincount(flat, minlength=num_experts).tolist()   # the one host sync per layer
    rows = order // k                                  # the token of each slot
    xs = x.index_select(0, rows)
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n:
            ys[start:start + n] = expert_fn(e, xs[start:start + n])
            start += n
    del xs
    # in place (prefill blocks are large); exactly transformers' product in float32, and within
    # one rounding of it in fp16, where it multiplies by the float32 weight and then rounds
    ys.mul_(weights.reshape(-1).index_select(0, order).to(ys.dtype)[:, None])
    return torch.zeros_like(x).index_add_(0, rows, ys)
