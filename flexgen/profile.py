"""Measure this machine for the performance model and save the figures as JSON.

    python3 -m flexgen.profile [--out PATH] [--offload-dir DIR] [--quick]

What is measured (every rate is what the cost model in flexgen/optimizer/cost_model.py reads):
- gpu (CUDA only, else null): host<->device copy bandwidth, pinned and pageable; device memory
  bandwidth (a device-to-device copy); fp16 matmul rate at a few shapes (a decode-like skinny one,
  a prefill-like square one); the dequantisation rate of flexgen.memory.compression on the GPU.
- cpu: matmul (fp32) and decode-attention rates by thread count (1, 2, 4, ... up to the cores,
  capped at 32), over an fp16 cache (read by one and by four query heads per KV head) and over the
  same cache packed 4-bit; memory bandwidth (a copy), dequantisation rate.
- host cost per operation (`host_op_s`, on the GPU and on the CPU): decode steps of tiny models
  through the engine over their counted aten operations (absent in older profiles: the cost model
  then uses its reference figure).
- disk: read and write bandwidth of a temporary file in the offload directory, bypassing the page
  cache (O_DIRECT where the OS allows it, else fsync + posix_fadvise(DONTNEED) before reading).

The result goes to a per-machine cache, ~/.cache/flexgen/profile-<hostname>.json by default
(FLEXGEN_PROFILE overrides the path, and so does --out). The whole run takes well under two
minutes; --quick (smaller sizes, fewer repeats) well under twenty seconds.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import sys
import tempfile
import time

GiB = 1 << 30
MAX_THREADS = 32


def default_profile_path() -> str:
    env = os.environ.get("FLEXGEN_PROFILE")
    if env:
        return os.path.expanduser(env)
    return os.path.join(os.path.expanduser("~/.cache/flexgen"), f"profile-{socket.gethostname()}.json")


def load_profile(path: str | None = None) -> dict | None:
    """The saved profile at path (default: this machine's cache), or None if there is none."""
    path = os.path.expanduser(path) if path else default_profile_path()
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def machine_fingerprint() -> dict:
    """What makes a profile this machine's: GPU model and memory, CPU model, usable cores, memory."""
    import torch
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "mem_bytes": props.total_memory}
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"gpu": gpu, "cpu": cpu, "cores": cores, "mem_bytes": mem}


def foreign_differences(prof: dict, here: dict | None = None) -> list[str]:
    """How a saved profile's machine differs from this one ([] = same machine). Memory is
    compared loosely: some VMs report more memory as it is touched."""
    here = here or machine_fingerprint()
    there = prof.get("machine") or {"gpu": prof.get("gpu") and {"name": prof["gpu"].get("name"),
                                                                 "mem_bytes": prof["gpu"].get("mem_bytes")},
                                    "cpu": None, "cores": (prof.get("cpu") or {}).get("cores"), "mem_bytes": None}
    out = []
    g0, g1 = there.get("gpu"), here["gpu"]
    if bool(g0) != bool(g1) or (g0 and g1 and g0.get("name") != g1["name"]):
        out.append(f"GPU {g0['name'] if g0 else 'none'} there, {g1['name'] if g1 else 'none'} here")
    elif g0 and g1 and abs((g0.get("mem_bytes") or 0) - g1["mem_bytes"]) > 0.02 * g1["mem_bytes"]:
        out.append(f"GPU memory {g0['mem_bytes'] / GiB:.0f} GiB there, {g1['mem_bytes'] / GiB:.0f} GiB here")
    if there.get("cpu") and here["cpu"] and there["cpu"] != here["cpu"]:
        out.append(f"CPU {there['cpu']} there, {here['cpu']} here")
    if there.get("cores") and there["cores"] != here["cores"]:
        out.append(f"{there['cores']} cores there, {here['cores']} here")
    if there.get("mem_bytes") and not 0.5 < there["mem_bytes"] / here["mem_bytes"] < 2:
        out.append(f"{there['mem_bytes'] / GiB:.0f} GiB of memory there, {here['mem_bytes'] / GiB:.0f} GiB here")
    return out


