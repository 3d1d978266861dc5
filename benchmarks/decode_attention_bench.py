"""Decode attention on the GPU: the Triton kernel (flexgen/engine/triton_decode.py) against the
matmul path it replaces, on the cache layout the CUDA-graph decode reads ((capacity, b, kv, d)
rows, attended through a permute), fp16. Each variant runs 32 times (one call per layer) inside a
CUDA graph, replayed 50 times: microseconds per call, the cache bytes read per call over that time,
and a plain copy of the same bytes for the memory's speed. Largest difference between the two.
--eager: also the host time of one call outside a graph (what an eager decode step would pay:
the engine runs the kernel in CUDA-graph steps only), and how many variants of the kernels a
growing cache compiles.
Usage: PYTHONPATH=. python3 benchmarks/decode_attention_bench.py [--shapes P4 V1 L8 O30] [--eager]"""
import argparse
import time

import torch

from flexgen.engine import triton_decode as TD
from flexgen.engine.attention import _matmul_decode

SHAPES = {  # id: (batch, query heads, kv heads, head dim, positions)
    "P4": (8, 32, 32, 128, 544), "V1": (32, 32, 32, 128, 544), "L8": (8, 32, 8, 128, 544),
    "O30": (64, 56, 56, 128, 544),
}


def timed(fn, layers=32, reps=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(layers):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / (reps * layers)


def host_us(fn, calls=256):
    """Host microseconds per call, queued back to back without waiting (an eager decode step)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return host * 1e6 / calls


def compiled_variants(kernel) -> int:
    return sum(len(c[0]) for c in kernel.device_caches.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--sweep", action="store_true", help="also time the kernel's block, programs and warps")
    ap.add_argument("--eager", action="store_true", help="host time per eager call; variants compiled")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{'id':4} {'b':>3} {'h':>3} {'kv':>3} {'S':>4} {'MB':>7} | {'copy us':>8} {'TB/s':>5} | "
          f"{'matmul us':>9} {'TB/s':>5} | {'triton us':>9} {'TB/s':>5} | {'speed-up':>8} {'max diff':>9}")
    for sid in args.shapes:
        b, h, g, d, S = SHAPES[sid]
        cache = torch.randn(S, b, g, 2 * d, device="cuda", dtype=torch.float16)
        k, v = (cache[:, :, :, i * d:(i + 1) * d].permute(1, 0, 2, 3) for i in (0, 1))
        q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.float16)
        inv = torch.zeros(b, S, dtype=torch.bool, device="cuda")
        inv[:, :S // 8] = True      # some left padding
        scale = d ** -0.5
        dst = torch.empty_like(cache)
        nbytes = cache.numel() * 2
        t_copy = timed(lambda: dst.copy_(cache))
        t_mm = timed(lambda: _matmul_decode(q, k, v, inv, scale))
        t_tr = timed(lambda: TD._launch(q, k, v, inv, scale))
        diff = (TD._launch(q, k, v, inv, scale).float() - _matmul_decode(q, k, v, inv, scale).float()).abs().max()
        # the copy reads and writes: its bandwidth is 2x bytes over time
        print(f"{sid:4} {b:3} {h:3} {g:3} {S:4} {nbytes / 1e6:7.1f} | {t_copy:8.1f} {2 * nbytes / t_copy / 1e6:5.2f} | "
              f"{t_mm:9.1f} {nbytes / t_mm / 1e6:5.2f} | {t_tr:9.1f} {nbytes / t_tr / 1e6:5.2f} | "
              f"{t_mm / t_tr:7.2f}x {diff.item():9.2e}")
        if args.eager:
            op = lambda: TD.decode_attention(q, k, v, inv, scale)  # noqa: E731
            print(f"     eager host us per call: matmul path {host_us(lambda: _matmul_decode(q, k, v, inv, scale)):.1f}, "
                  f"custom op {host_us(op):.1f}, launch alone {host_us(lambda: TD._launch(q, k, v, inv, scale)):.1f}")
            before = compiled_variants(TD._ranges_kernel), compiled_variants(TD._merge_kernel)
            for n in range(S - 64, S + 1, 7):   # a cache growing over 64 positions, as steps do
                TD._launch(q, k[:, :n], v[:, :n], inv[:, :n], scale)
            after = compiled_variants(TD._ranges_kernel), compiled_variants(TD._merge_kernel)
            print(f"     kernel variants compiled (ranges, merge) before/after 10 cache lengths: {before} / {after}")
        if args.sweep:
            best = []
            default = (TD.BLOCK_S, TD._PROGRAMS, TD._WARPS)
            for blk in (32, 64, 128):
                for progs in (528, 1584, 4224):
                    for warps in (4, 8):
                        TD.BLOCK_S, TD._PROGRAMS, TD._WARPS = blk, progs, warps
                        try:
                            best.append((timed(lambda: TD._launch(q, k, v, inv, scale)), blk, progs, warps))
                        except Exception as e:
                            print(f"     block {blk} programs {progs} warps {warps}: {type(e).__name__}")
            TD.BLOCK_S, TD._PROGRAMS, TD._WARPS = default
            for t, blk, progs, warps in sorted(best)[:4]:
                print(f"     block {blk:3} programs {progs:4} warps {warps}: {t:7.1f} us {nbytes / t / 1e6:5.2f} TB/s")


if __name__ == "__main__":
    main()
