"""Perplexity of a model over a text file, with any policy (offloading, compression):

    python3 -m flexgen.apps.perplexity --model smollm2-135m --text FILE [--compress-weight ...]

The text is cut into windows of --window tokens that overlap by half: the first half of each
window is the context (prefilled) and the second half is fed token by token through the decode
path (teacher forcing), so a compressed or offloaded KV cache counts exactly as in generation.
Every token after the first is scored once. Prints `perplexity: X`.
"""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from ..cli import add_arguments, main_errors, open_model


def perplexity(lm, ids: list[int], window: int) -> tuple[float, int]:
    """(perplexity, scored tokens) of a token sequence."""
    window = min(window, lm.info.max_seq_len, len(ids))
    half = max(1, window // 2)
    if len(ids) < 2:
        raise ValueError("the text must have at least two tokens")
    total, count = 0.0, 0
    first = np.array([ids[:half]])
    if half > 1:  # the first context's own tokens, scored by the prefill
        total += float(lm.score(first, attention_mask=np.ones_like(first, bool))[0, 1:].sum())
        count += half - 1
    starts = list(range(0, len(ids) - half, half))
    full = [s for s in starts if s + 2 * half <= len(ids)]
    groups = [full] + [[s] for s in starts if s not in full]
    for group in groups:
        if not group:
            continue
        ctx = np.array([ids[s:s + half] for s in group])
        cont = np.array([ids[s + half:s + 2 * half] for s in group])
        lp = lm.score_continuation(ctx, cont, attention_mask=np.ones_like(ctx, bool))
        total += float(lp.sum())
        count += lp.size
    return math.exp(-total / count), count


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m flexgen.apps.perplexity")
    add_arguments(parser, "smollm2-135m", None)
    parser.add_argument("--text", required=True, help="a UTF-8 text file")
    parser.add_argument("--window", type=int, default=512, help="tokens per window (context + scored half)")
    args = parser.parse_args(argv)

    def run():
        try:
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"cannot read --text {args.text}: {e.strerror}") from None
        lm, env = open_model(args, need_tokenizer=True)
        try:
            value, n = perplexity(lm, lm.tokenizer.encode(text), args.window)
            print(f"tokens scored: {n}")
            print(f"perplexity: {value:.4f}")
        finally:
            lm.close()
            env.close_copy_threads()

    main_errors(run, extra=(ValueError,))


if __name__ == "__main__":
    main(sys.argv[1:])
