"""Greedy tokens of the pipeline (flexgen/dist) against one process, on any device.

    python3 benchmarks/dist_tokens.py build DIR        random OPT and LLaMA checkpoints (transformers, no hub)
    python3 benchmarks/dist_tokens.py run --model DIR/opt-mid --out one.npy [policy flags]            one process
    torchrun --nproc-per-node 2 benchmarks/dist_tokens.py run --model DIR/opt-mid --out pp.npy \\
        --comm-device cpu [policy flags]                                                             the pipeline
    python3 benchmarks/dist_tokens.py compare one.npy pp.npy

The prompts (random ids, left-padded to different lengths) and the number of them (gpu batch x
num gpu batches x micro-batches) are the same in both runs, so the blocks the engine computes are
the same too and fp16 results must be identical, not only close.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

SPECS = {   # big enough to take real time per layer, random (std 0.2: not degenerate)
    "opt-mid": ("opt", dict(vocab_size=50272, hidden_size=1024, num_hidden_layers=12, num_attention_heads=16,
                            ffn_dim=4096, max_position_embeddings=2048, word_embed_proj_dim=1024, init_std=0.2)),
    "llama-mid": ("llama", dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                                num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                                initializer_range=0.2, tie_word_embeddings=False)),
}


def build(out):
    import tiny_models as T
    for name, spec in SPECS.items():
        T.SPECS[name] = spec
        d = os.path.join(out, name)
        if not os.path.exists(os.path.join(d, "config.json")):
            T.build_checkpoint(name, d)
        print(f"built {d}")


def run(a):
    import torch
    from flexgen.flex_llama import LlamaLM
    from flexgen.flex_opt import OptLM
    from flexgen.env import ExecutionEnv
    from flexgen.policy import CompressionConfig, Policy
    from flexgen.models.registry import resolve_model
    cls = OptLM if resolve_model(a.model).family.family == "opt" else LlamaLM
    p = [float(x) for x in a.percent]
    policy = Policy(a.gpu_batch_size, a.num_gpu_batches, *p, overlap=True, sep_layer=True, pin_weight=True,
                    cpu_cache_compute=a.cpu_cache_compute, attn_sparsity=1.0, compress_weight=a.compress_weight,
                    comp_weight_config=CompressionConfig(4, 64, 0, False), compress_cache=a.compress_cache,
                    comp_cache_config=CompressionConfig(4, 64, 2, False))
    info = resolve_model(a.model).family.info()
    n = policy.block_size * a.micro_batches
    rng = np.random.default_rng(0)
    prompts = np.full((n, a.prompt_len), info.pad_token_id, dtype=np.int64)
    for i in range(n):
        real = a.prompt_len if i == 0 else int(rng.integers(a.prompt_len // 2, a.prompt_len + 1))
        prompts[i, a.prompt_len - real:] = rng.integers(3, info.vocab_size, size=real)
    distributed = os.environ.get("WORLD_SIZE") not in (None, "", "1")
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    share = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))   # the ranks of one machine share its cores
    env = ExecutionEnv.create(os.path.join(a.offload_dir, f"rank{rank}"), device=device,
                              cpu_threads=max(1, len(os.sched_getaffinity(0)) // share))
    if distributed:
        from flexgen.dist.comm import Comm, Guard, Launch
        from flexgen.dist.pipeline import PipelineLM
        world = int(os.environ["WORLD_SIZE"])
        guard = Guard(rank, world, 600)
        guard.install_signals()
        guard.start()
        comm = Comm(Launch(rank, world, local, "env://"), a.comm_device, env.device, guard, 600)
        comm.connect(600)
        model = PipelineLM(cls, a.model, env, a.path, policy, comm, num_inner_iterations=a.micro_batches,
                           async_comm=a.async_comm, progress=False)
    else:
        model = cls(a.model, env, a.path, policy, progress=False)
    model.generate(prompts[:, -8:], max_new_tokens=1)   # warm-up
    t0 = time.perf_counter()
    out = model.generate(prompts, max_new_tokens=a.gen_len)
    took = time.perf_counter() - t0
    model.close()
    env.close_copy_threads()
    if distributed:
        comm.close()
    if rank == 0:
        np.save(a.out, out)
        print(f"{'pipeline' if distributed else 'one process'}: {n} sequences x {a.gen_len} tokens in {took:.3f} s "
              f"({n * a.gen_len / took:.1f} token/s) -> {a.out}")


def compare(a, b):
    x, y = np.load(a), np.load(b)
    same = x.shape == y.shape and bool((x == y).all())
    rows = int((x != y).any(axis=1).sum()) if x.shape == y.shape else -1
    print(f"tokens identical: {same} ({a} vs {b}, {x.shape}; rows that differ: {rows})")
    return 0 if same else 1


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("dir")
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--path", default="/tmp/dist_tokens_cache")
    r.add_argument("--offload-dir", default="/tmp/dist_tokens_offload")
    r.add_argument("--out", required=True)
    r.add_argument("--percent", nargs=6, default=["100", "0", "100", "0", "100", "0"])
    r.add_argument("--gpu-batch-size", type=int, default=4)
    r.add_argument("--num-gpu-batches", type=int, default=2)
    r.add_argument("--micro-batches", type=int, default=2)
    r.add_argument("--prompt-len", type=int, default=64)
    r.add_argument("--gen-len", type=int, default=16)
    r.add_argument("--comm-device", choices=["cpu", "gpu"], default="cpu")
    r.add_argument("--async-comm", action="store_true")
    r.add_argument("--cpu-cache-compute", action="store_true")
    r.add_argument("--compress-weight", action="store_true")
    r.add_argument("--compress-cache", action="store_true")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    a = ap.parse_args()
    if a.cmd == "build":
        build(a.dir)
    elif a.cmd == "run":
        run(a)
    else:
        sys.exit(compare(a.a, a.b))


if __name__ == "__main__":
    main()
