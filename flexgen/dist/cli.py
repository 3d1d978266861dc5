"""`torchrun --nproc-per-node N -m flexgen.dist_flex_opt [flex_opt's flags]` (and dist_flex_llama):
every flag of the one-process command, plus the original FlexGen dist_flex_opt's launch flags.

Each rank: its own device (cuda:<local rank>, or the CPU), its own offload dir (a fresh
rank<r>-* folder under --offload-dir), its own stage's weights and KV cache, its own pre-flight
memory check (host memory and disk shared by the ranks on one machine, GPU memory by the ranks on
one GPU) and, with --percent auto, its own choice. Rank 0 prints the generated text, FlexGen's
benchmark block for the whole pipeline, and every rank's memory peaks.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import socket
import sys
import tempfile
import traceback

import torch

from .. import cli
from ..optimizer.memory_model import GiB, MachineMemory, MemoryFitError, available_memory, policy_flags
from ..policy import PolicyError
from .comm import Comm, DistError, Guard, LaunchError, guess_rank, launch_from_args
from .pipeline import PipelineLM
from .stages import StageError, StageFamily, describe_stage, split_stages

GB = 1 << 30


def add_dist_arguments(parser: argparse.ArgumentParser):
    """The original dist_flex_opt's flags (same names and meanings), plus timeouts."""
    g = parser.add_argument_group("pipeline parallelism")
    g.add_argument("--head-ip", type=str, default=None,
                   help="address of rank 0 (with --port; torchrun sets this itself)")
    g.add_argument("--port", type=int, default=None, help="port of rank 0's rendezvous")
    g.add_argument("--rank", metavar="I", type=int, default=None)
    g.add_argument("--local-rank", metavar="I", type=int, default=None)
    g.add_argument("--world-size", metavar="N", type=int, default=None)
    g.add_argument("--use-mpi", action="store_true", help="take rank, local rank and world size from Open MPI")
    g.add_argument("--comm-device", type=str, choices=["gpu", "cpu"], default=None,
                   help="gpu: hidden states go GPU to GPU (NCCL); cpu: through host memory (gloo). "
                        "Default: gpu on CUDA, cpu otherwise")
    g.add_argument("--num-inner-iterations", metavar="I", type=cli.positive_int, default=None,
                   help="micro-batches in flight (each gpu_batch_size x num_gpu_batches); default: the number of ranks")
    g.add_argument("--async-comm", action="store_true", help="post the next micro-batch's receives before computing")
    g.add_argument("--comm-timeout", type=float, default=600.0,
                   help="seconds a rank waits for a peer before declaring it hung (default 600)")
    g.add_argument("--load-timeout", type=float, default=3600.0,
                   help="seconds every rank may take to join and to load its weights (default 3600)")


class _Parser(argparse.ArgumentParser):
    """Only rank 0 prints a usage error (every rank sees the same one); all exit with status 2."""

    def error(self, message):
        if _argv_rank(sys.argv[1:]) != 0:
            sys.exit(2)
        super().error(message)


def _argv_rank(argv) -> int:
    for i, a in enumerate(argv):
        if a == "--rank" and i + 1 < len(argv):
            return _int(argv[i + 1])
        if a.startswith("--rank="):
            return _int(a.split("=", 1)[1])
    if "--use-mpi" in argv:
        return _int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    return _int(os.environ.get("RANK", "0"))


def _int(v):
    try:
        return int(v)
    except ValueError:
        return 0


def main(lm_class, default_model, default_path, log_prefix, argv=None):
    parser = _Parser(prog=f"torchrun --nproc-per-node N -m flexgen.dist_{lm_class.__module__.split('.')[-1]}")
    cli.add_arguments(parser, default_model, default_path)
    add_dist_arguments(parser)
    args = parser.parse_args(argv)
    sys.exit(run_main(args, lm_class, log_prefix))


