"""The command line shared by flex_opt and flex_llama (FlexGen's flags, plus --device and text
prompts), and FlexGen's benchmark block."""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys

import numpy as np
import torch

from .env import ExecutionEnv
from .policy import CompressionConfig, Policy, PolicyError

GB = 1 << 30
DEFAULT_PROMPT = "Paris is the capital city of"


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def positive_int(v):
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
    return n


def positive_int_or_auto(v):
    return "auto" if v == "auto" else positive_int(v)


# The flags of the original FlexGen's flex_opt (its own and its apps' scripts share them). argparse
# takes a unique prefix for a flag; FlexGen's scripts rely on that (`--cpu` for --cpu-cache-compute,
# `--debug` for --debug-mode), and the flags added here (--cpu-mem, --cpu-threads, --device ...)
# would make those prefixes ambiguous. An abbreviation that named exactly one of these flags there
# names it here too.
FLEXGEN_FLAGS = ("--model", "--path", "--offload-dir", "--prompt-len", "--gen-len", "--cut-gen-len",
                 "--debug-mode", "--gpu-batch-size", "--num-gpu-batches", "--percent", "--sep-layer",
                 "--pin-weight", "--cpu-cache-compute", "--attn-sparsity", "--compress-weight",
                 "--compress-cache", "--log-file", "--no-log", "--verbose", "--overlap")

# The command line's compression layout when no grouping flag is given, chosen by measurement
# (benchmarks/compression_accuracy.py, benchmarks/RESULTS.md): weights in groups of
# DEFAULT_WEIGHT_GROUPING = (size, dim of the (out, in) matrix), the cache in groups of
# DEFAULT_CACHE_GROUP along the head dim. A model read from a GGUF file keeps its own block layout
# (32 values along the input dim), which re-quantises its already 4-bit blocks almost exactly.
# The Python API keeps FlexGen's CompressionConfig defaults (64 along dim 0).
DEFAULT_WEIGHT_GROUPING = (64, 1)
GGUF_WEIGHT_GROUPING = (32, 1)
DEFAULT_CACHE_GROUP = 64

# The module each family's command line runs as (its usage line names it; `python3 -m` would
# otherwise show `__main__`).
ENTRY_POINTS = {"opt": "flexgen.flex_opt", "llama": "flexgen.flex_llama"}


def expand_flexgen_abbreviations(argv, option_strings) -> list:
    """argv with each abbreviation that argparse would find ambiguous among option_strings, but
    that is a unique prefix of one of FLEXGEN_FLAGS, written out in full."""
    out = list(argv)
    for i, tok in enumerate(out):
        if tok == "--":
            break
        if not (isinstance(tok, str) and tok.startswith("--") and len(tok) > 2):
            continue
        name, eq, value = tok.partition("=")
        if name in option_strings or sum(o.startswith(name) for o in option_strings) < 2:
            continue
        theirs = [f for f in FLEXGEN_FLAGS if f.startswith(name)]
        if len(theirs) == 1 and theirs[0] in option_strings:
            out[i] = theirs[0] + eq + value
    return out


class FlexGenArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that reads FlexGen's abbreviations as FlexGen did (see FLEXGEN_FLAGS)."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(expand_flexgen_abbreviations(args, set(self._option_string_actions)),
                                        namespace)


