#!/usr/bin/env bash
# Session 2, device call 4: after exact-size pinned memory and the Triton unpacking of a packed KV
# cache: P1/P2 (issue 4 floor), V6 and P3 (compressed cache on the GPU; issue 6), LLaMA-2-70B
# 4-bit (issue 3), and the GPU tests of those parts. Carry .whl_tests.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/benchlogs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
PYTHONPATH=. timeout 120 python3 -m flexgen.profile --out "$OUT/profile.json" --offload-dir /tmp/flexgen_prof 2>&1 | tail -4
export FLEXGEN_PROFILE=$OUT/profile.json
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tsite .whl_tests/*.whl
FLEXGEN_TEST_DEVICE=cuda PYTHONPATH=.:/tmp/tsite timeout 200 python3 -m pytest -q -p no:cacheprovider \
  tests/test_pinned.py tests/test_triton_dequant.py tests/test_compression.py > "$OUT/gpu_tests4.txt" 2>&1
tail -3 "$OUT/gpu_tests4.txt"
PYTHONPATH=. python3 benchmarks/bench.py V6 P3 P2 P1 L70C --out /tmp/benchlogs --timeout 200 > "$OUT/call4.txt" 2>&1
grep -E "auto policy|predicted vs|host memory held|peak host|rror|exit status" "$OUT/call4.txt"
echo "=== table"; tail -6 "$OUT/call4.txt"
