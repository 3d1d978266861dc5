"""Parallelism control (--cpu-threads, --io-threads), NUMA / CXL placement of the CPU tier
(--cpu-numa-node, --cpu-numa-interleave) and the host-memory report: the settings are applied
for real (torch's thread count, the pools' worker count, the NUMA node of an allocated buffer's
pages), bad values are one-line errors with exit status 2, and more I/O workers do not change
the tokens."""
import gc
import os
import re
import threading

import numpy as np
import pytest
import torch

import tiny_models as T
from test_policy_and_cli import assert_user_error, run_cli

from flexgen.flex_opt import ExecutionEnv, OptLM
from flexgen.memory import numa
from flexgen.parallel import resolve_threads, usable_cores
from flexgen.policy import PolicyError

CORES = usable_cores()


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _env(tmp_path, **kw):
    return ExecutionEnv.create(str(tmp_path / "off"), device="cpu", **kw)


# ---- threads ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cores,cpu,io", [(1, 1, 1), (2, 2, 1), (4, 4, 1), (8, 6, 2), (16, 14, 2), (64, 62, 2)])
def test_auto_rule(cores, cpu, io):
    s = resolve_threads("auto", None, cores=cores)
    assert (s.cpu_threads, s.io_threads, s.cpu_auto, s.io_auto) == (cpu, io, True, True)


@pytest.mark.parametrize("cores,cpu,io", [(2, 2, 1), (8, 8, 1), (16, 16, 1)])
def test_auto_rule_without_disk_keeps_no_core_for_io(cores, cpu, io):
    s = resolve_threads(None, None, cores=cores, uses_disk=False)
    assert (s.cpu_threads, s.io_threads) == (cpu, io)
    explicit = resolve_threads(None, 1 + (cores > 2), cores=cores, uses_disk=False)   # explicit stays
    assert explicit.io_threads == 1 + (cores > 2) and explicit.cpu_threads == cores


def test_cpu_attention_takes_the_profiles_best_thread_count():
    from flexgen.parallel import policy_threads
    from flexgen.policy import Policy
    prof = {"cpu": {"attention_gib_s": {"1": 4.5, "4": 13.8, "8": 21.6, "16": 16.1},
                    "packed_attention_gelem_s": {"1": 5.8, "4": 15.9, "8": 15.8, "16": 10.7}}}
    cpu_attn = Policy(8, 2, 0, 100, 0, 100, 100, 0, cpu_cache_compute=True)
    assert policy_threads(cpu_attn, cores=16, profile=prof).cpu_threads == 8
    packed = cpu_attn.replace(compress_cache=True)
    assert policy_threads(packed, cores=16, profile=prof).cpu_threads == 4   # the packed rate peaks at 4
    # the rule applies to CPU attention on a GPU run only; explicit counts, no profile, a CPU run,
    # or a cache all on the GPU keep the general rule
    assert policy_threads(cpu_attn, cpu_threads=12, cores=16, profile=prof).cpu_threads == 12
    assert policy_threads(cpu_attn, cores=16).cpu_threads == 16
    assert policy_threads(cpu_attn, cores=16, profile=prof, is_cuda=False).cpu_threads == 16
    assert policy_threads(Policy(8, 2, 0, 100, 100, 0, 100, 0, cpu_cache_compute=True), cores=16,
                          profile=prof).cpu_threads == 16
    # never more than the cores left beside I/O
    on_disk = Policy(8, 2, 0, 100, 0, 50, 100, 0, cpu_cache_compute=True)
    assert policy_threads(on_disk, cores=16, profile={"cpu": {"attention_gib_s": {"16": 9.0}}}).cpu_threads == 14


