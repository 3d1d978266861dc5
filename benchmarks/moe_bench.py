"""Issue 19's device measurements: Mixtral-8x7B and Qwen2.5-72B shapes (dummy weights, prompt 512,
generation 32, fp16) under a hard 24 GiB GPU cap (torch.cuda.set_per_process_memory_fraction in
every process that runs a model), beside Hugging Face transformers + Accelerate offloading.

One part per call keeps each call within the device's 10-minute limit:

  PYTHONPATH=. python3 benchmarks/moe_bench.py mixtral       # ours, 4-bit weights all in CPU memory
  PYTHONPATH=. python3 benchmarks/moe_bench.py mixtral-auto  # ours, --percent auto (policy free)
  PYTHONPATH=. python3 benchmarks/moe_bench.py hf            # transformers + accelerate, device_map=auto
  PYTHONPATH=. python3 benchmarks/moe_bench.py qwen72        # ours, Qwen2.5-72B, --percent auto

(several parts in one call run in turn). `mixtral` picks, with the performance model, the best
policy whose weights are all in CPU memory, 4-bit, within the cap; it reports the decode step
against its PCIe floor: the packed bytes of the CPU-resident weights (every expert, all of which a
large block uses) / the pinned host->device bandwidth measured in the same call
(benchmarks/bandwidth.py). `hf` builds MixtralForCausalLM on the meta device, lets
accelerate.infer_auto_device_map place it with max_memory (GPU --hf-gpu-mem, default 20 GiB so
that its activations and KV cache fit under the same 24 GiB hard cap; the rest in CPU memory),
fills the weights with random values where they were placed, dispatch_model()s it, and times a
prefill and decode steps of its own generation loop (KV cache on the GPU); with more than
--hf-budget seconds of decode, the remaining steps are projected from the mean (marked).

Every part prints a short table last and writes $OUT/moe_<part>.json. A profile of the machine
(python3 -m flexgen.profile) makes the predictions and the auto policy this machine's: set
FLEXGEN_PROFILE, or pass --profile to measure one first (about a minute).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import parse, readable  # noqa: E402

GiB = 1 << 30
MIXTRAL = "mistralai/Mixtral-8x7B-v0.1"
QWEN72 = "Qwen/Qwen2.5-72B"

# Runs argv[2:] as `python -m argv[2] ...` with this process's GPU memory capped at argv[1] bytes.
# (Without CUDA, as in a CPU smoke test of this script, it runs uncapped.)
CAPPED = ("import runpy, sys, torch; cap = int(sys.argv[1]); "
          "torch.cuda.is_available() and torch.cuda.set_per_process_memory_fraction("
          "min(1.0, cap / torch.cuda.get_device_properties(0).total_memory), 0); "
          "sys.argv = sys.argv[2:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")


def child_env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH")) if p)
    # P3 of RESULTS.md: without expandable segments a capped run can die of fragmentation
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


def run_capped(a, module, args, timeout):
    cmd = [sys.executable, "-c", CAPPED, str(int(a.gpu_cap * GiB)), module] + args
    print("$", " ".join(cmd[3:]), f"(GPU capped at {a.gpu_cap:g} GiB)", flush=True)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
        text = p.stdout + p.stderr + (f"\nexit status {p.returncode}" if p.returncode else "")
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text = f"{out}\ntimeout after {timeout}s"
    text = readable(text)
    print(text[-3000:], flush=True)
    return text, time.time() - t0


def measured_bandwidth() -> float:
    """Pinned host->device GiB/s, from benchmarks/bandwidth.py in its own process (this one
    must not hold GPU memory while a capped run measures what is free)."""
    p = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bandwidth.py"), "2"],
                       capture_output=True, text=True, timeout=120, env=child_env())
    m = re.search(r"host->device pinned:\s+([0-9.]+) GiB/s", p.stdout)
    if not m:
        raise SystemExit(f"bandwidth measurement failed:\n{p.stdout}{p.stderr}")
    print(p.stdout.strip(), flush=True)
    return float(m.group(1))


def _limits(a):
    import shutil
    from flexgen.optimizer.memory_model import MachineMemory
    os.makedirs(a.offload_dir, exist_ok=True)
    return MachineMemory(int(a.gpu_cap * GiB), int(a.cpu_mem * GiB), shutil.disk_usage(a.offload_dir).free)


def _profile():
    from flexgen.optimizer.cost_model import DEFAULT_PROFILE
    from flexgen.profile import load_profile
    return load_profile() or DEFAULT_PROFILE


def best_cpu_4bit_policy(a, family):
    """The performance model's best policy with every weight in CPU memory, 4-bit, under the caps."""
    from flexgen.optimizer.cost_model import Workload
    from flexgen.optimizer.search import build_grid, search
    grid = build_grid()
    w_cpu = [i for i, w in enumerate(grid.w_opts) if tuple(w) == (0, 100)]
    grid = grid.subset((grid.wi == w_cpu[0]) & (grid.cw == 1))
    return search(family, Workload(a.prompt_len, a.gen_len), _limits(a), _profile(), top=1, grid=grid)[0]