def add_arguments(parser: argparse.ArgumentParser, default_model: str, default_path: str):
    if type(parser) is argparse.ArgumentParser:
        # Every app that shares these flags (completion, helm, data wrangling ...) builds a plain
        # parser; make it read FlexGen's abbreviations too, so its scripts run unchanged.
        parser.__class__ = FlexGenArgumentParser
    parser.add_argument("--model", type=str, default=default_model,
                        help="model name, local Hugging Face checkpoint directory, or .gguf file")
    parser.add_argument("--path", type=str, default=default_path,
                        help="weight cache root (numpy layout); a path containing _DUMMY_ uses dummy weights")
    parser.add_argument("--offload-dir", type=str, default="~/flexgen_offload_dir",
                        help="directory for tensors offloaded to disk")
    parser.add_argument("--prompt-len", type=positive_int, default=512)
    parser.add_argument("--gen-len", type=positive_int, default=32)
    parser.add_argument("--cut-gen-len", type=positive_int, help="cut generation length for fast debugging")
    parser.add_argument("--debug-mode", type=str, choices=["fewer_batch", "breakdown"],
                        help="fewer_batch: time a few decode steps and project (FlexGen's shortcut); "
                             "breakdown: print every step's latency")
    parser.add_argument("--gpu-batch-size", type=positive_int_or_auto, default=4, help="a number, or auto")
    parser.add_argument("--num-gpu-batches", type=positive_int_or_auto, default=1, help="a number, or auto")
    parser.add_argument("--percent", nargs="+", default=["100", "0", "100", "0", "100", "0"],
                        help="six numbers: weight gpu/cpu %%, cache gpu/cpu %%, activation gpu/cpu %% "
                             "(the rest of each goes to disk); or auto: the performance model picks the "
                             "policy (and compression, CPU attention) that fits --gpu-mem/--cpu-mem/--disk-mem")
    from .optimizer.memory_model import parse_size
    parser.add_argument("--gpu-mem", type=parse_size,
                        help="hard cap on the GPU memory this run takes, as on a smaller card; the budget "
                             "of the memory check and --percent auto (default: free now)")
    parser.add_argument("--cpu-mem", type=parse_size,
                        help="cap on the host memory of the CPU tier (weights, cache, activations, staging); "
                             "the budget of the memory check and --percent auto (default: available)")
    parser.add_argument("--disk-mem", type=parse_size, help="disk for --percent auto (default: free in offload dir)")
    parser.add_argument("--sep-layer", type=str2bool, nargs="?", const=True, default=True)
    parser.add_argument("--pin-weight", type=str2bool, nargs="?", const=True, default=True)
    parser.add_argument("--cpu-cache-compute", action="store_true")
    parser.add_argument("--attn-sparsity", type=float, default=1.0)
    parser.add_argument("--compress-weight", action="store_true", help="4-bit group-wise weight compression")
    parser.add_argument("--compress-cache", action="store_true", help="4-bit group-wise cache compression")
    parser.add_argument("--comp-bits", type=int, choices=[4, 8], default=4, help="bits per compressed value")
    # Unset grouping flags take the measured default (default_grouping); FlexGen's own layout is
    # --comp-weight-group 64 --comp-weight-dim 0 --comp-cache-group 64.
    parser.add_argument("--comp-weight-group", type=positive_int, default=None,
                        help=f"weight compression group size (default {DEFAULT_WEIGHT_GROUPING[0]}, "
                             f"a GGUF model's: {GGUF_WEIGHT_GROUPING[0]}; FlexGen: 64)")
    parser.add_argument("--comp-weight-dim", type=int, choices=[0, 1], default=None,
                        help=f"weight matrix (out, in) dim the groups run along (default {DEFAULT_WEIGHT_GROUPING[1]}, "
                             f"a GGUF model's: {GGUF_WEIGHT_GROUPING[1]}; FlexGen: 0)")
    parser.add_argument("--comp-cache-group", type=positive_int, default=None,
                        help=f"KV cache compression group size, along the head dim (default {DEFAULT_CACHE_GROUP}; "
                             "FlexGen: 64)")
    parser.add_argument("--log-file", type=str, default="auto")
    parser.add_argument("--no-log", action="store_true")
    parser.add_argument("--verbose", type=int, default=2)
    parser.add_argument("--overlap", type=str2bool, nargs="?", const=True, default=True)
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="decode without CUDA graphs (they are used when weights, cache and activations "
                             "are all on the GPU)")
    parser.add_argument("--device", type=str, default="auto", help="compute device: auto, cuda[:N] or cpu")
    parser.add_argument("--force", action="store_true",
                        help="run even when the memory check predicts the policy does not fit")
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable); default: FlexGen's prompt")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    parser.add_argument("--cpu-threads", type=str, default="auto",
                        help="torch intra-op threads for CPU compute: N or auto (see flexgen/parallel.py)")
    parser.add_argument("--io-threads", type=str, default="auto",
                        help="workers per I/O pool (disk reads/writes): N or auto")
    parser.add_argument("--cpu-numa-node", type=str, default=None,
                        help="allocate the CPU tier on this NUMA node (e.g. a CXL memory expander)")
    parser.add_argument("--cpu-numa-interleave", type=str, default=None,
                        help="interleave the CPU tier across these NUMA nodes, e.g. 0,1")