def test_env_fits_an_auto_split_to_the_policy(tmp_path):
    from flexgen.policy import Policy
    env = _env(tmp_path)
    try:
        env.fit_threads(Policy(1, 1, 100, 0, 100, 0, 100, 0))
        want = resolve_threads(None, None, uses_disk=False)
        assert (env.cpu_threads, env.io_threads) == (want.cpu_threads, want.io_threads)
        assert torch.get_num_threads() == want.cpu_threads
    finally:
        env.close_copy_threads()
    env = _env(tmp_path, cpu_threads=1)
    try:
        env.fit_threads(Policy(1, 1, 0, 0, 100, 0, 100, 0))   # weights on disk
        assert env.cpu_threads == 1 and env.io_threads == resolve_threads(None, None).io_threads
    finally:
        env.close_copy_threads()


def test_usable_cores_is_the_affinity_set():
    assert CORES == len(os.sched_getaffinity(0))


def test_create_applies_explicit_threads(tmp_path):
    env = _env(tmp_path, cpu_threads=1, io_threads=CORES)
    try:
        assert torch.get_num_threads() == 1
        assert env.cpu_threads == 1 and env.io_threads == CORES
        for kind in ("load", "store"):
            assert env.pool(kind)._max_workers == CORES
        assert "torch threads: 1, io threads: %d" % CORES in env.describe_parallel()
    finally:
        env.close_copy_threads()


def test_create_auto_by_default(tmp_path):
    torch.set_num_threads(1)
    env = _env(tmp_path)
    try:
        want = resolve_threads(None, None)
        assert torch.get_num_threads() == want.cpu_threads
        assert env.pool("load")._max_workers == want.io_threads
        assert "(auto)" in env.describe_parallel()
    finally:
        env.close_copy_threads()


@pytest.mark.skipif(CORES < 2, reason="needs two usable cores")
def test_io_workers_really_run_concurrently(tmp_path):
    """Two tasks that can only finish together (a barrier) complete with io_threads=2."""
    env = _env(tmp_path, io_threads=2)
    try:
        barrier = threading.Barrier(2, timeout=10)
        futs = [env.pool("load").submit(barrier.wait) for _ in range(2)]
        assert sorted(f.result(timeout=20) for f in futs) == [0, 1]
    finally:
        env.close_copy_threads()


@pytest.mark.parametrize("kw,match", [
    ({"cpu_threads": 0}, "--cpu-threads must be at least 1"),
    ({"io_threads": -2}, "--io-threads must be at least 1"),
    ({"cpu_threads": CORES + 1}, "more than the"),
    ({"io_threads": CORES + 1}, "more than the"),
    ({"cpu_threads": "many"}, "positive integer or 'auto'"),
    ({"io_threads": 1.5}, "positive integer or 'auto'"),
    ({"io_threads": ""}, "positive integer or 'auto'"),
])
def test_bad_thread_values(tmp_path, kw, match):
    with pytest.raises(PolicyError, match=match):
        _env(tmp_path, **kw)


@pytest.mark.parametrize("placement", ["all_disk", "all_disk_ngb3", "mixed"])
def test_more_io_workers_same_tokens(zoo, tmp_path, placement):
    """Disk loads and stores through 1 or 2 workers per pool (overlap on) give identical tokens."""
    policy = T.make_policy(placement)
    prompts = T.make_prompts(policy.block_size, 10, T.SPECS["opt-tiny"][1]["vocab_size"], T.pad_id_of("opt-tiny"))
    outs = []
    for io in (1, 2):
        env = ExecutionEnv.create(str(tmp_path / f"off{io}"), device="cpu", io_threads=min(io, CORES))
        lm = OptLM(zoo.checkpoint("opt-tiny"), env, zoo.cache_root, policy, progress=False)
        try:
            outs.append(lm.generate(prompts, max_new_tokens=6, attention_mask=prompts != T.pad_id_of("opt-tiny")))
            assert env.pool("load")._max_workers == min(io, CORES)
        finally:
            lm.close()
            env.close_copy_threads()
    np.testing.assert_array_equal(outs[0], outs[1])


