"""CUDA-graph decode (flexgen/engine/graphs.py) on the GPU, in one call: correctness, then timing.

1. Correctness, tiny random checkpoints (OPT, LLaMA with grouped-query attention, Mistral with a
   sliding window), all on the GPU, fp16, left-padded prompts, 2 GPU batches, 2 blocks, with and
   without stop tokens. Three decode paths: eager (FLEXGEN_CUDA_GRAPHS=0), the static step run
   eagerly (=static) and the captured graphs (=1). Reported: greedy token agreement of graphs
   with eager and with static; the largest logit difference between them under teacher forcing
   (every path fed eager's tokens, so the steps see equal inputs); the graphs' agreement with
   transformers (float32, teacher forced) by the fp16 rule of tests/tiny_models.py.
2. Timing, dummy weights, 512 + 32 tokens, as the CLI's benchmark: P4 (OPT-6.7B, batch 8), V1
   (OPT-6.7B, batch 32), L8 (LLaMA-3-8B, batch 8), all on the GPU, eager against graphs: decode
   step wall time (mean of steps 2.., and step 1, which captures), host time per decode step
   (until the step waits for the device), kernel launches per decode step and per layer
   (torch.profiler: runtime launch calls inside decode steps; a graph replay counts 1),
   throughput as FlexGen prints it, peak GPU memory.

Usage: PYTHONPATH=. python3 benchmarks/cuda_graph_check.py [--skip-timing] [--scenarios P4 V1 L8]
Last line: "cuda_graph_check: PASS" when every correctness check holds (>= 90% token agreement of
graphs with eager and with static, teacher-forced logits within fp16 rounding, transformers'
tokens by the fp16 rule), else "... FAIL" (exit 1). Expected: graphs = static exactly (100%, 0).
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import tiny_models as T  # noqa: E402
from flexgen.cli import lm_class_for  # noqa: E402
from flexgen.engine import graphs as G  # noqa: E402
from flexgen.engine import schedule  # noqa: E402
from flexgen.flex_opt import ExecutionEnv, Policy  # noqa: E402

TINY = ["opt-tiny", "llama-tiny-gqa", "mistral-tiny-swa"]
SCENARIOS = {  # id: (model, gpu batch size)
    "P4": ("facebook/opt-6.7b", 8),
    "V1": ("facebook/opt-6.7b", 32),
    "L8": ("meta-llama/Meta-Llama-3-8B", 8),
    "S": ("facebook/opt-125m", 4),   # a quick smoke run of this script (not in the default set)
}
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
            "cudaMemcpyAsync", "cudaMemsetAsync")


class Recorder:
    """Every logits tensor the block's emit sees, in call order (float32, on the CPU)."""

    def __init__(self):
        self.calls = None
        base = schedule._Block.emit
        rec = self

        def emit(blk, logits, k, i):
            if rec.calls is not None:
                rec.calls.append(logits[:, -1].float().cpu())
            return base(blk, logits, k, i)

        schedule._Block.emit = emit

    def __enter__(self):
        self.calls = []
        return self.calls

    def __exit__(self, *exc):
        self.calls = None


def set_mode(mode):
    os.environ[G.ENV_VAR] = mode