def common(a, model):
    return ["--model", model, "--path", "_DUMMY_", "--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len),
            "--offload-dir", a.offload_dir, "--gpu-mem", f"{a.gpu_cap:g}GiB", "--cpu-mem", f"{a.cpu_mem:g}GiB",
            "--verbose", "1", "--no-log"] + (["--cut-gen-len", str(a.cut_gen_len)] if a.cut_gen_len else [])


def _flags(policy):
    from flexgen.optimizer.memory_model import policy_flags
    return policy_flags(policy).split() + (["--cpu-cache-compute"] if policy.cpu_cache_compute else [])


def _short(model):
    return os.path.basename(os.path.normpath(model))


def _row(what, text, wall, extra=None):
    r = parse(text)
    m = re.search(r"auto policy .*?: (--percent .*?); predicted", text)
    r.update(what=what, wall_s=round(wall), policy=m.group(1) if m else None, ok="total throughput" in text)
    r.update(extra or {})
    b = re.search(r"--gpu-batch-size (\d+) --num-gpu-batches (\d+)", r["policy"] or "")
    if b and not r.get("block"):
        r["block"] = int(b.group(1)) * int(b.group(2))
    return r


def part_mixtral(a):
    from flexgen.models.registry import resolve_model
    from flexgen.optimizer.memory_model import estimate_memory
    family = resolve_model(a.mixtral).family
    best = best_cpu_4bit_policy(a, family)
    pol = best.policy
    cpu_bytes = estimate_memory(family, pol, a.prompt_len, a.gen_len, True).parts["weights"]["cpu"]
    bw = measured_bandwidth() if a.bandwidth is None else a.bandwidth
    floor = cpu_bytes / (bw * GiB)
    print(f"policy: {' '.join(_flags(pol))}; CPU-resident weights {cpu_bytes / GiB:.2f} GiB packed -> "
          f"decode-step floor {floor:.3f} s at {bw:.1f} GiB/s; predicted step {best.prediction.decode_step_s:.3f} s",
          flush=True)
    text, wall = run_capped(a, "flexgen.flex_llama", common(a, a.mixtral) + _flags(pol), a.timeout)
    r = _row(f"ours {_short(a.mixtral)}, 4-bit weights in CPU memory", text, wall,
             dict(policy=" ".join(_flags(pol)), block=pol.block_size, floor_step=floor, bandwidth_gib_s=bw,
                  cpu_weight_gib=cpu_bytes / GiB))
    if r["decode latency"]:
        r["floor decode tok/s"] = pol.block_size / floor
    return [r]


def part_mixtral_auto(a):
    args = common(a, a.mixtral) + ["--percent", "auto", "--gpu-batch-size", "auto", "--num-gpu-batches", "auto"]
    text, wall = run_capped(a, "flexgen.flex_llama", args, a.timeout)
    return [_row(f"ours {_short(a.mixtral)}, --percent auto", text, wall)]


def part_qwen72(a):
    args = common(a, a.qwen) + ["--percent", "auto", "--gpu-batch-size", "auto", "--num-gpu-batches", "auto"]
    text, wall = run_capped(a, "flexgen.flex_llama", args, a.timeout)
    return [_row(f"ours {_short(a.qwen)}, --percent auto", text, wall)]