# ---- NUMA -------------------------------------------------------------------------------------------

def _numa_usable():
    try:
        numa._get_thread_policy()
        return True, ""
    except OSError as e:
        return False, str(e)


NUMA_OK, NUMA_WHY = _numa_usable()
needs_numa = pytest.mark.skipif(not NUMA_OK, reason=f"memory-policy syscalls unavailable: {NUMA_WHY}")
PAGE = os.sysconf("SC_PAGE_SIZE")


def test_nodes_listed_from_sysfs():
    nodes = numa.available_nodes()
    assert 0 in nodes
    assert nodes == sorted(int(d[4:]) for d in os.listdir("/sys/devices/system/node") if re.fullmatch(r"node\d+", d))


def _inner_addr(t):
    return (t.data_ptr() + PAGE - 1) // PAGE * PAGE


@needs_numa
@pytest.mark.parametrize("kw,policy", [({"numa_node": 0}, "bind:0"), ({"numa_node": "0"}, "bind:0"),
                                       ({"numa_interleave": "0"}, "interleave:0"),
                                       ({"numa_interleave": [0]}, "interleave:0")])
def test_cpu_tier_placed_on_node0(tmp_path, kw, policy):
    before = numa._get_thread_policy()[0]
    env = _env(tmp_path, **kw)
    try:
        t = env.allocate("cpu", (3 << 20,), torch.float32)      # 12 MiB of CPU tier
        nodes = numa.page_nodes(t)
        assert nodes and all(n == 0 for n in nodes), set(nodes)  # every page present, on node 0
        vma = numa.vma_policy(_inner_addr(t))
        if vma is not None:  # /proc/self/numa_maps: the mapping carries the policy, pages on N0
            assert vma[0] == policy, vma
            assert vma[1].get(0, 0) > 0 and set(vma[1]) == {0}, vma
        # a relay (staging) buffer is placed alike
        s = env._staging.get(5 << 20, pin=True)
        assert all(n == 0 for n in numa.page_nodes(s))
        vma = numa.vma_policy(_inner_addr(s))
        if vma is not None:
            assert vma[0] == policy, vma
        assert f"cpu numa: {env.numa.describe()}" in env.describe_parallel()
    finally:
        env.close_copy_threads()
    assert numa._get_thread_policy()[0] == before, "the thread's memory policy must be restored"