def env_from_args(args) -> ExecutionEnv:
    """ExecutionEnv.create with the shared flags (device, offload dir, threads, NUMA, graphs)."""
    env = ExecutionEnv.create(args.offload_dir, device=args.device,
                              cpu_threads=getattr(args, "cpu_threads", None),
                              io_threads=getattr(args, "io_threads", None),
                              numa_node=getattr(args, "cpu_numa_node", None),
                              numa_interleave=getattr(args, "cpu_numa_interleave", None),
                              gpu_mem=getattr(args, "gpu_mem", None), cpu_mem=getattr(args, "cpu_mem", None))
    env.cuda_graphs = getattr(args, "cuda_graphs", True)
    return env


def wants_auto(args) -> bool:
    return list(args.percent) == ["auto"]


def default_grouping(args) -> dict:
    """{flag: (value, why)} for the three grouping flags: the user's value, else the default for
    this model (its GGUF's block layout, or the measured default)."""
    from .models.registry import is_gguf_model
    gguf = is_gguf_model(getattr(args, "model", None))
    wg, wd = GGUF_WEIGHT_GROUPING if gguf else DEFAULT_WEIGHT_GROUPING
    why = "the GGUF file's block layout" if gguf else "default"
    out = {}
    for name, default, reason in (("comp_weight_group", wg, why), ("comp_weight_dim", wd, why),
                                  ("comp_cache_group", DEFAULT_CACHE_GROUP, "default")):
        given = getattr(args, name, None)
        out[name] = (given, "given") if given is not None else (default, reason)
    return out


def describe_compression(policy, args) -> str | None:
    """The run header's compression line: bits and grouping in use, and where they came from."""
    if not (policy.compress_weight or policy.compress_cache):
        return None
    g = default_grouping(args)
    parts = []
    if policy.compress_weight:
        c = policy.comp_weight_config
        whys = {g["comp_weight_group"][1], g["comp_weight_dim"][1]}
        parts.append(f"weights {c.num_bits}-bit in groups of {c.group_size} along dim {c.group_dim} "
                     f"({', '.join(sorted(whys))})")
    if policy.compress_cache:
        c = policy.comp_cache_config
        parts.append(f"cache {c.num_bits}-bit in groups of {c.group_size} along the head dim "
                     f"({g['comp_cache_group'][1]})")
    return "compression: " + "; ".join(parts)


def policy_from_args(args, gpu_batch_size=None, num_gpu_batches=None, percent=None) -> Policy:
    """The policy the flags spell; the arguments stand in for flags given as auto."""
    if percent is None:
        if list(args.percent) == ["auto"]:
            raise PolicyError("--percent auto is for flex_opt and flex_llama runs; give six numbers here")
        if len(args.percent) != 6:
            raise PolicyError(f"--percent takes six numbers (weight gpu cpu, cache gpu cpu, act gpu cpu), "
                              f"got {len(args.percent)}")
        try:
            percent = [float(x) for x in args.percent]
        except ValueError:
            raise PolicyError(f"--percent takes numbers, got {' '.join(args.percent)}") from None
    gbs = gpu_batch_size or args.gpu_batch_size
    ngb = num_gpu_batches or args.num_gpu_batches
    if "auto" in (gbs, ngb):
        raise PolicyError("--gpu-batch-size auto and --num-gpu-batches auto need --percent auto")
    g = {name: value for name, (value, _) in default_grouping(args).items()}
    return Policy(gbs, ngb, *percent,
                  overlap=args.overlap, sep_layer=args.sep_layer, pin_weight=args.pin_weight,
                  cpu_cache_compute=args.cpu_cache_compute, attn_sparsity=args.attn_sparsity,
                  compress_weight=args.compress_weight,
                  comp_weight_config=CompressionConfig(num_bits=args.comp_bits, group_size=g["comp_weight_group"],
                                                       group_dim=g["comp_weight_dim"], symmetric=False),
                  compress_cache=args.compress_cache,
                  comp_cache_config=CompressionConfig(num_bits=args.comp_bits, group_size=g["comp_cache_group"],
                                                      group_dim=2, symmetric=False))