def this_machines_profile() -> dict | None:
    """The cached profile when it was measured on this machine, else None (nothing is measured)."""
    prof = load_profile()
    return prof if prof is not None and not foreign_differences(prof) else None


def profile_for_run(offload_dir: str | None = None, log=print) -> dict:
    """This machine's profile for a prediction or --percent auto: the cached one when it was
    measured here; otherwise this machine is measured now (and cached), and one line says so."""
    path = default_profile_path()
    prof = load_profile(path)
    why = "no profile of this machine"
    if prof is not None:
        diff = foreign_differences(prof)
        if not diff:
            return prof
        why = f"the cached profile {path} is another machine's ({'; '.join(diff)})"
    import torch
    prof = run_profile(offload_dir, quick=not torch.cuda.is_available())
    save_profile(prof, path)
    log(f"{why}: measured this machine in {prof['seconds']:.1f} s (saved to {path})")
    return prof


def _timeit(fn, reps: int, sync=None, budget_s: float = 2.0) -> float:
    """Best time of fn() over up to `reps` repeats (after one warm-up), stopping after budget_s."""
    fn()
    if sync:
        sync()
    best = float("inf")
    start = time.perf_counter()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return best


def thread_counts(cores: int) -> list[int]:
    cap = min(cores, MAX_THREADS)
    out, t = [], 1
    while t < cap:
        out.append(t)
        t *= 2
    out.append(cap)
    return out


# ---------------------------------------------------------------------------------------- CPU
def profile_cpu(quick: bool) -> dict:
    import torch
    from .engine.cpu_attention import cpu_decode_attention, packed_chunks, row_chunks
    from .memory.compression import compress, decompress
    from .policy import CompressionConfig

    cores = os.cpu_count() or 1
    threads = thread_counts(cores)
    old = torch.get_num_threads()
    n = 512 if quick else 1024
    reps = 3 if quick else 5
    budget = 0.6 if quick else 2.0
    a, b = torch.randn(n, n), torch.randn(n, n)
    # decode attention as the engine runs it next to a CPU cache: the fp16 cache of a GPU run,
    # stored heads-major, read in place by flexgen/engine/cpu_attention.py (workers: its probed choice)
    bsz, heads, d, S = (4, 16, 64, 512) if quick else (8, 32, 128, 1024)
    q = torch.randn(bsz, 1, heads, d)
    kc = torch.randn(bsz, heads, S, d).half().movedim(2, 0)
    vc = torch.randn(bsz, heads, S, d).half().movedim(2, 0)
    invalid = torch.zeros(bsz, S, dtype=torch.bool)
    cache_bytes = 2 * kc.numel() * kc.element_size()
    past = row_chunks(kc, vc)   # as the engine passes it: the store's whole capacity, the last row unwritten

    def attention(over=past, query=q):
        cpu_decode_attention(query, over, S - 1, kc[S - 1:], vc[S - 1:], invalid, d ** -0.5)
    # the same cache read by 4 query heads per KV head (grouped-query attention, LLaMA-3's ratio)
    q4 = torch.randn(bsz, 1, 4 * heads, d)
    # the same cache packed 4-bit as --compress-cache stores it (groups along the head dim), read
    # by the kernel the engine picks on this machine (packed_chunks' default: the native folded
    # kernel where it builds, else its PyTorch version), cut to the written rows as the engine does
    ccfg = CompressionConfig(num_bits=4, group_size=64, group_dim=3)
    kp, vp = ([t.movedim(2, 0)[:S - 1] for t in compress(x.movedim(0, 2).contiguous(), ccfg).parts()]
              for x in (kc, vc))
    packed_past = packed_chunks(kp, vp, ccfg, d)
    w = torch.randn(1024, 1024 if quick else 4096)
    packed = compress(w, CompressionConfig(num_bits=4, group_size=64, group_dim=0))
    out = {"cores": cores, "threads": threads, "matmul_gflops": {}, "attention_gib_s": {},
           "attention_rep4_gib_s": {}, "packed_attention_gelem_s": {}, "packed_attention_kernel": packed_past.kernel,
           "dequant_gelem_s": {}}
    try:
        for t in threads:
            torch.set_num_threads(t)
            sec = _timeit(lambda: a @ b, reps, budget_s=budget)
            out["matmul_gflops"][str(t)] = 2 * n ** 3 / sec / 1e9
            sec = _timeit(attention, reps, budget_s=budget)
            out["attention_gib_s"][str(t)] = cache_bytes / sec / GiB
            sec = _timeit(lambda: attention(query=q4), reps, budget_s=budget)
            out["attention_rep4_gib_s"][str(t)] = cache_bytes / sec / GiB
            sec = _timeit(lambda: attention(packed_past), reps, budget_s=budget)
            out["packed_attention_gelem_s"][str(t)] = 2 * kc[:S - 1].numel() / sec / 1e9   # K and V values
            sec = _timeit(lambda: decompress(packed, torch.float32), reps, budget_s=budget)
            out["dequant_gelem_s"][str(t)] = w.numel() / sec / 1e9
        torch.set_num_threads(threads[-1])
        big = torch.empty((64 if quick else 256) << 20, dtype=torch.uint8)
        dst = torch.empty_like(big)
        sec = _timeit(lambda: dst.copy_(big), reps, budget_s=budget)
        out["mem_bw_gib_s"] = 2 * big.numel() / sec / GiB  # read + write
        # writing into freshly allocated memory (CPU attention's cache, filled at prefill): the
        # first touch of each page costs a fault, which bounds this rate well under the bandwidth
        sec = _timeit(lambda: torch.empty_like(big).copy_(big), reps, budget_s=budget)
        out["fresh_write_gib_s"] = big.numel() / sec / GiB
    finally:
        torch.set_num_threads(old)
    out.update(_host_op_or_none("cpu", quick))
    return out