def part_hf(a):
    cmd = [sys.executable, os.path.abspath(__file__), "_hf_child", "--hf-gpu-mem", str(a.hf_gpu_mem),
           "--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len),
           "--hf-batch", str(a.hf_batch), "--hf-budget", str(a.hf_budget), "--cpu-mem", str(a.cpu_mem),
           "--gpu-cap", str(a.gpu_cap), "--hf-model", a.hf_model, "--hf-device", a.hf_device]
    cmd += ["--hf-experts", a.hf_experts] if a.hf_experts else []
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=child_env())
        text = p.stdout + p.stderr + (f"\nexit status {p.returncode}" if p.returncode else "")
    except subprocess.TimeoutExpired as e:
        text = f"{e.stdout or ''}\ntimeout after {a.timeout}s"
    print(readable(text)[-3000:], flush=True)
    m = re.search(r"^HF_RESULT (.*)$", text, re.M)
    r = dict(what=f"HF transformers + accelerate {_short(a.hf_model)}, device_map=auto",
             wall_s=round(time.time() - t0), ok=m is not None)
    if m:
        r.update(json.loads(m.group(1)))
    return [r]


def hf_child(a):
    """Runs in its own process: the GPU cap, then transformers + accelerate on dummy weights."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM, MixtralConfig

    from flexgen.engine.weight_store import fill_dummy
    from flexgen.models.registry import resolve_model
    cuda = a.hf_device == "cuda"
    dev = 0 if cuda else "cpu"
    if cuda:
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, a.gpu_cap * GiB / torch.cuda.get_device_properties(0).total_memory), 0)
    c = resolve_model(a.hf_model).family.config
    cfg = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.n_head,
                        num_key_value_heads=c.num_key_value_heads, num_local_experts=c.num_local_experts,
                        num_experts_per_tok=c.num_experts_per_tok, max_position_embeddings=c.max_seq_len,
                        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=False)
    t0 = time.time()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    model.eval()
    max_memory = {dev: f"{a.hf_gpu_mem:g}GiB", "cpu": f"{a.cpu_mem:g}GiB"} if cuda else {"cpu": f"{a.cpu_mem:g}GiB"}
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules,
                                       dtype=torch.float16)

    def placed(name):
        parts = name.split(".")
        for i in range(len(parts), -1, -1):
            key = ".".join(parts[:i])
            if key in device_map:
                return device_map[key]
        raise KeyError(name)

    on = {}
    for name, p in list(model.named_parameters()):
        where = placed(name)
        t = torch.empty(p.shape, dtype=torch.float16, device=where)
        fill_dummy(t, "ones" if "norm" in name else "normal")
        set_module_tensor_to_device(model, name, where, value=t)
        on[str(where)] = on.get(str(where), 0) + t.numel() * 2
    for name, b in list(model.named_buffers()):   # rotary inv_freq: recomputed off the meta device
        if b.is_meta:
            mod_name = name.rsplit(".", 1)[0]
            mod = model.get_submodule(mod_name)
            fresh = type(mod)(cfg)
            for bn, bv in fresh.named_buffers():
                set_module_tensor_to_device(model, f"{mod_name}.{bn}", placed(f"{mod_name}.{bn}"), value=bv)
    model = dispatch_model(model, device_map=device_map, main_device=dev if cuda else None)
    build_s = time.time() - t0
    print(f"built in {build_s:.0f} s; weights placed: " +
          ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in on.items()), flush=True)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    B = a.hf_batch
    ids = torch.randint(100, cfg.vocab_size, (B, a.prompt_len), generator=torch.Generator().manual_seed(0)).to(dev)
    if a.hf_experts:
        model.set_experts_implementation(a.hf_experts)
    with torch.no_grad():
        try:   # a short warm-up, which also checks transformers' default expert kernels run here
            model(input_ids=ids[:, :8], use_cache=False, logits_to_keep=1)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            print(f"experts implementation {model.config._experts_implementation!r} failed ({e}); using eager",
                  flush=True)
            model.set_experts_implementation("eager")
        print(f"experts implementation: {model.config._experts_implementation}", flush=True)
        sync()
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        sync()
        prefill = time.perf_counter() - t
        past, steps = getattr(out, "cache", None) or out.past_key_values, []
        import inspect
        cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        for _ in range(a.gen_len - 1):
            t = time.perf_counter()
            out = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **{cache_kw: past})
            nxt, past = out.logits[:, -1:].argmax(-1), getattr(out, "cache", None) or out.past_key_values
            sync()
            steps.append(time.perf_counter() - t)
            if sum(steps) > a.hf_budget:
                break
    GEN = a.gen_len
    decode = sum(steps) / len(steps) * (GEN - 1)
    peak = torch.cuda.max_memory_allocated(0) / GiB if cuda else 0.0
    res = {"prefill latency": prefill, "decode latency": decode, "decode steps measured": len(steps),
           "projected": len(steps) < GEN - 1, "total throughput": B * GEN / (prefill + decode),
           "decode throughput": B * (GEN - 1) / decode, "peak gpu mem": peak, "block": B,
           "policy": f"device_map=auto, max_memory GPU {a.hf_gpu_mem:g} GiB (hard cap {a.gpu_cap:g}), "
                     f"experts {model.config._experts_implementation}",
           "gpu_weight_gib": sum(v for k, v in on.items() if k != "cpu") / GiB,
           "cpu_weight_gib": on.get("cpu", 0) / GiB, "build_s": build_s}
    print("HF_RESULT " + json.dumps(res), flush=True)


PARTS = {"mixtral": part_mixtral, "mixtral-auto": part_mixtral_auto, "hf": part_hf, "qwen72": part_qwen72}


def table(rows, GEN):
    print(f"\n{'run':52} {'ok':>3} {'block':>5} {'prefill s':>9} {'decode s':>8} {'step s':>7} {'floor s':>7} "
          f"{'tok/s':>8} {'GPU GB':>6} | policy")
    for r in rows:
        f = lambda k, w=3: "-" if r.get(k) is None else f"{r[k]:.{w}f}"  # noqa: E731
        step = None if not r.get("decode latency") else r["decode latency"] / (GEN - 1)
        proj = "*" if r.get("projected") else ""
        print(f"{r['what'][:52]:52} {'yes' if r.get('ok') else 'NO':>3} {r.get('block') or '-':>5} "
              f"{f('prefill latency'):>9} {f('decode latency'):>8} {'-' if step is None else f'{step:.3f}':>7} "
              f"{f('floor_step'):>7} {f('total throughput', 2) + proj:>8} {f('peak gpu mem', 2):>6} | "
              f"{r.get('policy') or ''}")
    if any(r.get("projected") for r in rows):
        print("* decode projected from the measured steps (HF: more than --hf-budget seconds of decode)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=list(PARTS) + ["_hf_child"])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--cut-gen-len", type=int, default=None,
                    help="ours: run this many tokens and project the rest of --gen-len (FlexGen's flag)")
    ap.add_argument("--gpu-cap", type=float, default=24.0, help="hard GPU memory cap, GiB")
    ap.add_argument("--cpu-mem", type=float, default=110.0, help="host memory for the policy search / HF, GiB")
    ap.add_argument("--offload-dir", default="/tmp/flexgen_moe_offload")
    ap.add_argument("--timeout", type=int, default=560, help="seconds per run")
    ap.add_argument("--profile", action="store_true", help="measure this machine's profile first")
    ap.add_argument("--mixtral", default=MIXTRAL, help="the MoE model (a known name; a tiny dir for a smoke test)")
    ap.add_argument("--qwen", default=QWEN72)
    ap.add_argument("--bandwidth", type=float, help="pinned host->device GiB/s instead of measuring it")
    ap.add_argument("--hf-model", default=MIXTRAL)
    ap.add_argument("--hf-gpu-mem", type=float, default=20.0, help="accelerate's max_memory for the GPU, GiB")
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--hf-budget", type=float, default=200.0, help="seconds of HF decode before projecting")
    ap.add_argument("--hf-experts", help="transformers' experts implementation (default: its own choice)")
    ap.add_argument("--hf-device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test of the HF path")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    if a.parts == ["_hf_child"]:
        return hf_child(a)
    if a.profile and not os.environ.get("FLEXGEN_PROFILE"):
        path = os.path.join(a.out, "profile.json")
        subprocess.run([sys.executable, "-m", "flexgen.profile", "--out", path, "--offload-dir", a.offload_dir],
                       timeout=120, env=child_env())
        os.environ["FLEXGEN_PROFILE"] = path
    rows = []
    for part in a.parts:
        print(f"=== {part}", flush=True)
        got = PARTS[part](a)
        rows += got
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"moe_{part}.json"), "w") as f:
            json.dump(got, f, indent=1, default=str)
    table(rows, a.gen_len)


if __name__ == "__main__":
    main()