def get_filename(args, prefix: str) -> str:
    size = args.model.rstrip("/").split("-")[-1]
    percent = "".join(f"{float(p):g}-" if p != "auto" else "auto-" for p in args.percent)
    name = (f"{prefix}-{size}-gbs{args.gpu_batch_size}-ngbs{args.num_gpu_batches}-prompt{args.prompt_len}-"
            f"gen{args.gen_len}-percent-{percent}")
    name += "cpu-cache" if args.cpu_cache_compute else "gpu-cache"
    if args.compress_weight:
        name += "-compw"
    if args.compress_cache:
        name += "-compc"
    return os.path.basename(name)


def benchmark_log(model_size, cache_size, hidden_size, gpu_peak_mem, projected, prefill_latency,
                  prefill_throughput, decode_latency, decode_throughput, total_latency, total_throughput):
    """FlexGen's benchmark block, byte for byte, so existing log parsers keep working."""
    return (f"model size: {model_size / GB:.3f} GB\t"
            f"cache size: {cache_size / GB:.3f} GB\t"
            f"hidden size (p): {hidden_size / GB:.3f} GB\n"
            f"peak gpu mem: {gpu_peak_mem / GB:.3f} GB\t"
            f"projected: {projected}\n"
            f"prefill latency: {prefill_latency:.3f} s\t"
            f"prefill throughput: {prefill_throughput:.3f} token/s\n"
            f"decode latency: {decode_latency:.3f} s\t"
            f"decode throughput: {decode_throughput:.3f} token/s\n"
            f"total latency: {total_latency:.3f} s\t"
            f"total throughput: {total_throughput:.3f} token/s")


def make_inputs(model, args, num_prompts):
    """Token rows of length prompt_len: the tokenized prompt(s), left-padded; without a tokenizer
    (dummy weights) a fixed synthetic prompt."""
    pad = model.info.pad_token_id
    tok = model.tokenizer
    if tok is None:
        rng = np.random.default_rng(0)
        row = rng.integers(low=min(100, model.info.vocab_size - 1), high=model.info.vocab_size, size=args.prompt_len)
        row[row == pad] = (pad + 1) % model.info.vocab_size
        return np.repeat(row[None], num_prompts, axis=0), np.ones((num_prompts, args.prompt_len), bool), None
    texts = args.prompt or [DEFAULT_PROMPT]
    rows, masks = [], []
    for i in range(num_prompts):
        text = texts[i % len(texts)]
        if args.chat:
            enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True)
            if isinstance(enc, dict) or hasattr(enc, "keys"):
                enc = enc["input_ids"]
        else:
            enc = tok.encode(text)
        enc = list(enc)[-args.prompt_len:]
        rows.append([pad] * (args.prompt_len - len(enc)) + enc)
        masks.append([False] * (args.prompt_len - len(enc)) + [True] * len(enc))
    return np.array(rows, dtype=np.int64), np.array(masks), tok