# ------------------------------------------------------------------------------- host per op
def profile_host_op(device: str, quick: bool) -> dict:
    """Host seconds per aten operation of an eager decode step: tiny OPT- and LLaMA-shaped models
    (dummy weights, everything on `device`) generate through the engine, where a step is all host
    work (dispatch, launches and the schedule's Python around them). Each probe runs at two depths
    and the figure is the difference of their best decode steps over the difference of the
    operations the cost model counts for them (optimizer/op_count.py): a step's fixed work (the
    token's sampling, emitting and copying back) would otherwise be spread over a tiny model's few
    operations (measured on the H200: 22 us per operation that way against ~11 in OPT-6.7B's eager
    steps). The result is a per-op figure of this machine, not of the probe families: the cost
    model multiplies it by each real model's own count."""
    import statistics
    import numpy as np
    from .engine.generate import LM
    from .env import ExecutionEnv
    from .models.llama import LlamaConfig
    from .models.opt import OptConfig
    from .optimizer.cost_model import _layer_types, host_ops
    from .policy import Policy

    def probe(name, layers):
        if name == "opt":
            return OptConfig(name="probe-opt", num_hidden_layers=layers, hidden_size=256, n_head=4, input_dim=256,
                             ffn_embed_dim=1024, vocab_size=512, max_seq_len=256)
        return LlamaConfig(name="probe-llama", num_hidden_layers=layers, hidden_size=256, n_head=4,
                           num_key_value_heads=2, intermediate_size=1024, vocab_size=512, max_seq_len=256)

    steps = 8 if quick else 24
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = ExecutionEnv(device, tmp)
        # eager steps: a replayed CUDA graph has no per-operation host cost to measure (the cost
        # model has its own figure for those, cost_model.GRAPH_OP_S)
        env.cuda_graphs = False
        try:
            for name in ("opt", "llama"):
                lm_class = type(f"Probe{name}", (LM,), {"family_name": name})
                step, count = [], []
                for layers in (2, 8):
                    lm = lm_class(probe(name, layers), env, "_DUMMY_", Policy(4, 1, 100, 0, 100, 0, 100, 0),
                                  progress=False)
                    try:
                        ids = np.random.default_rng(0).integers(3, 500, size=(4, 16))
                        lm.generate(ids, max_new_tokens=3)   # warm: kernels loaded, shapes seen
                        lm.generate(ids, max_new_tokens=steps)
                        step.append(min(lm.timings["decode"]))   # best of, as every rate of the profile
                        fam = lm.family
                        ops = host_ops(fam)
                        count.append(sum(n * c for (n, _), c in zip(_layer_types(fam), ops["decode"])))
                    finally:
                        lm.close()
                # a noisy machine can leave the deeper probe no slower: then its plain ratio
                deeper = step[1] > step[0]
                out[name] = (step[1] - step[0]) / (count[1] - count[0]) if deeper else step[1] / count[1]
        finally:
            env.close_copy_threads()
        cache_op = _cache_op_s(env, steps)
    return {"host_op_s": statistics.mean(out.values()), "host_op_s_by_probe": out, "cache_op_s": cache_op}


