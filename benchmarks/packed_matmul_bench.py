"""F.linear over 4-bit packed weights on the GPU (flexgen/memory/packed_matmul.py) against
unpack + cuBLAS and against fp16 cuBLAS, for OPT-30B's matrices at decode batch sizes; the floor
is the packed bytes (data, scale, minimum) read at the speed of a plain device copy's reads.
Usage: PYTHONPATH=. python3 benchmarks/packed_matmul_bench.py [--tiles]"""
import argparse

import torch
import torch.nn.functional as F

from dequant_bench import timed   # this folder: the script's own directory is on sys.path
from flexgen.memory import packed_matmul as PM
from flexgen.memory.compression import compress, decompress
from flexgen.policy import CompressionConfig

SHAPES = {"qkv": (21504, 7168), "o": (7168, 7168), "fc1": (28672, 7168), "fc2": (7168, 28672)}
ROWS = (8, 16, 32, 64)
# (weight rows, packed bytes per step, num_warps, w first in tl.dot)
TILES = [(64, 64, 4, True), (64, 128, 4, True), (64, 128, 4, False), (32, 128, 4, True), (32, 256, 4, True), (64, 256, 4, True),
         (128, 128, 4, True), (128, 64, 4, True), (128, 128, 8, True), (16, 256, 4, True),
         (32, 64, 2, True), (64, 256, 8, False), (64, 64, 8, True), (128, 64, 8, True)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", action="store_true", help="time every tile of TILES, not only the default")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "triton", PM.triton.__version__)
    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    read_bw = src.numel() / timed(lambda: dst.copy_(src)) * 2 / 2   # bytes read per second (half the traffic)
    print(f"device copy: {read_bw / 1e9:.0f} GB/s read (+ as much written)")
    default = dict(PM._TILE)
    tiles = TILES if args.tiles else [tuple(default.values())]
    rows = []
    totals = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        p = compress(w, CompressionConfig(4, 64, 1, False))
        wq = decompress(p, torch.float16)
        floor = p.nbytes / read_bw
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            want = F.linear(x.float(), wq.float())
            t_fp16 = timed(lambda: F.linear(x, wq))
            t_unpack = timed(lambda: F.linear(x, decompress(p, torch.float16)))
            for tile in (tiles if m in (16, 32) else tiles[:1]):
                PM._TILE.update(zip(("block_n", "block_b", "warps", "w_first"), tile))
                got = PM._fused(x, p, None)
                err = ((got.float() - want).abs().max() / want.abs().max()).item()
                t = timed(lambda: PM._fused(x, p, None))
                rows.append((name, m, tile, err, t, t_unpack, t_fp16, floor))
                if tile == tiles[0]:
                    tot = totals.setdefault(m, [0.0, 0.0, 0.0, 0.0])
                    for i, v in enumerate((t, t_unpack, t_fp16, floor)):
                        tot[i] += v
            PM._TILE.update(default)
    print(f"{'matrix':6} {'rows':>4} {'tile':22} {'rel err':>8} {'packed us':>9} {'unpack+mm':>9} "
          f"{'fp16 mm':>8} {'floor us':>8} {'of floor':>8}")
    for name, m, tile, err, t, tu, tf, fl in rows:
        print(f"{name:6} {m:4} {str(tile):22} {err:8.1e} {t * 1e6:9.1f} {tu * 1e6:9.1f} {tf * 1e6:8.1f} "
              f"{fl * 1e6:8.1f} {fl / t:8.0%}")
    print("one OPT-30B layer (qkv + o + fc1 + fc2), default tile, x 48 layers = one decode step's matmuls:")
    for m, (t, tu, tf, fl) in totals.items():
        print(f"  rows {m:3}: packed {t * 48e3:6.1f} ms, unpack + matmul {tu * 48e3:6.1f} ms, "
              f"fp16 {tf * 48e3:6.1f} ms, floor {fl * 48e3:5.1f} ms ({fl / t:.0%} of floor)")


if __name__ == "__main__":
    main()
