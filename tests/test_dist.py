"""Pipeline parallelism (flexgen/dist) on the CPU over gloo: 2 and 3 ranks give the same greedy
tokens as one process for both families and several placements; the original FlexGen's launch
flags and torchrun both run the CLI; a rank that dies or hangs ends every rank with one clear
error within the timeout, and the survivors' offload files are gone.

Each launch starts real processes (a few seconds each on a small machine), so every launch runs
many cases: tests/dist_worker.py loops over a list of them inside one process group."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tiny_models as T
from conftest import DEVICE_TYPE, lm_class

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

pytestmark = pytest.mark.skipif(DEVICE_TYPE != "cpu", reason="the pipeline tests run their ranks on the CPU")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _wait_all(procs, timeout):
    t0 = time.monotonic()
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a rank did not end within the timeout (hang)")
        outs.append((p.returncode, out, err))
    return outs, time.monotonic() - t0


# ---- the stage split ---------------------------------------------------------------------------

def test_stage_split_balanced_by_weight_bytes():
    from flexgen.dist.stages import StageError, StageFamily, layer_bytes, split_stages
    from flexgen.models.registry import resolve_model
    from flexgen.optimizer.memory_model import estimate_memory
    family = resolve_model("facebook/opt-30b").family
    layers = family.layers()
    for n in (2, 3, 4):
        ranges = split_stages(layers, n)
        assert ranges[0][0] == 0 and ranges[-1][1] == len(layers)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert layers[ranges[0][0]].kind == "embed" and layers[ranges[-1][1] - 1].kind == "head"
        assert all(layers[lo].kind in ("embed", "attention") for lo, _ in ranges)   # whole blocks
        sizes = [sum(layer_bytes(x) for x in layers[lo:hi]) for lo, hi in ranges]
        block = layer_bytes(layers[1]) + layer_bytes(layers[2])
        assert max(sizes) - min(sizes) <= block, sizes
    # each rank's memory check counts its own share: the stages' weights add up to the model's
    from flexgen.policy import Policy
    pol = Policy(4, 1, 0, 100, 100, 0, 100, 0)
    whole = estimate_memory(family, pol, 512, 32, True).parts["weights"]["cpu"]
    parts = [estimate_memory(StageFamily(family, r), pol, 512, 32, True).parts["weights"]["cpu"]
             for r in split_stages(layers, 3)]
    assert sum(parts) == whole
    with pytest.raises(StageError, match="13 pipeline stages need at least 13 transformer blocks; this model has 12"):
        split_stages(resolve_model("facebook/opt-125m").family.layers(), 13)


# ---- same tokens as one process -----------------------------------------------------------------

def _reference(zoo, open_lm, case, prompts):
    pol = T.make_policy(case["placement"], case.get("gbs", 2), **case.get("overrides", {}))
    with open_lm(case["name"], pol) as lm:
        return lm.generate(prompts, max_new_tokens=case["gen_len"], stop=case.get("stop"))


def _run_cases(zoo, open_lm, tmp_path, world, cases, timeout=150):
    """Run the cases on `world` ranks (tests/dist_worker.py) and check rank 0's outputs against
    one process (computed here while the ranks run); returns the outputs by id."""
    specs = []
    for c in cases:
        family, kw = T.SPECS[c["name"]]
        prompts = T.make_prompts(c.get("n", 9), 10, kw["vocab_size"], T.pad_id_of(c["name"]), seed=c.get("seed", 0))
        path = tmp_path / f"{c['id']}-prompts.npy"
        np.save(path, prompts)
        specs.append(dict(c, family=family, model=zoo.checkpoint(c["name"]), cache_root=zoo.cache_root,
                          prompts=str(path)))
        c["_prompts"] = prompts
        # converted here, before the ranks and the reference below read the same weight cache
        lm_class(family).prepare_weight_cache(zoo.checkpoint(c["name"]), zoo.cache_root, torch.float32)
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(specs))
    port = _port()
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "dist_worker.py"), "--port", str(port),
                               "--rank", str(r), "--world-size", str(world), "--cases", str(cases_file),
                               "--out", str(tmp_path)], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    try:
        refs = {c["id"]: _reference(zoo, open_lm, c, c["_prompts"]) for c in cases}
    finally:
        results, _ = _wait_all(procs, timeout)
    for r, (rc, out, err) in enumerate(results):
        assert rc == 0, f"rank {r} failed ({rc}):\n{err[-3000:]}"
    outs = {c["id"]: np.load(tmp_path / f"{c['id']}.npy") for c in cases}
    for c in cases:
        np.testing.assert_array_equal(outs[c["id"]], refs[c["id"]], err_msg=f"{c}")
        if c.get("stop") is None:   # the models are worth testing: not one token repeated
            assert T.distinct_generated(refs[c["id"]], 10) >= 3
    return outs


def _stop_token(zoo, open_lm, name, placement):
    """A token that the model emits early for some prompts but not all (so stopping matters)."""
    family, kw = T.SPECS[name]
    prompts = T.make_prompts(9, 10, kw["vocab_size"], T.pad_id_of(name), seed=3)
    with open_lm(name, T.make_policy(placement)) as lm:
        out = lm.generate(prompts, max_new_tokens=8)
    gen = out[:, 10:13]
    vals, counts = np.unique(gen, return_counts=True)
    return int(vals[np.argmax(counts)])


def test_one_rank_pipeline_in_process(zoo, open_lm, offload_dir):
    """World size 1 (no launcher): the same loop, the ring closed in memory."""
    from flexgen.dist.comm import Comm, Guard, Launch
    from flexgen.dist.pipeline import PipelineLM
    from flexgen.env import ExecutionEnv
    prompts = T.make_prompts(7, 10, 320, T.pad_id_of("llama-tiny"), seed=2)
    for placement, async_comm, stop in (("mixed_ngb3", True, None), ("cache_cpu", False, [5, 17, 33])):
        pol = T.make_policy(placement)
        with open_lm("llama-tiny", pol) as lm:
            ref = lm.generate(prompts, max_new_tokens=6, stop=stop)
        comm = Comm(Launch(0, 1, 0, None), "cpu", "cpu", Guard(0, 1, 10), 10)
        comm.connect(10)
        env = ExecutionEnv.create(offload_dir, device="cpu")
        model = PipelineLM(lm_class("llama"), zoo.checkpoint("llama-tiny"), env, zoo.cache_root, pol, comm,
                           num_inner_iterations=2, async_comm=async_comm, progress=False)
        try:
            np.testing.assert_array_equal(model.generate(prompts, max_new_tokens=6, stop=stop), ref)
        finally:
            model.close()
            env.close_copy_threads()


def test_two_ranks_match_one_process(zoo, open_lm, tmp_path):
    stop_opt = _stop_token(zoo, open_lm, "opt-tiny", "all_compute")
    stop_llama = _stop_token(zoo, open_lm, "llama-tiny-gqa", "mixed")
    cases = [
        # 9 prompts, blocks of 4, 2 micro-batches: two groups, the last one short
        dict(id="opt_all_compute", name="opt-tiny", placement="all_compute", gen_len=8),
        dict(id="opt_weights_cpu_disk_async", name="opt-tiny", placement="weights_cpu_disk", gen_len=8,
             M=3, **{"async": True}),
        dict(id="opt_cache_cpu_attn", name="opt-tiny", placement="cache_cpu_cpu_attn", gen_len=8, M=1),
        dict(id="opt_compressed_ngb3", name="opt-tiny", placement="mixed_ngb3", gen_len=8, n=12,
             overrides=dict(compress_weight=True, compress_cache=True)),
        dict(id="opt_stop", name="opt-tiny", placement="all_compute", gen_len=8, stop=stop_opt, seed=3, M=2),
        dict(id="opt_proj_disk", name="opt-tiny-proj", placement="disk_no_overlap_no_sep", gen_len=6),
        dict(id="llama_mixed_stop_async", name="llama-tiny-gqa", placement="mixed", gen_len=8, stop=stop_llama,
             seed=3, **{"async": True}),
        dict(id="llama_cache_cpu", name="llama-tiny", placement="cache_cpu", gen_len=8, M=4),
        # every sequence stops at its first token: each micro-batch leaves the pipeline early
        dict(id="opt_all_stop", name="opt-tiny", placement="all_compute", gen_len=8, stop=list(range(320)), M=3),
    ]
    outs = _run_cases(zoo, open_lm, tmp_path, 2, cases)
    assert (outs["opt_all_stop"][:, 11:] == T.pad_id_of("opt-tiny")).all()
    stopped = outs["opt_stop"][:, 10:]
    assert (stopped == stop_opt).any() and (stopped == T.pad_id_of("opt-tiny")).any()


def test_three_ranks_match_one_process(zoo, open_lm, tmp_path):
    stop = _stop_token(zoo, open_lm, "llama-tiny-gqa", "all_disk_ngb3")
    cases = [
        dict(id="opt_all_tiers_async", name="opt-tiny", placement="mixed_all_tiers", gen_len=8, M=3,
             **{"async": True}),
        dict(id="opt_cpu_attn_ngb3", name="opt-tiny", placement="cache_cpu_disk_cpu_attn_ngb3", gen_len=6, M=2,
             overrides=dict(compress_weight=True)),
        dict(id="llama_disk_stop", name="llama-tiny-gqa", placement="all_disk_ngb3", gen_len=8, stop=stop, seed=3),
        dict(id="llama_all_stop", name="llama-tiny-gqa", placement="mixed", gen_len=6, stop=list(range(320)), M=2),
    ]
    _run_cases(zoo, open_lm, tmp_path, 3, cases)


# ---- the command line --------------------------------------------------------------------------

def _cli_flags(zoo, name, offload, extra=()):
    return ["--model", zoo.checkpoint(name), "--path", zoo.cache_root, "--offload-dir", str(offload),
            "--prompt-len", "8", "--gen-len", "6", "--gpu-batch-size", "2", "--device", "cpu",
            "--cpu-threads", "1", "--no-log", *extra]


def _one_process_ids(zoo, open_lm, name, policy, num_prompts, gen_len=6):
    from flexgen import cli
    with open_lm(name, policy) as lm:
        args = SimpleNamespace(prompt_len=8, prompt=None, chat=False)
        inputs, mask, _ = cli.make_inputs(lm, args, num_prompts)
        return lm.generate(inputs, max_new_tokens=gen_len, attention_mask=mask)


def _printed_ids(stdout):
    m = re.search(r"generated ids of sequence 0\) \[([\d, ]+)\]", stdout)
    assert m, stdout
    return [int(x) for x in m.group(1).split(",")]


def test_original_launch_flags_two_ranks(zoo, open_lm, tmp_path):
    """The original dist_flex_opt's flags: --head-ip --port --rank --local-rank --world-size
    --comm-device gpu (the compute device: the CPU here) --num-inner-iterations --async-comm."""
    port = _port()
    offload = tmp_path / "offload"
    flags = ["--percent", "0", "100", "0", "100", "100", "0", "--num-gpu-batches", "2",
             "--head-ip", "127.0.0.1", "--port", str(port), "--world-size", "2", "--comm-device", "gpu",
             "--num-inner-iterations", "3", "--async-comm", "--comm-timeout", "30"]
    procs = [subprocess.Popen([sys.executable, "-m", "flexgen.dist_flex_opt",
                               *_cli_flags(zoo, "opt-tiny", offload, flags), "--rank", str(r), "--local-rank", str(r)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for r in range(2)]
    results, _ = _wait_all(procs, 120)
    for r, (rc, out, err) in enumerate(results):
        assert rc == 0, f"rank {r}: {err[-3000:]}"
    out0 = results[0][1]
    assert "total throughput:" in out0 and "prefill latency:" in out0 and "peak gpu mem:" in out0
    assert re.search(r"rank 0 \(embed \+ block 0, cpu\): peak gpu mem", out0), out0
    assert re.search(r"rank 1 \(blocks 1-2 \+ head, cpu\): peak gpu mem", out0), out0
    assert "pipeline of 2 ranks, 3 micro-batches of 4 sequences" in out0
    assert results[1][1].strip() == "", "only rank 0 prints"
    from flexgen.policy import Policy
    policy = Policy(2, 2, 0, 100, 0, 100, 100, 0)
    ref = _one_process_ids(zoo, open_lm, "opt-tiny", policy, 12)
    assert _printed_ids(out0) == ref[0, 8:].tolist()
    assert os.listdir(offload) == [], "each rank removes its offload dir"


def test_percent_auto_measures_the_machine_once_then_reads_it(zoo, tmp_path):
    """--percent auto on a pipeline without a profile of this machine: the first rank of the
    machine measures it (rank 0 says so once), the others read what it saved, and each rank
    prints its stage's policy. A second run reads the saved profile, measures nothing, and plans
    and generates exactly the same (auto may compress a stage's weights, so the tokens are
    checked against the first run; stage splits against one process: the tests above)."""
    prof = tmp_path / "profile.json"
    env = dict(_env(), FLEXGEN_PROFILE=str(prof))

    def run():
        flags = ["--percent", "auto", "--head-ip", "127.0.0.1", "--port", str(_port()), "--world-size", "2",
                 "--comm-timeout", "60"]
        procs = [subprocess.Popen([sys.executable, "-m", "flexgen.dist_flex_opt",
                                   *_cli_flags(zoo, "opt-tiny", tmp_path / "offload", flags), "--rank", str(r),
                                   "--local-rank", str(r)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
                 for r in range(2)]
        results, _ = _wait_all(procs, 240)
        for r, (rc, out, err) in enumerate(results):
            assert rc == 0, f"rank {r}: {err[-3000:]}"
        assert results[1][1].strip() == "", "only rank 0 prints"
        out = results[0][1]
        plan = re.findall(r"^  rank \d: --percent .*$", out, flags=re.M)
        assert len(plan) == 2 and "auto policy per rank:" in out, out
        return out, plan, _printed_ids(out)

    out, plan, ids = run()
    assert out.count("no profile of this machine: measured this machine in") == 1, out
    saved = json.loads(prof.read_text())
    assert saved["machine"]["cores"] >= 1 and "cpu" in saved
    out2, plan2, ids2 = run()
    assert "measured this machine" not in out2, out2
    assert json.loads(prof.read_text())["created"] == saved["created"]   # read, not measured again
    assert plan2 == plan and ids2 == ids and len(ids) == 6


def test_torchrun_launch_llama(zoo, open_lm, tmp_path):
    offload = tmp_path / "offload"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()),
           "-m", "flexgen.dist_flex_llama", *_cli_flags(zoo, "llama-tiny-gqa", offload),
           "--percent", "100", "0", "0", "100", "100", "0", "--cpu-cache-compute", "--comm-timeout", "30"]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    ref = _one_process_ids(zoo, open_lm, "llama-tiny-gqa", T.make_policy("cache_cpu_cpu_attn", 2, num_gpu_batches=1), 4)
    assert _printed_ids(p.stdout) == ref[0, 8:].tolist()
    assert "total throughput:" in p.stdout
    assert os.listdir(offload) == []


# ---- failures ------------------------------------------------------------------------------------

# A rank of the CLI that dies (SIGKILL) or hangs at decode step 2 of the benchmark run (the
# warm-up makes one token): `python -c FAULTY_RANK kill|hang [flags]`.
FAULTY_RANK = textwrap.dedent("""
    import os, signal, sys, time
    from flexgen.engine import schedule
    mode, run_step = sys.argv[1], schedule.BlockRunner.run_step
    def faulty(self, state, i, hidden_in=None):
        if i == 2:
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)   # hung: never sends again
        return run_step(self, state, i, hidden_in)
    schedule.BlockRunner.run_step = faulty
    from flexgen.dist_flex_opt import main
    main(sys.argv[2:])