def run(args, lm_class, log_prefix: str):
    from .engine.generate import GenerationError
    from .models.registry import resolve_model

    from .optimizer.memory_model import preflight

    auto = wants_auto(args)
    policy = None if auto else policy_from_args(args)
    family = resolve_model(args.model, lm_class.family_name).family
    info = family.info()
    if args.prompt_len + args.gen_len > info.max_seq_len:  # say so before loading any weights
        raise GenerationError(f"--prompt-len {args.prompt_len} + --gen-len {args.gen_len} exceeds the model's "
                              f"context of {info.max_seq_len} positions")
    env = env_from_args(args)
    chosen = profile = None
    try:
        if auto or args.verbose >= 1:   # measured before the model takes the memory the profile needs
            from .profile import profile_for_run
            profile = profile_for_run(env.offload_dir)
        if auto:
            chosen = choose_auto_policy(args, family, env, profile=profile)
            policy = chosen.policy
        if not args.force:
            preflight(family, policy, args.prompt_len, args.gen_len, env)
    except BaseException:
        env.close_copy_threads()
        raise
    num_prompts = policy.block_size
    gen_len, cut_gen_len = args.gen_len, args.cut_gen_len
    env.fit_threads(policy, profile)   # before the header shows the split

    print(f"<{lm_class.__name__}> device: {env.device}, dtype: {str(env.compute_dtype).split('.')[-1]}, "
          f"{env.describe_parallel()}")
    if describe_compression(policy, args):
        print(describe_compression(policy, args))
    model = None
    try:
        with out_of_memory_as_error(family, policy, args, env):
            model = lm_class(args.model, env, args.path, policy, progress=args.verbose >= 1)
        inputs, mask, tok = make_inputs(model, args, num_prompts)
        fam = model.family
        cache_size = fam.cache_bytes(num_prompts, args.prompt_len + gen_len)
        hidden_size = fam.hidden_bytes(num_prompts, args.prompt_len + gen_len)
        print(f"model size: {fam.model_bytes() / GB:.3f} GB, cache size: {cache_size / GB:.3f} GB, "
              f"hidden size (prefill): {hidden_size / GB:.3f} GB")
        print(f"host memory held after loading weights: {env.host_bytes.describe()}")

        print("warmup - generate")
        warm = min(32, args.prompt_len)
        with out_of_memory_as_error(family, policy, args, env):
            model.generate(inputs[:, -warm:], max_new_tokens=1, attention_mask=mask[:, -warm:])
            # capturing decode graphs is a one-time cost per block shape (a server pays it once):
            # pay it here, at the benchmark's shape, whose block then replays them
            steps = min(gen_len, cut_gen_len) if cut_gen_len else gen_len
            if model.runner.graph_mode(steps) == "graph":
                print("warmup - capture decode graphs")
                model.runner.prepare(inputs, mask, steps, model.info.pad_token_id)
        if env.is_cuda:
            torch.cuda.reset_peak_memory_stats(env.device)
        print("benchmark - generate")
        # A chat turn ends at the end-of-turn token; benchmark runs generate all gen_len tokens.
        stop = model.info.eos_token_id if args.chat else None
        with out_of_memory_as_error(family, policy, args, env):
            output_ids = model.generate(inputs, max_new_tokens=gen_len, debug_mode=args.debug_mode,
                                        cut_gen_len=cut_gen_len, verbose=args.verbose, attention_mask=mask,
                                        stop=stop)
        t = model.timings
        prefill_latency = sum(t["prefill"])
        prefill_throughput = num_prompts * args.prompt_len / prefill_latency
        steps = t["decode"]
        projected = bool(cut_gen_len and cut_gen_len < gen_len)
        if projected and steps:
            decode_latency = project_decode_latency(steps, gen_len)
        else:
            decode_latency = sum(steps)
        decode_throughput = num_prompts * (gen_len - 1) / max(decode_latency, 1e-10)
        total_latency = prefill_latency + decode_latency
        total_throughput = num_prompts * gen_len / total_latency
        gpu_peak_mem = torch.cuda.max_memory_allocated(env.device) if env.is_cuda else 0

        if args.verbose >= 2:
            show_outputs(tok, output_ids, args.prompt_len)

        log_str = benchmark_log(fam.model_bytes(), cache_size, hidden_size, gpu_peak_mem, projected,
                                prefill_latency, prefill_throughput, decode_latency, decode_throughput,
                                total_latency, total_throughput)
        if not args.no_log:
            filename = get_filename(args, log_prefix) + ".log" if args.log_file == "auto" else args.log_file
            with open(filename, "a") as f:
                f.write(log_str + "\n")
        if args.verbose >= 1 and env.is_cuda:
            from .optimizer.memory_model import estimate_memory
            est = estimate_memory(family, policy, args.prompt_len, gen_len, True)
            print(f"peak gpu mem reserved: {torch.cuda.max_memory_reserved(env.device) / GB:.3f} GB (allocated "
                  f"{gpu_peak_mem / GB:.3f} GB; memory model {est.gpu / GB:.3f} GB"
                  f"{f', cap {env.gpu_cap / GB:.3f} GB' if env.gpu_cap else ''})")
        if args.verbose >= 1:
            print(f"peak host mem (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.3f} GB")
            print(f"peak host mem held (CPU tier + staging): {env.host_bytes.describe(peak=True)}")
            print(log_str)
        if args.verbose >= 1:
            pr = chosen.prediction if chosen is not None else predict_policy(family, policy, args, env, profile)
            print(f"predicted vs measured: prefill {pr.prefill_s:.3f} / {prefill_latency:.3f} s, decode step "
                  f"{pr.decode_step_s:.4f} / {decode_latency / max(gen_len - 1, 1):.4f} s, throughput "
                  f"{pr.throughput:.3f} / {total_throughput:.3f} token/s")
        if args.verbose >= 1 and steps and any(t["cpu_attention"]):
            n = len(steps)
            cpu_s, wait_s = sum(t["cpu_attention"]) / n, sum(t["gpu_wait"]) / n
            print(f"decode step breakdown (compute thread, mean of {n} steps): {sum(steps) / n:.4f} s = CPU attention "
                  f"{cpu_s:.4f} s + waiting for the device (weight transfers, GPU compute) {wait_s:.4f} s + other "
                  f"{sum(steps) / n - cpu_s - wait_s:.4f} s")
        if args.debug_mode == "breakdown":
            print("per-step latency (s):", " ".join(f"{x:.4f}" for x in t["prefill"] + t["decode"]))
    finally:
        if model is not None:
            model.close()
        env.close_copy_threads()  # also removes this run's offload files