def correctness(work, dev):
    """dev "cpu" checks this script itself: "graphs" are then the static step (nothing to capture)."""
    graph = "1" if dev.startswith("cuda") else "static"
    ok = True
    rec = Recorder()
    print(f"== correctness: tiny checkpoints on {dev} ({'fp16' if graph == '1' else 'float32'})")
    print(f"{'model':18} {'stop':5} {'tokens graph=eager':>18} {'graph=static':>12} {'max|dlogit| g-e':>16} "
          f"{'g-s':>9} {'scale':>7} {'graph vs HF':>12}")
    for name in TINY:
        ckpt = T.build_checkpoint(name, os.path.join(work, "ckpt", name))
        ref = T.load_reference(ckpt)
        pad, family = T.pad_id_of(name), T.family_of(name)
        policy = Policy(4, 2, 100, 0, 100, 0, 100, 0)
        prompts = T.make_prompts(2 * policy.block_size, 16, 320, pad, seed=11)   # two blocks, left-padded
        for use_stop in (False, True):
            env = ExecutionEnv.create(os.path.join(work, "off"), device=dev)
            lm = lm_class_for(ckpt)(ckpt, env, os.path.join(work, "wc"), policy, progress=False)
            try:
                set_mode("0")
                free = lm.generate(prompts, max_new_tokens=16)
                stop = sorted({int(free[0, 20]), int(free[3, 25])}) if use_stop else None
                outs, logits = {}, {}
                for mode in ("0", "static", "1"):
                    set_mode(graph if mode == "1" else mode)
                    outs[mode] = lm.generate(prompts, max_new_tokens=16, stop=stop)
                    if mode == "1" and graph == "1":
                        assert lm.runner.graphs.key is not None and lm.runner.graphs.batches[0].graph is not None, \
                            "the graph path did not run"
                cont = outs["0"][:, 16:]
                for mode in ("0", "static", "1"):   # teacher forced on eager's tokens
                    set_mode(graph if mode == "1" else mode)
                    with rec as calls:
                        lm.score_continuation(prompts, cont)
                    logits[mode] = torch.stack(calls)
            finally:
                lm.close()
                env.close_copy_threads()
            gen = {m: o[:, 16:] for m, o in outs.items()}
            agree_e = float((gen["1"] == gen["0"]).mean())
            agree_s = float((gen["1"] == gen["static"]).mean())
            d_e = float((logits["1"] - logits["0"]).abs().max())
            d_s = float((logits["1"] - logits["static"]).abs().max())
            scale = max(1.0, float(logits["0"].abs().max()))
            cmp = T.compare_to_reference(ref, family, outs["1"], 16, pad, tuple(stop or ()))
            try:
                T.assert_matches_reference(cmp, "cuda" if graph == "1" else "cpu", what=name)
                hf = f"{cmp.agreement:.1%} ok"
            except AssertionError as e:
                hf, ok = f"{cmp.agreement:.1%} FAIL", False
                print("   ", e)
            # graphs replay the static step's kernels (expected: the same tokens, logits equal or
            # within a rounding); eager differs by the fp16 rounding of the longer (masked)
            # reductions, which may flip a near tie (and the rest of that row)
            row_ok = min(agree_s, agree_e) >= 0.9 and d_s <= 1e-2 * scale and d_e <= 2e-2 * scale
            ok &= row_ok
            print(f"{name:18} {str(use_stop):5} {agree_e:>18.1%} {agree_s:>12.1%} {d_e:>16.3g} {d_s:>9.3g} "
                  f"{scale:>7.1f} {hf:>12} {'' if row_ok else '  <-- FAIL'}")
    set_mode("1")
    return ok


def profile_decode(lm, ids):
    """Kernel launches (runtime calls) per decode step, from torch.profiler over one generate()."""
    runner = lm.runner
    base = runner.run_step

    def run_step(state, i, hidden_in=None):
        if i == 0:
            return base(state, i, hidden_in)
        with torch.profiler.record_function("flexgen_decode_step"):
            return base(state, i, hidden_in)

    runner.run_step = run_step
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            lm.generate(ids, max_new_tokens=32)
    finally:
        del runner.run_step
    # host-side events only (the annotation also appears on the GPU's timeline)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    steps = [(e.time_range.start, e.time_range.end) for e in events if e.name == "flexgen_decode_step"]
    counts = {}
    for e in events:
        if e.name in LAUNCHES and any(a <= e.time_range.start <= b for a, b in steps):
            counts[e.name] = counts.get(e.name, 0) + 1
    n = max(len(steps), 1)
    return {k: v / n for k, v in counts.items()}


