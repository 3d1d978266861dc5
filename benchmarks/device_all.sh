#!/usr/bin/env bash
# One device call for issue 2/3 evidence: PCIe bandwidth, ours beside the original FlexGen on the
# same machine, the GPU test suite, and the LLaMA scenario. Carry .whl_orig and .whl_tests.
# Usage (repo root, on the device): bash benchmarks/device_all.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
PYTHONPATH=. python3 benchmarks/bandwidth.py 2
PYTHONPATH=. python3 benchmarks/bench.py P4 P4+--sep-layer=false P1 --out "$OUT" 2>&1 | tail -4 | tee "$OUT/ours_a.txt"
ORIG_TIMEOUT=200 bash benchmarks/original_flexgen/run.sh P4 P1 > "$OUT/orig_all.txt" 2>&1
grep -A12 "summary" "$OUT/orig_all.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tsite .whl_tests/*.whl
FLEXGEN_TEST_DEVICE=cuda PYTHONPATH=.:/tmp/tsite python3 -m pytest -q -p no:cacheprovider tests/test_fidelity_opt.py \
  tests/test_fidelity_llama.py tests/test_sampling.py tests/test_policy_and_cli.py -k "not cli_" > "$OUT/gpu_tests.txt" 2>&1
tail -3 "$OUT/gpu_tests.txt"
PYTHONPATH=. python3 benchmarks/gpu_smoke.py cuda 2>&1 | tail -1
PYTHONPATH=. python3 benchmarks/bench.py L30 --out "$OUT" 2>&1 | tail -2
