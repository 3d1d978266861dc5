"""python3 -m flexgen.optimizer --model M --prompt-len L --gen-len G [--num-prompts N]
    --gpu-mem 24GiB --cpu-mem 110GiB [--disk-mem 500GiB] [--profile PATH] [--top 5]

Prints the best policies found (predicted throughput and memory), each as explicit CLI flags,
without running the model. Exit status 2 with one `error:` line when no policy fits."""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from .memory_model import GiB, parse_size  # noqa: F401  (parse_size: a flag type)


def main(argv=None) -> int:
    from ..models.registry import ModelNotFound, resolve_model
    from ..profile import default_profile_path, load_profile
    from .cost_model import DEFAULT_PROFILE, Workload
    from .memory_model import MachineMemory, _host_available, policy_flags
    from .search import NoPolicyFits, search

    p = argparse.ArgumentParser(prog="python3 -m flexgen.optimizer", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-len", type=int, required=True)
    p.add_argument("--gen-len", type=int, required=True)
    p.add_argument("--num-prompts", type=int, default=None,
                   help="prompts to generate for (default: one block of each policy, as FlexGen benchmarks)")
    p.add_argument("--gpu-mem", type=parse_size, default=None,
                   help="GPU memory limit (default: the profile's GPU memory; none on a CPU-only profile)")
    p.add_argument("--cpu-mem", type=parse_size, default=None, help="host memory limit (default: available now)")
    p.add_argument("--disk-mem", type=parse_size, default=None,
                   help="disk limit for offloaded tensors (default: free space of --offload-dir)")
    p.add_argument("--offload-dir", default="~/flexgen_offload_dir")
    p.add_argument("--profile", default=None, help=f"profile JSON (default: {default_profile_path()})")
    p.add_argument("--top", type=int, default=5)
    args = p.parse_args(argv)

    def fail(msg):
        print(f"error: {msg}", file=sys.stderr)
        return 2

    for name in ("prompt_len", "gen_len", "num_prompts", "top"):
        v = getattr(args, name)
        if v is not None and v < 1:
            return fail(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.profile:
        if not os.path.isfile(os.path.expanduser(args.profile)):
            return fail(f"profile {args.profile} not found (measure one: python3 -m flexgen.profile --out PATH)")
        profile, where = load_profile(args.profile), f"profile {args.profile}"
    else:
        profile = load_profile()
        where = f"profile {default_profile_path()}"
        if profile is None:
            profile, where = DEFAULT_PROFILE, ("built-in default profile: H100 figures from DESIGN.md "
                                               "(measure this machine with python3 -m flexgen.profile)")
    try:
        family = resolve_model(args.model).family
    except (ModelNotFound, OSError) as e:
        return fail(str(e).splitlines()[0])

    gpu = args.gpu_mem
    if gpu is None and profile.get("gpu"):
        gpu = int(profile["gpu"].get("mem_bytes", 80 * 10 ** 9))
    host = args.cpu_mem if args.cpu_mem is not None else _host_available()
    disk = args.disk_mem
    if disk is None:
        d = os.path.expanduser(args.offload_dir)
        while not os.path.exists(d):
            d = os.path.dirname(d) or "."
        disk = shutil.disk_usage(d).free
    limits = MachineMemory(gpu, host, disk)
    work = Workload(args.prompt_len, args.gen_len, args.num_prompts)
    gpu_txt = f"GPU {gpu / GiB:.1f} GiB" if gpu is not None else "no GPU (CPU compute)"
    print(f"{family.info().name}, prompt {args.prompt_len} + gen {args.gen_len}; limits: {gpu_txt}, "
          f"host {host / GiB:.1f} GiB, disk {disk / GiB:.1f} GiB")
    print(f"using {where}")
    try:
        found = search(family, work, limits, profile, top=args.top)
    except NoPolicyFits:
        return fail(f"no policy fits {family.info().name} (prompt {args.prompt_len} + gen {args.gen_len}) in "
                    f"{gpu_txt}, host {host / GiB:.1f} GiB, disk {disk / GiB:.1f} GiB, even with 4-bit "
                    f"weights and cache, everything offloaded and a GPU batch of 1")
    for rank, c in enumerate(found, 1):
        pr, m, pol = c.prediction, c.prediction.memory, c.policy
        flags = policy_flags(pol) + (" --cpu-cache-compute" if pol.cpu_cache_compute else "")
        print(f"{rank}. {pr.throughput:.2f} tok/s (prefill {pr.prefill_s:.3f} s, decode {pr.decode_step_s:.4f} s/step)"
              f"  GPU {m.gpu / GiB:.1f} GiB, pinned {m.pinned / GiB:.1f} GiB, pageable {m.pageable / GiB:.1f} GiB, "
              f"disk {m.disk / GiB:.1f} GiB")
        print(f"   {flags}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