def project_decode_latency(steps, gen_len: int, warmup: int = 2) -> float:
    """FlexGen's projection of a run cut short by --cut-gen-len (its utils.project_decode_latency):
    the first `warmup` decode steps as measured, the remaining gen_len - 1 - warmup at the mean of
    the later ones. The first decode step of a process loads the decode kernels and meets new
    shapes (the warm-up generates one token, no decode step): scaling it by gen_len - 1 with the
    others would project that one-time cost onto every step."""
    if len(steps) <= warmup:
        return sum(steps) / len(steps) * (gen_len - 1)
    rest = steps[warmup:]
    return sum(steps[:warmup]) + sum(rest) / len(rest) * (gen_len - 1 - warmup)


@contextlib.contextmanager
def out_of_memory_as_error(family, policy, args, env, prompt_len=None, gen_len=None):
    """Running out of GPU, pinned or pageable host memory ends the run with one error naming
    which, and a policy that should fit: one whose predicted use of that memory is 3/4 of this
    policy's (the prediction fell short by an unknown amount, at least the rest of the budget)."""
    from .memory.oom import OutOfMemory, first_line, is_out_of_memory, which_memory
    try:
        yield
    except OutOfMemory:
        raise
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        import gc
        from .optimizer.memory_model import (MachineMemory, available_memory, estimate_memory, policy_flags,
                                             suggest_policy)
        what = which_memory(e)
        gc.collect()
        if env.is_cuda:
            torch.cuda.empty_cache()
        pl, gl = prompt_len or args.prompt_len, gen_len or args.gen_len
        est = estimate_memory(family, policy, pl, gl, env.is_cuda)
        mem = available_memory(env)
        if what == "GPU":
            mem = MachineMemory(int(est.gpu * 0.75 / 0.95), mem.host, mem.disk)
        else:
            mem = MachineMemory(mem.gpu, int(est.host() * 0.75 / 0.95), mem.disk)
        fit = suggest_policy(family, policy, pl, gl, env.is_cuda, mem)
        hint = f"a policy that should fit: {policy_flags(fit)}" if fit not in (None, policy) else \
            "no smaller placement was found; offload more to disk or use a smaller model"
        raise OutOfMemory(f"out of {what} memory with {policy_flags(policy)} ({first_line(e)}); {hint}") from None


