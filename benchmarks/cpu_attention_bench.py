"""CPU decode-attention microbenchmark (issue 5): one layer's decode attention over a CPU-held KV
cache, with the engine's kernel (flexgen/engine/cpu_attention.py), by thread count and block size.

Default shape: 64 sequences x 544 positions x OPT-30B's width (56 heads x 128), fp16 cache:
2 x 64 x 544 x 7168 x 2 B = 998 MB read per layer. The floor is those bytes over the machine's
memory bandwidth (measured here with a large copy at all threads, read + write counted).

The store is heads-major (batch, heads, positions, d), as the engine keeps a CPU-attention cache,
unless --layout positions (rows as read from disk: the kernel rearranges them block by block).

Usage: PYTHONPATH=. python3 benchmarks/cpu_attention_bench.py [--seqs 64] [--ctx 544] [--heads 56]
       [--kv-heads 56] [--head-dim 128] [--threads 1,2,4,8,16] [--blocks 64,512] [--compress]
       [--layout heads|positions] [--dtype float16|bfloat16]
"""
import argparse
import os
import time

import torch

from flexgen.engine.cpu_attention import cpu_decode_attention
from flexgen.memory.compression import compress, decompress
from flexgen.policy import CompressionConfig

GiB = 1 << 30


def timed(fn, reps=5):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth(nbytes=1 << 30):
    """Host memory bandwidth of a large copy, bytes read + written, in GiB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), 3) / GiB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=544)
    ap.add_argument("--heads", type=int, default=56)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--threads", default="1,2,4,8,16")
    ap.add_argument("--blocks", default="512")
    ap.add_argument("--compress", action="store_true", help="4-bit cache, group 64 on the head dim")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workers", default="threads",
                    help="comma list: 'threads' (the kernel's default: one chunk per thread) and/or '1' "
                         "(one chunk, torch's own GEMM parallelism)")
    ap.add_argument("--layout", choices=["heads", "positions"], default="heads")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    a = ap.parse_args()
    b, s, h, d = a.seqs, a.ctx, a.heads, a.head_dim
    g = a.kv_heads or h
    cores = os.cpu_count()
    threads = [t for t in (int(x) for x in a.threads.split(",")) if t <= cores]
    torch.manual_seed(0)
    dt = getattr(torch, a.dtype)
    if a.layout == "heads":   # (b, g, s, d) in memory, seen as (s, b, g, d)
        k = (torch.randn(b, g, s, d) * 0.5).to(dt).movedim(2, 0)
        v = torch.randn(b, g, s, d).to(dt).movedim(2, 0)
    else:
        k = (torch.randn(s, b, g, d) * 0.5).to(dt)
        v = torch.randn(s, b, g, d).to(dt)
    q = torch.randn(b, 1, h, d)
    k_new, v_new = torch.randn(1, b, g, d), torch.randn(1, b, g, d)
    invalid = torch.zeros(b, s + 1, dtype=torch.bool)
    scale = d ** -0.5
    if a.compress:
        cfg = CompressionConfig(num_bits=4, group_size=64, group_dim=3)
        kp, vp = compress(k.contiguous(), cfg), compress(v.contiguous(), cfg)
        stored = kp.nbytes + vp.nbytes

        def rows(lo, hi):  # unpack only the block's rows, as the engine does
            return tuple(decompress(p.with_parts([t[lo:hi] for t in p.parts()]), torch.float16,
                                    (hi - lo,) + p.shape[1:]) for p in (kp, vp))
    else:
        stored = 2 * k.numel() * k.element_size()

        def rows(lo, hi):
            return k[lo:hi], v[lo:hi]

    # reference in float64 on the whole cache
    ref_k = torch.cat([k.double() if not a.compress else rows(0, s)[0].double(), k_new.double()])
    ref_v = torch.cat([v.double() if not a.compress else rows(0, s)[1].double(), v_new.double()])
    qg = q.double().reshape(b, g, h // g, d) * scale
    p = torch.softmax(torch.einsum("bgrd,sbgd->bgrs", qg, ref_k), -1)
    ref = torch.einsum("bgrs,sbgd->bgrd", p, ref_v).reshape(b, 1, h, d)

    torch.set_num_threads(max(threads))
    bw = copy_bandwidth()
    print(f"cache: {b} seqs x {s} positions x {g} kv heads x {d}, {stored / 1e6:.0f} MB stored per layer"
          f" ({'4-bit' if a.compress else a.dtype}, {a.layout}-major); memory bandwidth (copy, {max(threads)} threads): "
          f"{bw:.1f} GiB/s -> floor {stored / (bw * GiB) * 1e3:.2f} ms/layer")
    table = []
    for blk in (int(x) for x in a.blocks.split(",")):
        for wk in a.workers.split(","):
            for t in threads:
                torch.set_num_threads(t)
                w = t if wk == "threads" else int(wk)
                run = lambda: cpu_decode_attention(q, rows, s, k_new, v_new, invalid, scale, block=blk,  # noqa
                                                   workers=w)
                err = ((run().double() - ref).norm() / ref.norm()).item()
                sec = timed(run, a.reps)
                table.append((blk, w, t, sec, stored / sec / GiB, err))
    print(f"\n{'block':>6} {'workers':>7} {'threads':>7} {'ms/layer':>9} {'GiB/s':>7} {'% of copy bw':>12} "
          f"{'rel err':>9}")
    for blk, w, t, sec, gibs, err in table:
        print(f"{blk:6d} {w:7d} {t:7d} {sec * 1e3:9.2f} {gibs:7.2f} {100 * gibs / bw:11.1f}% {err:9.1e}")


if __name__ == "__main__":
    main()