@needs_numa
def test_without_numa_flags_memory_policy_untouched(tmp_path):
    """In a fresh process: memory that earlier tests bound with mbind can come back from the
    allocator with its policy still attached, which says nothing about an allocation without flags."""
    import subprocess
    import sys
    script = (
        "import torch, sys\n"
        "from flexgen.env import ExecutionEnv\n"
        "from flexgen.memory import numa\n"
        f"env = ExecutionEnv.create({str(tmp_path)!r}, device='cpu')\n"
        "t = env.allocate('cpu', (3 << 20,), torch.float32)\n"
        "t.fill_(1)\n"
        f"page = {PAGE}\n"
        "vma = numa.vma_policy((t.data_ptr() + page - 1) // page * page)\n"
        "env.close_copy_threads()\n"
        "print(vma[0] if vma is not None else 'unknown')\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] in ("default", "unknown"), p.stdout


@needs_numa
def test_thread_policy_really_set_inside_scope():
    p = numa.NumaPlacement.from_args(node=0)
    with p.scope():
        mode, mask = numa._get_thread_policy()
        assert mode == numa.MPOL_BIND and mask[0] == 1
    assert numa._get_thread_policy()[0] == numa.MPOL_DEFAULT


@pytest.mark.parametrize("kw,match", [
    ({"numa_node": 99}, r"NUMA node 99 does not exist; this machine has node\(s\) 0"),
    ({"numa_interleave": "0,99"}, r"NUMA node 99 does not exist"),
    ({"numa_node": -1}, "node numbers"),
    ({"numa_node": "x"}, "node numbers"),
    ({"numa_interleave": "0,0"}, "twice"),
    ({"numa_interleave": "0,"}, "comma-separated"),
    ({"numa_node": 0, "numa_interleave": "0"}, "exclusive"),
])
def test_bad_numa_values(tmp_path, kw, match):
    with pytest.raises(PolicyError, match=match):
        _env(tmp_path, **kw)


# ---- host memory report -----------------------------------------------------------------------------

def test_host_bytes_counted_and_released(tmp_path):
    env = _env(tmp_path)
    try:
        hb = env.host_bytes
        base = hb.pageable
        t = env.allocate("cpu", (1000, 3), torch.float16)
        assert hb.pageable == base + 6000 and hb.pinned == 0
        s = env._staging.get(10000, pin=True)   # no GPU: the relay buffer is pageable
        assert hb.pageable == base + 16000
        del s
        env._staging.get(30000, pin=True)        # grows: the old buffer no longer counts
        gc.collect()
        assert hb.pageable == base + 36000
        del t
        gc.collect()
        assert hb.pageable == base + 30000
        assert hb.peak[False] >= base + 36000
        g = env.allocate("gpu", (100,), torch.float32)  # the compute device is not host tier
        assert hb.pageable == base + 30000 and g.numel() == 100
    finally:
        env.close_copy_threads()


def test_cache_memory_handed_back_is_reused_zeroed(tmp_path):
    env = _env(tmp_path)
    try:
        hb = env.host_bytes
        base = hb.pageable
        t = env.allocate("cpu", (8, 4, 3), torch.float16, reuse=True).movedim(2, 0)   # a heads-major store's view
        gc.collect()
        assert hb.pageable == base + 192          # counted while any view of the memory lives
        t.fill_(float("nan"))
        ptr = t.data_ptr()
        env.recycle(t)
        del t
        gc.collect()
        assert hb.pageable == base + 192          # kept for reuse: still held
        u = env.allocate("cpu", (8, 4, 3), torch.float16, reuse=True)
        assert u.data_ptr() == ptr and bool((u == 0).all())   # the same memory, zeroed
        env.recycle(u)
        other = env.allocate("cpu", (5,), torch.float32, reuse=True)   # another size: fresh, spares dropped
        assert other.data_ptr() != ptr and env._spares == {}
        del u
        gc.collect()
        assert hb.pageable == base + 20
    finally:
        env.close_copy_threads()


@pytest.mark.parametrize("placement", ["cache_cpu", "cache_cpu_cpu_attn", "cache_split_cpu_attn"])
def test_next_block_reuses_cache_memory(zoo, tmp_path, placement, device):
    """A second generate takes the CPU cache memory the first handed back (poisoned with NaN in
    between: it must come back zeroed) and gives the same tokens. On a GPU the cache without CPU
    attention is pinned memory that in-flight copies write."""
    env = ExecutionEnv.create(str(tmp_path / "off"), device=device)
    policy = T.make_policy(placement)
    name = "opt-tiny"
    prompts = T.make_prompts(policy.block_size, 10, T.SPECS[name][1]["vocab_size"], T.pad_id_of(name))
    lm = OptLM(zoo.checkpoint(name), env, zoo.cache_root, policy, progress=False)
    try:
        first = lm.generate(prompts, max_new_tokens=6, attention_mask=prompts != T.pad_id_of(name))
        spares = [b for bases in env._spares.values() for b in bases]
        assert spares
        for b in spares:
            b.fill_(0xFF)                          # NaN in fp16/fp32
        ptrs = sorted(b.data_ptr() for b in spares)
        del spares
        second = lm.generate(prompts, max_new_tokens=6, attention_mask=prompts != T.pad_id_of(name))
        np.testing.assert_array_equal(first, second)
        assert sorted(b.data_ptr() for bases in env._spares.values() for b in bases) == ptrs
    finally:
        lm.close()
        env.close_copy_threads()
    assert env._spares == {}


@pytest.mark.parametrize("placement", ["cache_cpu", "cache_split_cpu_attn"])
def test_steps_are_freed_without_the_cycle_collector(zoo, tmp_path, placement, device):
    """Every step's tensors (the loaded cache, the new K/V rows) go as soon as the step ends: a
    reference cycle (step -> context -> attend closure -> step) would keep them until Python's
    cycle collector ran, and on the GPU that held gigabytes past the memory model (measured)."""
    from flexgen.engine import schedule
    env = ExecutionEnv.create(str(tmp_path / "off"), device=device)
    policy = T.make_policy(placement)
    name = "opt-tiny"
    prompts = T.make_prompts(policy.block_size, 10, T.SPECS[name][1]["vocab_size"], T.pad_id_of(name))
    lm = OptLM(zoo.checkpoint(name), env, zoo.cache_root, policy, progress=False)
    gc.collect()
    gc.disable()
    try:
        lm.generate(prompts, max_new_tokens=4, attention_mask=prompts != T.pad_id_of(name))
        assert not [o for o in gc.get_objects() if type(o) is schedule._Step]
    finally:
        gc.enable()
        lm.close()
        env.close_copy_threads()


def test_host_bytes_match_weights_on_cpu(zoo, tmp_path):
    env = _env(tmp_path)
    lm = OptLM(zoo.checkpoint("opt-tiny"), env, zoo.cache_root, T.make_policy("weights_cpu_disk"), progress=False)
    try:
        assert env.host_bytes.pageable == lm.weights.nbytes_on("cpu") > 0
    finally:
        lm.close()
        env.close_copy_threads()


# ---- the command line -------------------------------------------------------------------------------

def _cli_args(zoo, tmp_path, *extra):
    return ["--model", zoo.checkpoint("opt-tiny"), "--path", zoo.cache_root, "--prompt-len", 8, "--gen-len", 2,
            "--gpu-batch-size", 1, "--percent", 0, 50, 0, 50, 0, 100, "--device", "cpu", "--no-log",
            "--offload-dir", tmp_path / "off", *extra]


@pytest.mark.parametrize("extra,words", [
    (["--cpu-numa-node", 99], ["node 99", "does not exist", r"node\(s\) 0"]),
    (["--cpu-numa-interleave", "0,7"], ["node 7"]),
    (["--cpu-threads", 0], ["--cpu-threads"]),
    (["--io-threads", "lots"], ["--io-threads"]),
    (["--cpu-threads", CORES + 1], ["usable cores"]),
])
def test_cli_bad_values(zoo, tmp_path, extra, words):
    res = run_cli(_cli_args(zoo, tmp_path, *extra), cwd=tmp_path)
    assert_user_error(res, *words)


def test_cli_header_shows_threads_numa_and_host_bytes(zoo, tmp_path):
    extra = ["--cpu-threads", 1, "--io-threads", 1]
    if NUMA_OK:
        extra += ["--cpu-numa-node", 0]
    res = run_cli(_cli_args(zoo, tmp_path, *extra), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    # the first CLI run of a test session may measure the machine first (one line says so)
    header = next(line for line in res.stdout.splitlines() if line.startswith("<"))
    assert re.match(r"<OptLM> device: cpu, dtype: float32, torch threads: 1, io threads: 1 of \d+ cores", header), header
    if NUMA_OK:
        assert header.endswith("cpu numa: node 0 (bind)"), header
    m = re.search(r"host memory held after loading weights: pinned (\d+\.\d+) GiB, pageable (\d+\.\d+) GiB",
                  res.stdout)
    assert m and float(m[1]) == 0.0, res.stdout
    assert re.search(r"peak host mem held \(CPU tier \+ staging\): pinned 0\.000 GiB, pageable \d+\.\d+ GiB",
                     res.stdout), res.stdout