def predict_policy(family, policy, args, env, profile):
    """The performance model's prediction for an explicit policy, printed beside the measurement so
    every run checks the model."""
    from .optimizer.cost_model import Workload, predict
    return predict(family, Workload(args.prompt_len, args.gen_len), policy, profile,
                   is_cuda=env.is_cuda, cpu_threads=env.cpu_threads, graph_op_s=graph_op_s(env),
                   count_on=count_device(env))


def count_device(env):
    """Where the cost model counts the engine's scheduling operations (optimizer/engine_ops.py):
    the run's GPU, where a decode step's host work is what small batches wait for; None on the
    CPU, whose runs the per-layer count already describes."""
    return str(env.device) if env.is_cuda else None


def graph_op_s(env):
    """The cost model's per-operation time of a decode step replayed from CUDA graphs, when this
    run captures them where a policy allows (None: every decode step eager)."""
    from .engine.graphs import graph_mode
    from .optimizer.cost_model import GRAPH_OP_S
    return GRAPH_OP_S if graph_mode(env) == "graph" else None


DEFAULT_PATHS = {"opt": "~/opt_weights", "llama": "~/llama_weights"}


def user_errors() -> tuple:
    """The exceptions that carry a message for the user: one `error:` line, exit status 2."""
    from .engine.generate import GenerationError
    from .memory.disk import DiskFullError
    from .memory.oom import OutOfMemory
    from .models.registry import ModelNotFound
    from .weights import WeightsError
    return (PolicyError, ModelNotFound, WeightsError, GenerationError, DiskFullError, OutOfMemory)


def choose_auto_policy(args, family, env, prompt_len=None, gen_len=None, profile=None):
    """--percent auto: the performance model's best policy within this machine's free memory (or
    --gpu-mem/--cpu-mem/--disk-mem), printed as the equivalent explicit flags before the run."""
    from .optimizer.memory_model import GiB, MachineMemory, available_memory, policy_flags
    from .optimizer.search import NoPolicyFits, choose_policy

    free = available_memory(env)   # within --gpu-mem / --cpu-mem, which the environment enforces
    limits = MachineMemory(free.gpu, free.host, args.disk_mem if args.disk_mem is not None else free.disk)
    base = policy_from_args(args, gpu_batch_size=1, num_gpu_batches=1, percent=[100, 0, 100, 0, 100, 0])
    gbs = None if args.gpu_batch_size == "auto" else args.gpu_batch_size
    ngb = None if args.num_gpu_batches == "auto" else args.num_gpu_batches
    if profile is None:
        from .profile import profile_for_run
        profile = profile_for_run(env.offload_dir)
    try:
        best = choose_policy(family, prompt_len or args.prompt_len, gen_len or args.gen_len, limits,
                             profile=profile, base=base, gpu_batch_size=gbs,
                             num_gpu_batches=ngb, graph_op_s=graph_op_s(env), count_on=count_device(env))
    except NoPolicyFits:
        gpu = "no GPU" if limits.gpu is None else f"GPU {limits.gpu / GiB:.1f} GiB"
        raise PolicyError(f"--percent auto: no policy fits {family.info().name} in {gpu}, host "
                          f"{limits.host / GiB:.1f} GiB, disk {limits.disk / GiB:.1f} GiB, even 4-bit and "
                          f"fully offloaded with a GPU batch of 1") from None
    p = best.policy
    print(f"auto policy (this machine's profile): {policy_flags(p)}{' --cpu-cache-compute' if p.cpu_cache_compute else ''}; "
          f"predicted {best.prediction.throughput:.2f} token/s (prefill {best.prediction.prefill_s:.3f} s, "
          f"decode step {best.prediction.decode_step_s:.4f} s)")
    return best


