"""Device figures for the data-wrangling app (issue 14): the original FlexGen app's workload
shapes, dummy weights, under a hard 16 GiB GPU cap (T4-sized), ours beside the original FlexGen
0.1.8's flex_opt at the same prompt and generation lengths, batch and policy.

    PYTHONPATH=. python3 benchmarks/data_wrangle_bench.py [SCENARIO ...] [--no-orig] [--timeout S]
    (device; carry .whl_orig, made by bash benchmarks/original_flexgen/setup.sh, for the original)

Scenarios (policies: the original app's T4 scripts, test_batch_query_all_opt{6.7b,30b}.sh):
  FZ67   OPT-6.7B, Fodors-Zagats shape: 189 prompts x 744 tokens, 3 new; --percent 100 0 100 0 100 0, 2 x 1
  FZ30   OPT-30B, same shape; --percent 10 90 0 100 0 100, 20 x 3
  DA30   OPT-30B, DBLP-ACM shape: 200 x 1274, 3 new; --percent 10 90 0 100 0 100, 10 x 5
  FZ30H / DA30H  the same with half the sequences per block (10 x 3, 5 x 5): the T4 policies keep
                 the block's cache in CPU memory, 111 / 138 GB with the weights, beyond a 128 GB host
  FZ30A / DA30A  ours only, --percent auto (gpu batch and count auto) within the 16 GiB cap
Default: FZ67 FZ30 DA30 FZ30A.

Ours: every prompt of the workload through the request layer (flexgen.requests.RequestRunner,
what `data_wrangle --batch_run --pad-to-seq-len L` runs), prompts of exactly L token ids (dummy
weights have no tokenizer), 3 new tokens each (no early stop), the last short block included;
input+output tokens/s = prompts x (L + 3) / wall time of RequestRunner.generate (weights loaded
before). The original: `python3 -m flexgen.flex_opt --prompt-len L --gen-len 3` with the same
policy runs ONE block of gpu_batch_size x num_gpu_batches prompts; its input+output tokens/s is
block x (L + 3) / (prefill + decode latency) from its benchmark block (what its data_wrangle app
gets per full block; that app drops a last partial block). The cap: both processes call
torch.cuda.set_per_process_memory_fraction(16 GiB / card) before any allocation (ours through
--gpu-mem 16GiB). The original's published T4 figures are beside them (a different card).
Prints one table last.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

CAP = "16GiB"
CAP_BYTES = 16 << 30
SCENARIOS = {
    # id: (model, prompts, prompt_len, gen_len, policy flags, the original's T4 figure)
    "FZ67": ("facebook/opt-6.7b", 189, 744, 3, "--percent 100 0 100 0 100 0 --gpu-batch-size 2 --num-gpu-batches 1",
             1281.871),
    "FZ30": ("facebook/opt-30b", 189, 744, 3, "--percent 10 90 0 100 0 100 --gpu-batch-size 20 --num-gpu-batches 3",
             248.287),
    "DA30": ("facebook/opt-30b", 200, 1274, 3, "--percent 10 90 0 100 0 100 --gpu-batch-size 10 --num-gpu-batches 5",
             228.184),
    # The T4 scripts' OPT-30B policies hold the block's KV cache in CPU memory (FZ30 ~61 GB + 50 GB of
    # weights, DA30 ~88 + 50 GB): made for that machine's 200 GB of DRAM. On a 128 GB host the same
    # policies with half as many sequences per block:
    "FZ30H": ("facebook/opt-30b", 189, 744, 3, "--percent 10 90 0 100 0 100 --gpu-batch-size 10 --num-gpu-batches 3",
              248.287),
    "DA30H": ("facebook/opt-30b", 200, 1274, 3, "--percent 10 90 0 100 0 100 --gpu-batch-size 5 --num-gpu-batches 5",
              228.184),
    "FZ30A": ("facebook/opt-30b", 189, 744, 3, "--percent auto --gpu-batch-size auto --num-gpu-batches auto", 248.287),
    "DA30A": ("facebook/opt-30b", 200, 1274, 3, "--percent auto --gpu-batch-size auto --num-gpu-batches auto",
              228.184),
    # a seconds-long check of this script on any machine (CPU included)
    "TINY": ("facebook/opt-125m", 5, 64, 3, "--percent 100 0 100 0 100 0 --gpu-batch-size 2 --num-gpu-batches 1",
             None),
}
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ORIG_SITE = "/tmp/orig"


# ---- ours, one scenario in this process (run as a child: --one ID) ----------------------------------

def run_ours(sid: str) -> None:
    import numpy as np

    from flexgen.cli import add_arguments
    from flexgen.requests import GenerationRequest, RequestRunner, open_model_for_requests
    model, n, plen, glen, policy, _ = SCENARIOS[sid]
    parser = argparse.ArgumentParser()
    add_arguments(parser, model, None)
    args = parser.parse_args(["--model", model, "--path", "_DUMMY_", "--gpu-mem", CAP, "--prompt-len", str(plen),
                              "--gen-len", str(glen), "--offload-dir", "/tmp/dw_bench_offload", "--verbose", "0"]
                             + policy.split())
    t0 = time.perf_counter()
    lm, env = open_model_for_requests(args, plen, glen, need_tokenizer=False)
    print(f"policy: {lm.policy}", flush=True)
    print(f"weights ready in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        rng = np.random.default_rng(0)
        vocab = lm.info.vocab_size
        pad = lm.info.pad_token_id
        reqs = []
        for _ in range(n):
            ids = rng.integers(100, vocab, size=plen)
            ids[ids == pad] = pad + 1
            reqs.append(GenerationRequest(ids.tolist(), max_new_tokens=glen, stop_at_eos=False))
        runner = RequestRunner(lm, pad_to_seq_len=plen, progress=True)   # the log shows how far a cut run got
        warm = RequestRunner(lm, progress=False)   # one short block first (kernels, allocator)
        warm.generate([GenerationRequest(r.prompt[:32], max_new_tokens=1, stop_at_eos=False) for r in reqs[:1]])
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = runner.generate(reqs)
        secs = time.perf_counter() - t0
        bad = [r.error for r in res if r.error]
        assert not bad, bad[:3]
        outs = sum(len(r.completions[0].token_ids) for r in res)
        assert outs == n * glen, outs
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        print(f"RESULT ours {sid}: {n} prompts x {plen} + {glen} new, {runner.stats['blocks']} blocks, "
              f"{secs:.3f} s, {n * (plen + glen) / secs:.1f} input+output tokens/s, peak GPU {peak:.2f} GiB, "
              f"retries {runner.stats['retries']}", flush=True)
    finally:
        lm.close()
        env.close_copy_threads()


# ---- the original -----------------------------------------------------------------------------------

ORIG_WRAPPER = """
import runpy, sys, torch
torch.cuda.set_per_process_memory_fraction(min(1.0, {cap} / torch.cuda.get_device_properties(0).total_memory))
import flexgen
assert flexgen.__file__.startswith("{site}/"), flexgen.__file__
sys.argv = ["flex_opt"] + sys.argv[1:]
runpy.run_module("flexgen.flex_opt", run_name="__main__")
"""


def setup_orig() -> str | None:
    whl = os.path.join(REPO, ".whl_orig")
    if not os.path.isdir(whl):
        return "no .whl_orig (bash benchmarks/original_flexgen/setup.sh here, then carry .whl_orig)"
    if not os.path.isfile(os.path.join(ORIG_SITE, "flexgen", "flex_opt.py")):
        wheels = [os.path.join(whl, f) for f in os.listdir(whl) if f.endswith(".whl")]
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--target", ORIG_SITE] + wheels, capture_output=True, text=True)
        if r.returncode != 0:
            return "installing the original failed: " + r.stderr[-300:]
    return None


def orig_env():
    hf = os.path.join(REPO, ".whl_orig", "hf_home")
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(PYTHONPATH=ORIG_SITE, PYTHONUNBUFFERED="1", HF_HOME=hf, HF_HUB_CACHE=os.path.join(hf, "hub"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def run_orig(sid: str, timeout: int, logdir: str):
    model, n, plen, glen, policy, _ = SCENARIOS[sid]
    work = "/tmp/dw_orig_run"   # an empty folder: our flexgen must not be importable
    os.makedirs(work, exist_ok=True)
    cmd = [sys.executable, "-c", ORIG_WRAPPER.format(cap=CAP_BYTES, site=ORIG_SITE), "--model", model,
           "--path", "_DUMMY_", "--prompt-len", str(plen), "--gen-len", str(glen),
           "--offload-dir", "/tmp/dw_orig_offload", "--log-file", os.path.join(work, f"{sid}.log")] + policy.split()
    text, rc = _run(cmd, timeout, cwd=work, env=orig_env())
    with open(os.path.join(logdir, f"orig_{sid}.txt"), "w") as f:
        f.write(text)
    m = [re.search(rf"{k}: ([0-9.]+)", text) for k in ("prefill latency", "decode latency", "peak gpu mem")]
    if rc != 0 or not all(m[:2]):
        return None, f"rc {rc}: " + " | ".join(text.strip().splitlines()[-2:])[-200:]
    gbs = int(re.search(r"--gpu-batch-size (\d+)", policy).group(1))
    ngb = int(re.search(r"--num-gpu-batches (\d+)", policy).group(1))
    secs = float(m[0].group(1)) + float(m[1].group(1))
    return gbs * ngb * (plen + glen) / secs, (f"block {gbs}x{ngb}: {secs:.3f} s, peak GPU "
                                              f"{m[2].group(1) if m[2] else '?'} GB")


def _run(cmd, timeout, **kw):
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
        return p.stdout + p.stderr + f"\n[wall {time.time() - t0:.1f} s]", p.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return out + f"\n[timeout after {timeout} s]", 124


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scenarios", nargs="*", default=["FZ67", "FZ30", "DA30", "FZ30A"])
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-orig", action="store_true", help="ours only")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per run")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/dw_bench"))
    a = ap.parse_args()
    if a.one:
        return run_ours(a.one)
    os.makedirs(a.out, exist_ok=True)
    unknown = [s for s in a.scenarios if s not in SCENARIOS]
    if unknown:
        sys.exit(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    orig_problem = None if a.no_orig else setup_orig()
    rows = []
    for sid in a.scenarios:
        model, n, plen, glen, policy, t4 = SCENARIOS[sid]
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        text, rc = _run([sys.executable, os.path.abspath(__file__), "--one", sid], a.timeout, cwd=REPO, env=env)
        with open(os.path.join(a.out, f"ours_{sid}.txt"), "w") as f:
            f.write(text)
        m = re.search(r"RESULT ours \S+: (.*)", text)
        pm = re.search(r"auto policy[^\n]*", text)
        ours = float(re.search(r"([0-9.]+) input\+output", m.group(1)).group(1)) if m else None
        note = m.group(1) if m else f"rc {rc}: " + " | ".join(text.strip().splitlines()[-2:])[-200:]
        if pm:
            note += f" [{pm.group(0)[:160]}]"
        print(f"--- {sid} ours: {note}", flush=True)
        orig, onote = (None, "not run" if a.no_orig else orig_problem)
        if not a.no_orig and orig_problem is None and "auto" not in policy:
            orig, onote = run_orig(sid, a.timeout, a.out)
            print(f"--- {sid} original: {onote}", flush=True)
        rows.append((sid, model.split("/")[-1], f"{n} x {plen} + {glen}", policy, ours, orig, t4))
    print("\n| id | model | workload | policy | ours tok/s | original 0.1.8 tok/s (same call) | original on T4 (published) |")
    print("|---|---|---|---|---|---|---|")
    for sid, model, wl, policy, ours, orig, t4 in rows:
        f = lambda x: f"{x:.1f}" if x else "-"
        print(f"| {sid} | {model} | {wl} | `{policy}` | {f(ours)} | {f(orig)} | {t4} |")
    print(f"(input+output tokens/s, dummy weights, GPU capped at {CAP}; logs in {a.out})")


if __name__ == "__main__":
    main()