def _cache_op_s(env, reps: int) -> float:
    """Host seconds per operation of the compressed KV cache's paths, as a decode step runs them
    for one layer and GPU batch: quantise the new rows and write them into a cache split over the
    device and host memory, then unpack the resident segment for attention; over the operations
    the cost model counts for them (optimizer/op_count.count_compressed_cache_ops)."""
    import time as _time
    import torch
    from .engine.kv_cache import LayerCache
    from .optimizer.op_count import count_compressed_cache_ops
    from .policy import CompressionConfig
    cfg = CompressionConfig(4, 64, 2, False)
    b, heads, d, n = 4, 4, 128, 16
    cache = LayerCache(env, n + 1, b, heads, d, env.compute_dtype, (50, 50, 0), "probe", False, cfg)
    try:
        k = torch.zeros((1, b, heads, d), dtype=env.compute_dtype, device=env.device)
        seg = next(i for i, r in enumerate(cache.resident) if r)
        lo, hi = cache.ranges[seg]

        def one():
            rows = cache.new_rows(k, k)
            cache.write_resident(rows, n)
            cache.store_rest(rows, n)
            cache.past_and_new(seg, n, k[:, :, lo:hi], k[:, :, lo:hi])
        for _ in range(3):
            one()
        env.synchronize()
        t = _time.perf_counter()
        for _ in range(reps * 4):
            one()
        env.synchronize()
        per_call = (_time.perf_counter() - t) / (reps * 4)
    finally:
        cache.close()
    ops = count_compressed_cache_ops(heads, d, cfg)
    segs = len(cache.ranges)
    unpack = ops["unpack_fused"] if env.is_cuda else ops["unpack"]
    return per_call / (ops["write"] + segs * ops["write_segment"] + unpack)