def lm_class_for(model):
    """OptLM or LlamaLM, whichever family the model (name, directory, .gguf, config) belongs to."""
    from .models.registry import resolve_model
    if resolve_model(model).family.family == "opt":
        from .flex_opt import OptLM
        return OptLM
    from .flex_llama import LlamaLM
    return LlamaLM


def open_model(args, policy=None, need_tokenizer: bool = False, workload=None):
    """(model, env) from the shared flags, for the apps (weights cached under --path, default: the
    family's FlexGen default). With --percent auto the policy is chosen for `workload`
    (prompt_len, gen_len; default the flags'). The caller closes both: model.close();
    env.close_copy_threads()."""
    from .models.registry import resolve_model
    from .weights import WeightsError
    cls = lm_class_for(args.model)
    path = args.path or DEFAULT_PATHS[cls.family_name]
    env = env_from_args(args)
    try:
        family = resolve_model(args.model, cls.family_name).family
        prompt_len, gen_len = workload or (args.prompt_len, args.gen_len)
        if policy is None and wants_auto(args):
            policy = choose_auto_policy(args, family, env, prompt_len, gen_len).policy
        policy = policy or policy_from_args(args)
        if not getattr(args, "force", False):   # before any weight is allocated, as flex_* do
            from .optimizer.memory_model import preflight
            preflight(family, policy, prompt_len, gen_len, env)
        lm = cls(args.model, env, path, policy, progress=args.verbose >= 1)
    except BaseException:
        env.close_copy_threads()
        raise
    if need_tokenizer and lm.tokenizer is None:
        lm.close()
        env.close_copy_threads()
        raise WeightsError(f"{args.model}: no tokenizer found next to the checkpoint; text needs one")
    return lm, env


def main_errors(fn, extra=(), interrupted: str = "interrupted"):
    """Run fn; a user error ends the process with one `error:` line and exit status 2, Ctrl-C
    with the `interrupted` line and status 130."""
    try:
        return fn()
    except (*user_errors(), *extra) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)


def show_outputs(tok, output_ids, prompt_len: int) -> None:
    """The first and last sequences' text (FlexGen's "Outputs:" block), or the generated ids of the
    first without a tokenizer."""
    if tok is None:
        print(f"(no tokenizer: generated ids of sequence 0) {output_ids[0, prompt_len:].tolist()}")
        return
    outputs = tok.batch_decode(output_ids[:, prompt_len:], skip_special_tokens=True)
    prompts = tok.batch_decode(output_ids[:, :prompt_len], skip_special_tokens=True)
    show = "Outputs:\n" + 70 * "-" + "\n"
    for i in sorted({0, len(outputs) - 1}):
        show += f"{i}: {prompts[i]}{outputs[i]}\n" + "-" * 70 + "\n"
    print(show)


# FlexGen's --debug-mode fewer_batch timed the prefill and a few decode layers, then projected the
# decode latency to --gen-len (its log says `projected: True`). Here: the prefill and this many
# decode steps, projected the same way.
FEWER_BATCH_DECODE_STEPS = 2


def build_parser(lm_class, default_model, default_path) -> argparse.ArgumentParser:
    parser = FlexGenArgumentParser(prog=f"python3 -m {ENTRY_POINTS[lm_class.family_name]}")
    add_arguments(parser, default_model, default_path)
    return parser


def main(lm_class, default_model, default_path, log_prefix, argv=None):
    args = build_parser(lm_class, default_model, default_path).parse_args(argv)
    if args.debug_mode == "fewer_batch" and args.cut_gen_len is None and args.gen_len > 1 + FEWER_BATCH_DECODE_STEPS:
        args.cut_gen_len = 1 + FEWER_BATCH_DECODE_STEPS
        print(f"--debug-mode fewer_batch: timing the prefill and {FEWER_BATCH_DECODE_STEPS} decode steps; "
              f"decode latency projected to --gen-len {args.gen_len}")
    main_errors(lambda: run(args, lm_class, log_prefix))
