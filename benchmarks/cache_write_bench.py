"""The compressed KV cache's write and read paths on the device: the fused write (one quantise call
per layer and GPU batch, K and V together, all segments) against the per-segment writes it
replaced, and unpacking into a buffer with room for the new row against unpack + concatenate.
Checks first that both give identical bytes / tensors, then times the host side of each (the
decode step of N4 is host-bound: 32 layers x 8 GPU batches of these per step).

Usage: PYTHONPATH=. python3 benchmarks/cache_write_bench.py [--device cuda] [--percents 50 50 0]
Success: two "identical: True" lines, then the per-call times (fused < per-segment)."""
import argparse
import tempfile
import time

import torch

from flexgen.engine.kv_cache import LayerCache
from flexgen.env import ExecutionEnv
from flexgen.memory.compression import _compress_reference, decompress
from flexgen.optimizer.op_count import count_compressed_cache_ops, count_compressed_cache_ops_before
from flexgen.policy import CompressionConfig


def _stored(buf, seg, rows):
    out = []
    for part in buf.parts:
        tier, st = part.segments[seg][:2]
        out.append((st.read(0, rows) if tier == "disk" else st[:rows]).cpu())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--percents", type=float, nargs=3, default=[50, 50, 0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--context", type=int, default=528)
    ap.add_argument("--reps", type=int, default=200)
    a = ap.parse_args()
    env = ExecutionEnv.create(tempfile.mkdtemp(), device=a.device)
    dt = env.compute_dtype
    cfg = CompressionConfig(4, 64, 2, False)
    b, h, d, S = a.batch, a.kv_heads, a.head_dim, a.context
    caches = [LayerCache(env, S + 2, b, h, d, dt, a.percents, f"c{i}", False, cfg) for i in range(2)]
    fused, split = caches
    sync = env.synchronize
    g = torch.Generator(device=env.device).manual_seed(0)
    k = torch.randn(b, S, h, d, generator=g, device=env.device, dtype=dt).transpose(0, 1)
    v = torch.randn(b, S, h, d, generator=g, device=env.device, dtype=dt).transpose(0, 1)

    def write_fused(kr, vr, start):
        rows = fused.new_rows(kr, vr)
        fused.write_resident(rows, start)
        fused.store_rest(rows, start)

    def write_split(kr, vr, start):   # the engine before: each segment, K and V apart
        for i, (lo, hi) in enumerate(split.ranges):
            for buf, x in ((split.k, kr), (split.v, vr)):
                buf.write_parts(i, _compress_reference(x[:, :, lo:hi], buf.config).parts(), start,
                                non_blocking=not split.resident[i])

    write_fused(k, v, 0)
    write_split(k, v, 0)
    sync()
    same = all(torch.equal(x, y) for i in range(len(fused.ranges)) for a_, b_ in ((fused.k, split.k), (fused.v, split.v))
               for x, y in zip(_stored(a_, i, S), _stored(b_, i, S)))
    print(f"segments {[t for t in fused.k.tiers]}, stored bytes identical: {same}")
    k1, v1 = k[-1:].contiguous(), v[-1:].contiguous()
    resident = [i for i in range(len(fused.ranges)) if fused.resident[i]]
    ok = True
    for i in resident:
        lo, hi = fused.ranges[i]
        ks, _ = fused.past_and_new(i, S, k1[:, :, lo:hi], v1[:, :, lo:hi])
        ref = torch.cat([decompress(_pk(fused.k, i, S), dt), k1[:, :, lo:hi].to(dt)])
        ok &= torch.equal(ks, ref)
    print(f"attention inputs (resident packed segments {resident}) identical: {ok}")

    def timed(fn):
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(a.reps):
            fn()
        host = (time.perf_counter() - t) / a.reps
        sync()
        return host, (time.perf_counter() - t) / a.reps

    for name, fn in (("fused write", lambda: write_fused(k1, v1, S)), ("per-segment write", lambda: write_split(k1, v1, S))):
        host, total = timed(fn)
        print(f"{name:28} host {host * 1e6:8.1f} us per layer and GPU batch (with the device: {total * 1e6:8.1f} us)")
    for i in resident:
        lo, hi = fused.ranges[i]
        new = lambda: fused.past_and_new(i, S, k1[:, :, lo:hi], v1[:, :, lo:hi])  # noqa: E731
        old = lambda: [torch.cat([decompress(_pk(buf, i, S), dt), x[:, :, lo:hi].to(dt)])  # noqa: E731
                       for buf, x in ((fused.k, k1), (fused.v, v1))]
        for name, fn in (("unpack into room", new), ("unpack + concatenate", old)):
            host, total = timed(fn)
            print(f"{name:28} host {host * 1e6:8.1f} us, with the device {total * 1e6:8.1f} us (segment {i})")
    new_ops, old_ops = count_compressed_cache_ops(h, d, cfg), count_compressed_cache_ops_before(h, d, cfg)
    n = len(fused.ranges)
    print(f"counted operations per layer and GPU batch ({n} segments): fused write "
          f"{new_ops['write'] + n * new_ops['write_segment']}, per-segment {n * old_ops['write_segment']}")
    for c in caches:
        c.close()
    env.close_copy_threads()


def _pk(buf, i, rows):
    from flexgen.memory.compression import Packed
    parts = [p.segments[i][1][:rows] for p in buf.parts]
    return Packed(parts[0], parts[1], parts[2] if len(parts) == 3 else None,
                  (rows,) + tuple(buf._seg_shapes[i][1:]), buf.config)


if __name__ == "__main__":
    main()