""")


def _launch_with_fault(zoo, tmp_path, world, bad, mode, timeout_s):
    port = _port()
    offload = tmp_path / "offload"
    procs = []
    for r in range(world):
        flags = _cli_flags(zoo, "opt-tiny", offload, ["--percent", "100", "0", "0", "0", "100", "0",
                           "--head-ip", "127.0.0.1", "--port", str(port), "--rank", str(r), "--world-size",
                           str(world), "--comm-device", "cpu", "--comm-timeout", str(timeout_s)])
        head = ([sys.executable, "-c", FAULTY_RANK, mode] if r == bad
                else [sys.executable, "-m", "flexgen.dist_flex_opt"])
        procs.append(subprocess.Popen(head + flags, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=tmp_path))
    return procs, offload


def test_rank_killed_mid_run_ends_every_rank(zoo, tmp_path):
    procs, offload = _launch_with_fault(zoo, tmp_path, 3, 1, "kill", 20)
    results, took = _wait_all(procs, 90)
    codes = [rc for rc, _, _ in results]
    assert codes[1] == -signal.SIGKILL
    assert codes[0] == 2 and codes[2] == 2, [(rc, err[-2000:]) for rc, _, err in results]
    errors = [line for _, _, err in results for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert re.match(r"error: rank \d: lost rank 1 while waiting for .*: its connection closed: it died or exited",
                    errors[0]), errors
    assert all("Traceback" not in err for _, _, err in results)
    left = os.listdir(offload)
    assert all(d.startswith("rank1-") for d in left), left   # a SIGKILLed rank cannot clean up


def test_silent_peer_times_out(zoo, tmp_path):
    procs, offload = _launch_with_fault(zoo, tmp_path, 2, 1, "hang", 3)
    results, took = _wait_all(procs, 60)
    assert [rc for rc, _, _ in results] == [2, 2], [(rc, err[-2000:]) for rc, _, err in results]
    errors = [line for _, _, err in results for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert re.match(r"error: rank 1 is hung or stopped: rank 0 got no tokens of step \d within 3 s", errors[0]), errors
    assert os.listdir(offload) == []   # the hung rank ended too, and cleaned up
