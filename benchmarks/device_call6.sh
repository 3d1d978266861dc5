#!/usr/bin/env bash
# Session 2, device call 6: the CPU-attention kernel (views in one chunk per worker), OPT-30B with
# weights and cache on CPU and CPU attention under three thread splits (issue 5), the GPU tests,
# gpu_smoke, and a kernel profile of P2. Carry .whl_tests.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/benchlogs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
PYTHONPATH=. timeout 60 python3 -m flexgen.profile --out "$OUT/profile.json" --offload-dir /tmp/flexgen_prof 2>&1 | tail -3
export FLEXGEN_PROFILE=$OUT/profile.json
M="$OUT/cpu_attention_bench.txt"
timeout 90 env PYTHONPATH=. python3 benchmarks/cpu_attention_bench.py --threads 1,4,8,14,16 --workers auto,1,threads > "$M" 2>&1
grep -E "cache:|^ +[0-9]" "$M"
PYTHONPATH=. python3 benchmarks/bench.py C30 C30+--cpu-threads=16+--io-threads=1 C30+--cpu-threads=4+--io-threads=2 \
  --out /tmp/benchlogs --timeout 150 > "$OUT/c30.txt" 2>&1
grep -E "torch threads|breakdown|predicted vs|peak host|exit status|rror|timeout" "$OUT/c30.txt"
tail -4 "$OUT/c30.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tsite .whl_tests/*.whl
FLEXGEN_TEST_DEVICE=cuda PYTHONPATH=.:/tmp/tsite timeout 150 python3 -m pytest -q -p no:cacheprovider \
  tests/test_fidelity_opt.py tests/test_fidelity_llama.py tests/test_sampling.py tests/test_cpu_attention.py \
  tests/test_compression.py tests/test_triton_dequant.py tests/test_pinned.py tests/test_policy_and_cli.py \
  -k "not cli_" > "$OUT/gpu_tests.txt" 2>&1
tail -3 "$OUT/gpu_tests.txt"
PYTHONPATH=. timeout 60 python3 benchmarks/gpu_smoke.py cuda 2>&1 | tail -1
PYTHONPATH=. timeout 70 python3 benchmarks/profile_step.py facebook/opt-30b 8 3 0 100 100 0 100 0 overlap compress-weight > "$OUT/prof_p2.txt" 2>&1
grep -E "^timings" "$OUT/prof_p2.txt"; grep -A22 "Self CUDA" "$OUT/prof_p2.txt" | head -24
