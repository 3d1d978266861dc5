#!/usr/bin/env bash
# Session 2, device call 2 (issue 5 and the GPU checks): the machine profile, the CPU-attention
# microbenchmark, OPT-30B with weights and cache on CPU and CPU attention under three thread
# splits, the GPU test suite and gpu_smoke. Carry .whl_tests. At most 8 files come back: logs of
# the benchmark runs stay in /tmp/benchlogs.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/benchlogs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
PYTHONPATH=. timeout 120 python3 -m flexgen.profile --out "$OUT/profile.json" --offload-dir /tmp/flexgen_prof 2>&1 | tail -4
export FLEXGEN_PROFILE=$OUT/profile.json
M="$OUT/cpu_attention_bench.txt"
PYTHONPATH=. timeout 200 python3 benchmarks/cpu_attention_bench.py --threads 1,2,4,8,14,16 --workers threads,1 > "$M" 2>&1
PYTHONPATH=. timeout 60 python3 benchmarks/cpu_attention_bench.py --threads 4,16 --dtype bfloat16 --workers threads,1 >> "$M" 2>&1
PYTHONPATH=. timeout 60 python3 benchmarks/cpu_attention_bench.py --threads 16 --layout positions --blocks 64,512 >> "$M" 2>&1
PYTHONPATH=. timeout 60 python3 benchmarks/cpu_attention_bench.py --threads 16 --compress --blocks 64,512 >> "$M" 2>&1
grep -E "cache:|^ +[0-9]" "$M"
PYTHONPATH=. python3 benchmarks/bench.py C30 C30+--cpu-threads=16+--io-threads=1 C30+--cpu-threads=8+--io-threads=2 \
  --out /tmp/benchlogs --timeout 240 > "$OUT/c30.txt" 2>&1
grep -E "torch threads|breakdown|predicted vs|peak host|auto policy" "$OUT/c30.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tsite .whl_tests/*.whl
FLEXGEN_TEST_DEVICE=cuda PYTHONPATH=.:/tmp/tsite timeout 300 python3 -m pytest -q -p no:cacheprovider \
  tests/test_fidelity_opt.py tests/test_fidelity_llama.py tests/test_sampling.py tests/test_cpu_attention.py \
  tests/test_compression.py tests/test_triton_dequant.py tests/test_policy_and_cli.py -k "not cli_" > "$OUT/gpu_tests.txt" 2>&1
tail -3 "$OUT/gpu_tests.txt"
PYTHONPATH=. timeout 200 python3 benchmarks/gpu_smoke.py cuda > "$OUT/gpu_smoke.txt" 2>&1; tail -2 "$OUT/gpu_smoke.txt"
echo "=== table"; tail -4 "$OUT/c30.txt"