# --------------------------------------------------------------------------------------- disk
def profile_disk(path: str, quick: bool) -> dict:
    os.makedirs(path, exist_ok=True)
    size = (32 if quick else 256) << 20
    chunk = 4 << 20
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(1 << 16) * (chunk >> 16))
    fd_tmp, name = tempfile.mkstemp(dir=path, prefix=".flexgen-profile-")
    os.close(fd_tmp)
    result = {"path": path, "bytes": size}
    try:
        direct = hasattr(os, "O_DIRECT")
        try:
            fd = os.open(name, os.O_WRONLY | (os.O_DIRECT if direct else 0))
        except OSError:
            direct = False
            fd = os.open(name, os.O_WRONLY)
        t = time.perf_counter()
        try:
            for _ in range(size // chunk):
                os.write(fd, buf)
        except OSError:  # O_DIRECT accepted at open but not at write (some filesystems)
            os.close(fd)
            direct = False
            fd = os.open(name, os.O_WRONLY | os.O_TRUNC)
            t = time.perf_counter()
            for _ in range(size // chunk):
                os.write(fd, buf)
        os.fsync(fd)
        result["write_gib_s"] = size / (time.perf_counter() - t) / GiB
        os.close(fd)
        fd = os.open(name, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t = time.perf_counter()
        while os.readv(fd, [buf]) > 0:
            pass
        result["read_gib_s"] = size / (time.perf_counter() - t) / GiB
        os.close(fd)
        result["direct_io"] = direct
    finally:
        os.unlink(name)
        buf.close()
    return result


# ---------------------------------------------------------------------------------------- GPU
def profile_gpu(quick: bool) -> dict | None:
    import torch
    if not torch.cuda.is_available():
        return None
    from .memory.compression import compress, decompress
    from .policy import CompressionConfig

    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    reps = 3 if quick else 10
    budget = 1.0 if quick else 3.0
    nbytes = (256 if quick else 1024) << 20
    out = {"name": torch.cuda.get_device_name(dev), "mem_bytes": torch.cuda.get_device_properties(dev).total_memory}
    d = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    for pin in (True, False):
        h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        kind = "pinned" if pin else "pageable"
        out[f"h2d_{kind}_gib_s"] = nbytes / _timeit(lambda: d.copy_(h, non_blocking=pin), reps, sync, budget) / GiB
        out[f"d2h_{kind}_gib_s"] = nbytes / _timeit(lambda: h.copy_(d, non_blocking=pin), reps, sync, budget) / GiB
    d2 = torch.empty_like(d)
    out["mem_bw_gib_s"] = 2 * nbytes / _timeit(lambda: d2.copy_(d), reps, sync, budget) / GiB
    shapes = [(64, 8192, 8192), (4096, 8192, 8192)] if quick else \
        [(8, 8192, 8192), (64, 8192, 8192), (512, 8192, 8192), (4096, 8192, 8192), (8192, 8192, 8192)]
    out["fp16_tflops"] = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=dev, dtype=torch.float16)
        b = torch.randn(k, n, device=dev, dtype=torch.float16)
        sec = _timeit(lambda: a @ b, reps, sync, budget)
        out["fp16_tflops"][f"{m}x{k}x{n}"] = 2 * m * k * n / sec / 1e12
    out["fp16_tflops_best"] = max(out["fp16_tflops"].values())
    w = torch.randn(4096, 4096 if quick else 16384, device=dev, dtype=torch.float16)
    # weights unpacked as FlexGen groups them (along dim 0), and as --compress-weight does by default
    # (along dim 1, issue 12 item 8): the two layouts run different kernels (triton_dequant.py)
    for key, dim in (("dequant_gelem_s", 0), ("dequant_dim1_gelem_s", 1)):
        packed = compress(w, CompressionConfig(num_bits=4, group_size=64, group_dim=dim))
        out[key] = w.numel() / _timeit(lambda: decompress(packed, torch.float16), reps, sync, budget) / 1e9
    try:
        out.update(_packed_matmul_rate(dev, quick, reps, sync, budget))
    except Exception as e:   # noqa: BLE001 - reported, not fatal: the cost model then prices unpacking
        print(f"warning: packed-weight matmul not measured ({type(e).__name__}: {e})", file=sys.stderr)
    out.update(_host_op_or_none("cuda", quick))
    return out


def _packed_matmul_rate(dev, quick, reps, sync, budget) -> dict:
    """Packed bytes per second that F.linear reads from 4-bit weights at a decode step's 16 rows
    (memory/packed_matmul.py); nothing where the kernel is off or fails its check."""
    import torch
    import torch.nn.functional as F
    from .memory import packed_matmul
    from .memory.compression import compress
    from .memory.placement import Deferred
    from .policy import CompressionConfig
    if not packed_matmul.enabled():
        return {}
    # a transformer block's two kinds of matrix (hidden x hidden, and the MLP's 4x wider one,
    # both ways): the kernel's rate differs by shape (benchmarks/packed_matmul_bench.py)
    h = 2048 if quick else 8192
    nbytes = sec = 0.0
    for shape in ((h, h), (4 * h, h), (h, 4 * h)):
        packed = compress(torch.randn(shape, device=dev, dtype=torch.float16), CompressionConfig(4, 64, 1))
        x = torch.randn(16, shape[1], device=dev, dtype=torch.float16)
        m = packed_matmul.PackedMatrix(Deferred(packed, torch.float16))
        m.linear(x)   # the kernel's one-time check
        if not packed_matmul._STATE["ok"]:
            return {}
        nbytes += packed.nbytes
        sec += _timeit(lambda: F.linear(x, m), reps, sync, budget)
    return {"packed_matmul_gib_s": nbytes / sec / GiB}


def _host_op_or_none(device, quick) -> dict:
    """profile_host_op, or nothing (the cost model's reference figure stands in) if the probe
    cannot run here: a profile must not fail on it."""
    try:
        return profile_host_op(device, quick)
    except Exception as e:   # noqa: BLE001 - reported, not fatal
        print(f"warning: host cost per operation not measured ({type(e).__name__}: {e})", file=sys.stderr)
        return {}


def run_profile(offload_dir: str | None = None, quick: bool = False) -> dict:
    import torch
    offload_dir = os.path.abspath(os.path.expanduser(offload_dir or os.path.join(tempfile.gettempdir(), "flexgen_offload")))
    t0 = time.perf_counter()
    prof = {
        "version": 1,
        "source": "measured by python3 -m flexgen.profile",
        "hostname": socket.gethostname(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": quick,
        "torch": torch.__version__,
        "machine": machine_fingerprint(),
        "gpu": profile_gpu(quick),
        "cpu": profile_cpu(quick),
        "disk": profile_disk(offload_dir, quick),
    }
    prof["seconds"] = time.perf_counter() - t0
    return prof


def save_profile(prof: dict, path: str) -> str:
    path = os.path.expanduser(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(prof, f, indent=1)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m flexgen.profile", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help=f"where to save the JSON (default {default_profile_path()})")
    p.add_argument("--offload-dir", default=None, help="directory whose disk bandwidth is measured")
    p.add_argument("--quick", action="store_true", help="smaller measurements (< 20 s)")
    args = p.parse_args(argv)
    prof = run_profile(args.offload_dir, args.quick)
    path = save_profile(prof, args.out or default_profile_path())
    g, c, d = prof["gpu"], prof["cpu"], prof["disk"]
    if g:
        print(f"gpu {g['name']}: h2d pinned {g['h2d_pinned_gib_s']:.1f} GiB/s, pageable {g['h2d_pageable_gib_s']:.1f}; "
              f"memory {g['mem_bw_gib_s']:.0f} GiB/s; fp16 {g['fp16_tflops_best']:.0f} TFLOP/s")
    else:
        print("gpu: none (CPU-only profile)")
    t = str(c["threads"][-1])
    if g and g.get("host_op_s"):
        print(f"gpu host cost per operation {g['host_op_s'] * 1e6:.1f} us (decode steps of tiny models), "
              f"{g.get('cache_op_s', 0) * 1e6:.1f} us on the compressed cache's paths")
    print(f"cpu {c['cores']} cores: matmul {c['matmul_gflops'][t]:.0f} GFLOP/s, attention "
          f"{c['attention_gib_s'][t]:.1f} GiB/s of cache at {t} threads "
          f"({c['packed_attention_gelem_s'][t]:.1f} G values/s packed 4-bit, {c.get('packed_attention_kernel', 'unpack')} "
          f"kernel)")
    print(f"disk {d['path']}: read {d['read_gib_s']:.2f} GiB/s, write {d['write_gib_s']:.2f} GiB/s "
          f"({'O_DIRECT' if d['direct_io'] else 'fsync + fadvise'})")
    print(f"saved {path} ({prof['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
