"""CPU decode-attention microbenchmark (issue 5): one layer's decode attention over a CPU-held KV
cache, with the engine's kernel (flexgen/engine/cpu_attention.py), by thread count and workers.

Default shape: 64 sequences x 544 positions x OPT-30B's width (56 heads x 128), fp16 cache:
2 x 64 x 544 x 7168 x 2 B = 998 MB read per layer. The floor is those bytes over the machine's
memory bandwidth (measured here with a large copy at all threads, read + write counted).

The store is heads-major (batch, heads, positions, d), as the engine keeps a CPU-attention cache,
unless --layout positions (rows as read from disk: the kernel copies each chunk of matrices out).
--compress packs it 4-bit (group 64 along the head dim) in the same layout, and --kernels picks
how it is read (cpu_attention.packed_chunks): 'auto' (the engine's choice: the native C kernel of
flexgen/engine/cpu_packed.py where it builds, else 'torch'), 'native', 'torch' (scale and min
folded into the products, PyTorch ops on cache-sized tiles), 'unpack' (each chunk dequantised into
float32, then multiplied: the kernel before the folded products, and their reference). Each row
stands beside a plain copy (torch copy_ into allocated tensors) of the same stored bytes at the
same thread count ('copy GiB/s', 'x copy time'): a kernel that reads the packed bytes once is
memory-bound when its time is about that copy's (a copy also writes them, so a read-only pass
can go below 1.0x). 'rel err': against float64 attention over the dequantised values (the folded
products: ~1e-6; unpack: ~4e-7). Workers: 'threads' = one Python thread per torch thread (each
running torch single-threaded), 1 = chunks in turn over torch's threads, 'auto' = the kernel's
choice (the probe; native packed chunks: one thread per torch thread).

Usage: PYTHONPATH=. python3 benchmarks/cpu_attention_bench.py [--seqs 64] [--ctx 544] [--heads 56]
       [--kv-heads 56] [--head-dim 128] [--threads 1,2,4,8,16] [--workers threads,1,auto]
       [--chunk-mb 16] [--compress] [--layout heads|positions] [--dtype float16|bfloat16]
       [--spare 16] [--written-only] [--kernels auto,torch,unpack]
"""
import argparse
import os
import time

import torch

