"""Unpacking of group-quantised weights on the GPU (flexgen/memory/triton_dequant.py): G values/s
of each kernel and tile for OPT-30B's weight shapes and a KV cache's rows, against the memory
floor (packed bytes read + fp16 written, at the speed of a plain device copy).
Usage: PYTHONPATH=. python3 benchmarks/dequant_bench.py"""
import torch

from flexgen.memory import triton_dequant as TDQ
from flexgen.memory.compression import _decompress_torch, compress, decompress
from flexgen.policy import CompressionConfig

SHAPES = {"qkvo 7168x7168": (7168, 7168), "fc1 28672x7168": (28672, 7168), "fc2 7168x28672": (7168, 28672),
          "cache rows 16896x7168": (16896, 7168)}
CONFIGS = {"g32 dim1": (32, 1), "g64 dim1": (64, 1), "g64 dim0": (64, 0)}
TILES = [(4, 256), (2, 512), (1, 1024), (4, 512), (8, 256), (2, 256), (1, 512), (2, 1024)]


def timed(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / reps


def main():
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "triton", TDQ.triton.__version__)
    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_bw = src.numel() * 2 / timed(lambda: dst.copy_(src))   # read + write bytes per second
    print(f"device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
    default = dict(TDQ._ROWS)
    rows = []
    for sname, shape in SHAPES.items():
        w = torch.randn(shape, device="cuda", dtype=torch.float16)
        out = torch.empty_like(w)
        for cname, (gs, dim) in CONFIGS.items():
            p = compress(w, CompressionConfig(4, gs, dim, False))
            floor = (p.nbytes + w.numel() * 2) / copy_bw
            want = _decompress_torch(p, torch.float16, shape)
            variants = [("generic", False, None)] + ([("rows", True, t) for t in TILES] if dim == 1 else [])
            for vname, on, tile in variants:
                TDQ._ROWS["on"] = on
                if tile:
                    TDQ._ROWS["block"] = tile
                got = TDQ._launch(p, torch.float16, shape, out)
                ok = torch.equal(got, want)
                sec = timed(lambda: TDQ._launch(p, torch.float16, shape, out))
                rows.append((sname, cname, vname + (f" {tile[0]}x{tile[1]}" if tile else ""), ok,
                             w.numel() / sec / 1e9, floor / sec))
        TDQ._ROWS.update(default)
        # the engine's path end to end (decompress, kernel check included)
        p = compress(w, CompressionConfig(4, 32, 1, False))
        sec = timed(lambda: decompress(p, torch.float16, out=out))
        rows.append((sname, "g32 dim1", "decompress()", True, w.numel() / sec / 1e9,
                     (p.nbytes + w.numel() * 2) / copy_bw / sec))
    print(f"{'shape':24} {'grouping':9} {'kernel':16} {'exact':5} {'G val/s':>8} {'of floor':>8}")
    for s, c, v, ok, rate, frac in rows:
        print(f"{s:24} {c:9} {v:16} {str(ok):5} {rate:8.0f} {frac:8.0%}")


if __name__ == "__main__":
    main()
