"""--percent auto: the performance model picks a policy that fits the given memory, prints it as
explicit flags, runs it, and prints predicted against measured."""
import re
import subprocess
import sys


def _run(tmp_path, *flags):
    cmd = [sys.executable, "-m", "flexgen.flex_opt", "--model", "facebook/opt-125m", "--path", "_DUMMY_",
           "--prompt-len", "16", "--gen-len", "3", "--device", "cpu", "--no-log", "--offload-dir", str(tmp_path),
           *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_percent_auto_fits_the_limits_and_runs(tmp_path):
    # 0.6 GiB of host memory cannot hold opt-125m's 0.5 GB of float32 weights: the choice must
    # offload to disk or compress
    p = _run(tmp_path, "--percent", "auto", "--gpu-batch-size", "2", "--num-gpu-batches", "1", "--cpu-mem", "0.6GiB")
    assert p.returncode == 0, p.stderr[-2000:]
    m = re.search(r"auto policy \(.*\): --percent (\S+) (\S+) (\S+) (\S+) (\S+) (\S+) --gpu-batch-size 2 "
                  r"--num-gpu-batches 1(.*);", p.stdout)
    assert m, p.stdout
    w_host = float(m.group(1)) + float(m.group(2))   # on a CPU-only machine "gpu" is host memory too
    assert w_host < 100 or "--compress-weight" in m.group(7)
    assert "predicted vs measured:" in p.stdout and "total throughput:" in p.stdout


def test_auto_batch_needs_auto_percent(tmp_path):
    p = _run(tmp_path, "--gpu-batch-size", "auto")
    assert p.returncode == 2 and "need --percent auto" in p.stderr and "Traceback" not in p.stderr


def test_nothing_fits_is_a_clear_error(tmp_path):
    p = _run(tmp_path, "--percent", "auto", "--cpu-mem", "0.01GiB", "--disk-mem", "0.01GiB")
    assert p.returncode == 2 and p.stderr.startswith("error: --percent auto: no policy fits")