def run_main(args, lm_class, log_prefix) -> int:
    """Run one rank; returns 0, or ends the process with status 2 (130 on Ctrl-C) after printing
    one `error:` line for the whole pipeline."""
    user_errors = (*cli.user_errors(), DistError, StageError)
    try:
        launch = launch_from_args(args)
    except LaunchError as e:
        if guess_rank(args) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    guard = Guard(launch.rank, launch.world_size, args.comm_timeout)
    guard.install_signals()
    guard.start()
    try:
        setup = _check_args(args, lm_class)
    except user_errors as e:   # every rank finds the same mistake: rank 0 says it
        guard.fail(str(e), quiet=launch.rank != 0)
    try:
        return _run(args, lm_class, log_prefix, launch, guard, *setup)
    except user_errors as e:
        msg = str(e)
        guard.fail(msg if msg.startswith("rank ") else f"rank {launch.rank}: {msg}")
    except Exception as e:   # a bug: say where, and still end every rank
        traceback.print_exc()
        guard.fail(f"rank {launch.rank}: internal error: {type(e).__name__}: {e}")


def _check_args(args, lm_class):
    from ..engine.generate import GenerationError
    from ..models.registry import resolve_model
    policy = None if cli.wants_auto(args) else cli.policy_from_args(args)
    family = resolve_model(args.model, lm_class.family_name).family
    info = family.info()
    if args.prompt_len + args.gen_len > info.max_seq_len:
        raise GenerationError(f"--prompt-len {args.prompt_len} + --gen-len {args.gen_len} exceeds the model's "
                              f"context of {info.max_seq_len} positions")
    if args.comm_timeout <= 0 or args.load_timeout <= 0:
        raise PolicyError("--comm-timeout and --load-timeout must be positive")
    return family, policy


def _device_for(args, local_rank: int) -> str:
    """cuda:<local rank> (modulo the GPUs this machine has) unless --device names one."""
    d = args.device
    if d in ("auto", "cuda"):
        if torch.cuda.is_available():
            return f"cuda:{local_rank % torch.cuda.device_count()}"
        if d == "cuda":
            raise PolicyError("--device cuda: no CUDA device is available")
        return "cpu"
    return d