def timed(lm, ids):
    """One generate() of 32 tokens: timings, and host time per decode step (until the step's wait
    for the device, which an eager run_step does last; a replayed step does not wait: until it
    returns, having queued the step)."""
    runner, env = lm.runner, lm.env
    base_step, base_sync = runner.run_step, env.synchronize
    marks = []

    def run_step(state, i, hidden_in=None):
        marks.append([i, time.perf_counter(), None])
        out = base_step(state, i, hidden_in)
        if marks[-1][2] is None:
            marks[-1][2] = time.perf_counter()
        return out

    def synchronize():
        if marks and marks[-1][2] is None:
            marks[-1][2] = time.perf_counter()
        base_sync()

    runner.run_step, env.synchronize = run_step, synchronize
    try:
        if env.is_cuda:
            torch.cuda.reset_peak_memory_stats(env.device)
        lm.generate(ids, max_new_tokens=32)
    finally:
        del runner.run_step, env.synchronize
    host = [b - a for i, a, b in marks if i > 0 and b is not None]
    return dict(lm.timings), host, torch.cuda.max_memory_allocated(env.device) if env.is_cuda else 0


def timing(work, which, dev):
    print("\n== timing: dummy weights, all on the GPU, 512 + 32 tokens, fp16")
    print(f"{'id':3} {'path':6} {'step ms':>8} {'step1 ms':>9} {'host ms':>8} {'launch/step':>11} {'/layer':>7} "
          f"{'prefill s':>9} {'tok/s':>8} {'peak GiB':>9}")
    for sid in which:
        model, gbs = SCENARIOS[sid]
        policy = Policy(gbs, 1, 100, 0, 100, 0, 100, 0)
        env = ExecutionEnv.create(os.path.join(work, "off"), device=dev)
        lm = lm_class_for(model)(model, env, "_DUMMY_", policy, progress=False)
        try:
            rng = np.random.default_rng(0)
            ids = rng.integers(100, lm.info.vocab_size, size=(gbs, 512))
            layers = lm.info.num_layers
            set_mode("0")
            lm.generate(ids[:, -32:], max_new_tokens=2)     # warm-up (as the CLI's, plus one decode step)
            for mode, label in (("0", "eager"), ("1" if env.is_cuda else "static", "graphs")):
                set_mode(mode)
                t, host, peak = timed(lm, ids)
                steps = t["decode"]
                launches = profile_decode(lm, ids)
                total = sum(launches.values())
                tput = gbs * 32 / (sum(t["prefill"]) + sum(steps))
                print(f"{sid:3} {label:6} {np.mean(steps[1:]) * 1e3:>8.2f} {steps[0] * 1e3:>9.2f} "
                      f"{np.mean(host[1:]) * 1e3:>8.2f} {total:>11.1f} {total / layers:>7.2f} "
                      f"{sum(t['prefill']):>9.3f} {tput:>8.1f} {peak / 2**30:>9.3f}")
                print("    launch calls per decode step: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in sorted(launches.items())))
            # steady state: a second block of the same shape reuses the captured graphs
            t, host, _ = timed(lm, ids)
            steps = t["decode"]
            print(f"{sid:3} {'reuse':6} {np.mean(steps[1:]) * 1e3:>8.2f} {steps[0] * 1e3:>9.2f} "
                  f"{np.mean(host[1:]) * 1e3:>8.2f} {'':>11} {'':>7} {sum(t['prefill']):>9.3f} "
                  f"{gbs * 32 / (sum(t['prefill']) + sum(steps)):>8.1f}")
        finally:
            lm.close()
            env.close_copy_threads()
            if env.is_cuda:
                torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--scenarios", nargs="+", default=["P4", "V1", "L8"], choices=list(SCENARIOS))
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to check this script (no graphs there)")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("cuda_graph_check needs a CUDA device")
    torch.set_num_threads(min(8, torch.get_num_threads()))
    work = tempfile.mkdtemp(prefix="flexgen-graph-check-")
    ok = correctness(work, a.device)
    if not a.skip_timing:
        timing(work, a.scenarios, a.device)
    print("cuda_graph_check:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