from flexgen.engine import cpu_attention, cpu_packed
from flexgen.engine.cpu_attention import cpu_decode_attention, packed_chunks, row_chunks
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
    ap.add_argument("--chunk-mb", default="16", help="comma list: the kernel's chunk bound, MB of fp16 per K")
    ap.add_argument("--blocks", help=argparse.SUPPRESS)   # older scripts' option: there are no blocks any more
    ap.add_argument("--compress", action="store_true", help="4-bit cache, group 64 on the head dim")
    ap.add_argument("--kernels", default="auto,torch,unpack",
                    help="with --compress, comma list of: auto, native, torch, unpack (see above)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workers", default="threads",
                    help="comma list of: 'threads' (a pool of one Python thread per torch thread), a number "
                         "(that many Python threads; 1: torch's own GEMM parallelism), 'auto' (the probe)")
    ap.add_argument("--spare", type=int, default=16,
                    help="unwritten rows after --ctx in a heads-major store (decode is mid-way through)")
    ap.add_argument("--written-only", action="store_true",
                    help="pass views of only the written rows (unevenly strided matrices)")
    ap.add_argument("--layout", choices=["heads", "positions"], default="heads")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    a = ap.parse_args()
    b, s, h, d = a.seqs, a.ctx, a.heads, a.head_dim
    g = a.kv_heads or h
    cores = os.cpu_count()
    threads = [t for t in (int(x) for x in a.threads.split(",")) if t <= cores]
    torch.manual_seed(0)
    dt = getattr(torch, a.dtype)
    spare = a.spare if a.layout == "heads" and not a.compress else 0
    if a.layout == "heads":   # (b, g, s + spare, d) in memory, seen as (s + spare, b, g, d)
        store_k = (torch.randn(b, g, s + spare, d) * 0.5).to(dt).movedim(2, 0)
        store_v = torch.randn(b, g, s + spare, d).to(dt).movedim(2, 0)
        k, v = store_k[:s], store_v[:s]
    else:
        k = (torch.randn(s, b, g, d) * 0.5).to(dt)
        v = torch.randn(s, b, g, d).to(dt)
    q = torch.randn(b, 1, h, d)
    k_new, v_new = torch.randn(1, b, g, d), torch.randn(1, b, g, d)
    invalid = torch.zeros(b, s + 1, dtype=torch.bool)
    scale = d ** -0.5
    kernels = [None]
    if a.compress:   # packed in the store's layout: heads-major parts are (b, g, s, groups, ...) seen as (s, ...)
        cfg = CompressionConfig(num_bits=4, group_size=64, group_dim=-1)
        hm = a.layout == "heads"
        kp, vp = (compress(x.movedim(0, 2).contiguous() if hm else x, cfg) for x in (k, v))
        stored = kp.nbytes + vp.nbytes
        k, v = (decompress(p, torch.float32).movedim(2, 0) if hm else decompress(p, torch.float32) for p in (kp, vp))
        parts = [[t.movedim(2, 0) if hm else t for t in p.parts()] for p in (kp, vp)]
        kernels = []
        for name in a.kernels.split(","):
            try:
                kernels.append((name, packed_chunks(parts[0], parts[1], cfg, d, kernel=name)))
            except ValueError as e:
                print(f"kernel {name}: {e}")
        if not kernels:
            raise SystemExit("no usable kernel")
        if cpu_packed.unavailable():
            print(f"native kernel not used: {cpu_packed.unavailable()}")
    else:
        stored = 2 * k.numel() * k.element_size()
        # as the engine does: views over the store's whole capacity, the rows past s masked (a view
        # of only the written rows is what --written-only measures: torch's slow strided GEMM path)
        kernels = [(a.dtype, row_chunks(k, v) if a.written_only or not spare else row_chunks(store_k, store_v))]
    # a plain copy of the same bytes: the stored tensors themselves
    stores = (kp.parts() + vp.parts()) if a.compress else ([store_k, store_v] if a.layout == "heads" else [k, v])

    # reference in float64 on the whole cache
    ref_k = torch.cat([k.double(), k_new.double()])
    ref_v = torch.cat([v.double(), v_new.double()])
    qg = q.double().reshape(b, g, h // g, d) * scale
    p = torch.softmax(torch.einsum("bgrd,sbgd->bgrs", qg, ref_k), -1)
    ref = torch.einsum("bgrs,sbgd->bgrd", p, ref_v).reshape(b, 1, h, d)
    del ref_k, ref_v, p

    torch.set_num_threads(max(threads))
    bw = copy_bandwidth()
    print(f"cache: {b} seqs x {s} positions x {g} kv heads x {d}, {stored / 1e6:.0f} MB stored per layer"
          f" ({'4-bit' if a.compress else a.dtype}, {a.layout}-major); memory bandwidth (copy, {max(threads)} threads): "
          f"{bw:.1f} GiB/s -> floor {stored / (bw * GiB) * 1e3:.2f} ms/layer")
    table = []
    copy_s = {}
    dsts = [torch.empty_like(x) for x in stores]   # allocated once: fresh pages would time page faults
    for t in threads:
        torch.set_num_threads(t)
        copy_s[t] = timed(lambda: [y.copy_(x) for x, y in zip(stores, dsts)], a.reps)
    for mb in (float(x) for x in a.chunk_mb.split(",")):
        cpu_attention.CHUNK_ELEMS = int(mb * 1e6 / 2)
        for kname, past in kernels:
            for wk in a.workers.split(","):
                for t in threads:
                    torch.set_num_threads(t)
                    w = t if wk == "threads" else None if wk == "auto" else int(wk)
                    run = lambda: cpu_decode_attention(q, past, s, k_new, v_new, invalid, scale, workers=w)  # noqa
                    err = ((run().double() - ref).norm() / ref.norm()).item()
                    sec = timed(run, a.reps)
                    if w is None:
                        w = t if getattr(past, "one_core", False) else cpu_attention.auto_workers(t)
                    table.append((mb, kname, wk, w, t, sec, stored / sec / GiB, err))
    print(f"\ncopy of the same {stored / 1e6:.0f} MB (torch copy_ into allocated tensors): " +
          ", ".join(f"{t} threads {copy_s[t] * 1e3:.2f} ms = {stored / copy_s[t] / GiB:.2f} GiB/s" for t in threads))
    print(f"\n{'chunk MB':>8} {'kernel':>7} {'workers':>13} {'threads':>7} {'ms/layer':>9} {'GiB/s':>7} "
          f"{'copy GiB/s':>10} {'x copy time':>11} {'% of copy bw':>12} {'Gval/s':>7} {'rel err':>9}")
    for mb, kname, wk, w, t, sec, gibs, err in table:
        label = f"{w} ({wk})" if wk in ("auto", "threads") else str(w)
        print(f"{mb:8g} {kname:>7} {label:>13} {t:7d} {sec * 1e3:9.2f} {gibs:7.2f} {stored / copy_s[t] / GiB:10.2f} "
              f"{sec / copy_s[t]:11.2f} {100 * gibs / bw:11.1f}% {2 * b * g * s * d / sec / 1e9:7.2f} {err:9.1e}")


if __name__ == "__main__":
    main()