def _run(args, lm_class, log_prefix, launch, guard, family, policy):
    from ..optimizer.memory_model import estimate_memory, shortfalls, suggest_policy
    rank, world = launch.rank, launch.world_size
    verbose = args.verbose if rank == 0 else 0
    parent = os.path.abspath(os.path.expanduser(args.offload_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        offload_dir = tempfile.mkdtemp(prefix=f"rank{rank}-", dir=parent)
    except OSError as e:
        raise PolicyError(f"offload dir {parent} cannot be written: {e.strerror}") from e
    guard.cleanup_paths.append(offload_dir)
    args.offload_dir = offload_dir
    args.device = _device_for(args, launch.local_rank)
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))   # NCCL and the CUDA streams use the current device
    env = cli.env_from_args(args)
    comm_device = args.comm_device or ("gpu" if env.is_cuda else "cpu")
    note = None
    if comm_device == "gpu" and not env.is_cuda:
        comm_device, note = "cpu", "--comm-device gpu on a CPU-only run: hidden states go through gloo"
    comm = Comm(launch, comm_device, env.device, guard, args.comm_timeout)
    model = None
    try:
        comm.connect(args.load_timeout)
        facts = comm.all_gather_objects((socket.gethostname(), str(env.device)))
        same_host = [r for r, f in enumerate(facts) if f[0] == facts[rank][0]]
        same_dev = [r for r in same_host if facts[r][1] == facts[rank][1]]
        if len(same_host) > 1 and (env.threads.cpu_auto or env.threads.io_auto):
            # the ranks of one machine share its cores
            env.threads = dataclasses.replace(env.threads, cores=max(1, env.threads.cores // len(same_host)))
        if comm.backend == "nccl" and len(same_dev) > 1:
            raise DistError(f"ranks {' and '.join(map(str, same_dev))} share {env.device}: NCCL cannot connect "
                            f"two ranks on one GPU; use --comm-device cpu")
        ranges = split_stages(family.layers(), world)
        stage_family = StageFamily(family, ranges[rank])
        free = available_memory(env)
        # the ranks of one machine share its memory and disk, those of one GPU its memory; a cap
        # (--gpu-mem, --cpu-mem) is per rank already
        gpu_cap, host_cap = getattr(env, "gpu_cap", None), getattr(env.host_bytes, "cap", None)
        share = MachineMemory(None if free.gpu is None else free.gpu // (1 if gpu_cap else len(same_dev)),
                              free.host // (1 if host_cap else len(same_host)), free.disk // len(same_host))
        if policy is None:
            policy = _auto_policy(args, stage_family, share, env, comm, rank, same_host)
        env.fit_threads(policy)
        if not args.force:
            est = estimate_memory(stage_family, policy, args.prompt_len, args.gen_len, env.is_cuda)
            short = shortfalls(est, share)
            if short:
                fit = suggest_policy(stage_family, policy, args.prompt_len, args.gen_len, env.is_cuda, share)
                hint = f"a policy that would fit: {policy_flags(fit)}" if fit else "no placement of this stage fits"
                raise MemoryFitError(f"rank {rank} ({describe_stage(family.layers(), ranges[rank])}) with "
                                     f"{policy_flags(policy)} "
                                     f"does not fit its share of this machine ({len(same_host)} ranks on it): "
                                     f"{'; '.join(short)}. {hint} (or pass --force to try anyway)")
        M = args.num_inner_iterations or world
        if verbose:
            print(f"<{lm_class.__name__}> pipeline of {world} ranks, {M} micro-batches of "
                  f"{policy.block_size} sequences, comm: {comm.backend} ({comm_device})"
                  f"{', async' if args.async_comm else ''}")
            if note:
                print(f"note: {note}")
        with cli.out_of_memory_as_error(stage_family, policy, args, env):   # one error naming the memory
            model = PipelineLM(lm_class, args.model, env, args.path, policy, comm, num_inner_iterations=M,
                               async_comm=args.async_comm, progress=verbose >= 1,
                               load_timeout_s=args.load_timeout)
        comm.barrier("weights loaded", args.load_timeout)
        described = comm.gather_objects(f"{env.device}, {env.describe_parallel()}, host memory held after "
                                        f"loading weights: {env.host_bytes.describe()}")
        if verbose:
            for r, d in enumerate(described):
                print(f"rank {r}: {model.stage_names[r]} on {d}")
        with cli.out_of_memory_as_error(stage_family, policy, args, env):
            result = _generate(args, model, env, policy, M, verbose)
        stats = comm.gather_objects(_rank_stats(rank, model, env))
        if rank == 0:
            _report(args, model, family, policy, M, world, result, stats, log_prefix, verbose)
        model.close()
        model = None
        comm.close()
    finally:
        if model is not None:
            model.close()
        env.close_copy_threads()
    guard.clean_up()
    return 0


def _auto_policy(args, stage_family, share, env, comm, rank, same_host):
    """--percent auto per rank, on this machine's profile; the ranks then agree on the smallest
    block (every micro-batch crosses every stage), and re-choose their placements for it."""
    from ..optimizer.search import NoPolicyFits, choose_policy
    from ..profile import profile_for_run
    # without a profile of this machine the first rank on it measures it (one line on rank 0
    # says so), the others wait and read what it saved: ranks measuring side by side would
    # time each other's load
    log = print if rank == 0 and args.verbose else (lambda _msg: None)
    if rank == same_host[0]:
        profile = profile_for_run(env.offload_dir, log=log)
    comm.barrier("machine profiled", args.load_timeout)
    if rank != same_host[0]:
        profile = profile_for_run(env.offload_dir, log=log)
    limits = MachineMemory(args.gpu_mem if args.gpu_mem is not None and env.is_cuda else share.gpu,
                           args.cpu_mem if args.cpu_mem is not None else share.host,
                           args.disk_mem if args.disk_mem is not None else share.disk)
    base = cli.policy_from_args(args, gpu_batch_size=1, num_gpu_batches=1, percent=[100, 0, 100, 0, 100, 0])
    gbs = None if args.gpu_batch_size == "auto" else args.gpu_batch_size
    ngb = None if args.num_gpu_batches == "auto" else args.num_gpu_batches

    def choose(g, n):
        try:
            # pipeline stages decode eagerly (no graph hook); the engine's operations counted
            # on this rank's GPU, as a single-process --percent auto does
            return choose_policy(stage_family, args.prompt_len, args.gen_len, limits, profile=profile,
                                 base=base, gpu_batch_size=g, num_gpu_batches=n,
                                 count_on=cli.count_device(env))
        except NoPolicyFits:
            gpu = "no GPU" if limits.gpu is None else f"GPU {limits.gpu / GiB:.1f} GiB"
            raise PolicyError(f"--percent auto: no policy fits rank {rank}'s stage in {gpu}, host "
                              f"{limits.host / GiB:.1f} GiB, disk {limits.disk / GiB:.1f} GiB") from None

    best = choose(gbs, ngb)
    blocks = comm.all_gather_objects((best.policy.block_size, best.policy.gpu_batch_size,
                                      best.policy.num_gpu_batches))
    _, g, n = min(blocks)
    if (g, n) != (best.policy.gpu_batch_size, best.policy.num_gpu_batches):
        best = choose(g, n)
    p = best.policy
    attn = " --cpu-cache-compute" if p.cpu_cache_compute else ""
    lines = comm.gather_objects(f"rank {rank}: {policy_flags(p)}{attn}; "
                                f"predicted {best.prediction.throughput:.2f} token/s for this stage alone")
    if rank == 0 and args.verbose:
        print("auto policy per rank:\n  " + "\n  ".join(lines))
    return p


def _generate(args, model, env, policy, M, verbose):
    num_prompts = policy.block_size * M
    inputs, mask, tok = cli.make_inputs(model, args, num_prompts)
    if verbose:
        print("warmup - generate")
    warm = min(32, args.prompt_len)
    model.generate(inputs[:, -warm:], max_new_tokens=1, attention_mask=mask[:, -warm:])
    if env.is_cuda:
        torch.cuda.reset_peak_memory_stats(env.device)
    if verbose:
        print("benchmark - generate")
    stop = model.info.eos_token_id if args.chat else None
    out = model.generate(inputs, max_new_tokens=args.gen_len, cut_gen_len=args.cut_gen_len, attention_mask=mask,
                         stop=stop)
    return out, tok, num_prompts


def _rank_stats(rank, model, env):
    t = model.lm.runner.timings
    compute = sum(t["prefill"]) + sum(t["decode"])
    gpu_peak = torch.cuda.max_memory_allocated(env.device) if env.is_cuda else 0
    return dict(rank=rank, stage=model.stage_names[rank], device=str(env.device), gpu_peak=gpu_peak,
                held=env.host_bytes.describe(peak=True), rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                compute=compute, wait=model.wait_s)


def _report(args, model, family, policy, M, world, result, stats, log_prefix, verbose):
    out, tok, num_prompts = result
    t = model.timings
    gen_len = args.gen_len
    prefill_latency = sum(t["prefill"])
    steps = t["decode"]
    projected = bool(args.cut_gen_len and args.cut_gen_len < gen_len)
    decode_latency = sum(steps) / len(steps) * (gen_len - 1) if projected and steps else sum(steps)
    prefill_throughput = num_prompts * args.prompt_len / max(prefill_latency, 1e-10)
    decode_throughput = num_prompts * (gen_len - 1) / max(decode_latency, 1e-10)
    total_latency = prefill_latency + decode_latency
    total_throughput = num_prompts * gen_len / total_latency
    cache_size = family.cache_bytes(num_prompts, args.prompt_len + gen_len)
    hidden_size = family.hidden_bytes(num_prompts, args.prompt_len + gen_len)
    if verbose >= 2:
        cli.show_outputs(tok, out, args.prompt_len)
    gpu_peak = max(s["gpu_peak"] for s in stats)
    log_str = cli.benchmark_log(family.model_bytes(), cache_size, hidden_size, gpu_peak, projected,
                                prefill_latency, prefill_throughput, decode_latency, decode_throughput,
                                total_latency, total_throughput)
    if not args.no_log:
        name = (cli.get_filename(args, log_prefix) + f"-ws{world}.log") if args.log_file == "auto" else args.log_file
        with open(name, "a") as f:
            f.write(log_str + "\n")
    if verbose >= 1:
        wall = prefill_latency + sum(steps)
        for s in stats:
            print(f"rank {s['rank']} ({s['stage']}, {s['device']}): peak gpu mem {s['gpu_peak'] / GB:.3f} GB, "
                  f"peak host mem held {s['held']}, max RSS {s['rss'] / GB:.3f} GB; computing "
                  f"{s['compute']:.3f} s, waiting for peers {s['wait']:.3f} s of {wall:.3f} s")
        print(log_str)
