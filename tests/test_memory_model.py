"""The memory model against what the engine really allocates, and the pre-flight check."""
import os
import subprocess
import sys

import pytest

import tiny_models
from conftest import DEVICE_TYPE
from flexgen.optimizer.memory_model import (MachineMemory, MemoryFitError, estimate_memory, preflight,
                                            shortfalls, suggest_policy)

pytestmark = pytest.mark.skipif(DEVICE_TYPE != "cpu", reason="CPU allocations")


@pytest.mark.parametrize("placement", ["weights_cpu_disk", "mixed_all_tiers", "all_disk"])
@pytest.mark.parametrize("compress", [False, True])
def test_weight_and_cache_bytes_per_tier_match_allocations(open_lm, offload_dir, placement, compress):
    name = "llama-tiny-gqa"
    policy = tiny_models.make_policy(placement, compress_weight=compress, compress_cache=compress)
    with open_lm(name, policy) as lm:
        est = estimate_memory(lm.family, policy, 10, 6, is_cuda=False)
        for tier in ("gpu", "cpu", "disk"):
            assert est.parts["weights"].get(tier, 0) == pytest.approx(lm.weights.nbytes_on(tier), rel=0.10), tier
        # the cache is allocated per block: measure the offload files while a block runs
        seen = {}

        def on_step(i):
            if i == 0:
                seen["disk"] = sum(os.path.getsize(os.path.join(offload_dir, f)) for f in os.listdir(offload_dir))
        prompts = tiny_models.make_prompts(policy.block_size, 10, 320, 0, seed=0)
        lm.generate(prompts, max_new_tokens=6, on_step=on_step)
        disk_pred = est.parts["weights"].get("disk", 0) + est.parts["cache"].get("disk", 0) + \
            est.parts["act"].get("disk", 0)
        assert disk_pred == pytest.approx(seen["disk"], rel=0.10)


def test_search_fits_limits_and_picks_compression_when_forced(zoo):
    from flexgen.models.registry import resolve_model
    from flexgen.policy import Policy
    family = resolve_model("facebook/opt-6.7b").family
    policy = Policy(8, 1, 100, 0, 100, 0, 100, 0)
    mem = MachineMemory(gpu=12 << 30, host=16 << 30, disk=200 << 30)
    assert shortfalls(estimate_memory(family, policy, 512, 32, True), mem)
    fit = suggest_policy(family, policy, 512, 32, True, mem)
    assert fit is not None and not shortfalls(estimate_memory(family, fit, 512, 32, True), mem)
    # 13.4 GB of fp16 weights cannot sit in 4 GiB of GPU + 4 GiB of host memory without disk or
    # compression; with no disk either, only 4-bit weights fit
    tight = MachineMemory(gpu=4 << 30, host=6 << 30, disk=0)
    fit = suggest_policy(family, policy, 64, 8, True, tight)
    assert fit is not None and fit.compress_weight
    assert suggest_policy(family, policy, 64, 8, True, MachineMemory(gpu=1 << 30, host=1 << 30, disk=0)) is None


def test_preflight_names_the_shortfall(tmp_path):
    from flexgen.env import ExecutionEnv
    from flexgen.models.registry import resolve_model
    from flexgen.policy import Policy
    env = ExecutionEnv.create(str(tmp_path), device="cpu")
    family = resolve_model("facebook/opt-66b").family
    with pytest.raises(MemoryFitError, match="host memory: needs"):
        preflight(family, Policy(4, 1, 100, 0, 100, 0, 100, 0), 512, 32, env)
    env.close_copy_threads()


def test_opt175b_on_this_machine_is_refused_in_seconds(tmp_path):
    cmd = [sys.executable, "-m", "flexgen.flex_opt", "--model", "facebook/opt-175b", "--path", "_DUMMY_",
           "--device", "cpu", "--offload-dir", str(tmp_path), "--no-log"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.startswith("error: opt-175b") and "does not fit" in p.stderr and "Traceback" not in p.stderr
    assert "loading weights" not in p.stderr   # refused before allocating anything
