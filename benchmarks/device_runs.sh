#!/usr/bin/env bash
# The device measurements of benchmarks/RESULTS.md, in named parts, one call for several parts:
#   bash benchmarks/device_runs.sh PART [PART ...]
# Every call first profiles the machine ($OUT/profile.json, used by every run's prediction).
# Parts:
#   p4          P4 ours beside the original FlexGen, twice, interleaved (carry .whl_orig)
#   compress    P2 and LLaMA-2-70B with 4-bit weights, V6 (4-bit cache), P3 (--percent auto)
#   validate    the cost model's policies V1-V9 and P3
#   cpu-attn    the CPU-attention microbenchmark, then OPT-30B with CPU attention (C30) under the
#               auto thread split (16 + 1 with nothing on disk) and 14 + 2, 8 + 2
#   gpu-tests   the GPU test suite and gpu_smoke (carry .whl_tests)
#   kernels     torch.profiler tables of a P2 and a V6 decode step
#   cpu-attn-packed  the microbenchmark over a 4-bit cache, and C30 with the cache packed (C30C)
#   c30-profile the compute thread's Python hot spots in C30's prefill and decode steps
#   c30-stages  C30 with attention and MLP as separate stages (the default) and as one, and C30C briefly
#   cap12       issue 12 under a hard 24 GiB GPU cap (--gpu-mem, no PYTORCH_CUDA_ALLOC_CONF given): P3 and a
#               LLaMA-3-70B-shaped model with --percent auto, to the end; then a forced policy that cannot
#               fit (must end with one `error: out of GPU memory` line, exit 2)
#   validate12  issue 12's fresh validation set N1-N11 and P3 under its 24 GiB cap (decode projected
#               from 6 steps as FlexGen does; per-step latencies printed), then benchmarks/check_cost_model.py
#               over it (and cap12's runs)
#   ops12       benchmarks/count_ops.py on the GPU (the engine's eager operations per decode step beside
#               the cost model's) and N10 at 8 and 12 compute threads
#   diag13      count_ops by issuing function (N4, N10, N5 shapes), N4's step profiled, N10 and N5 at
#               10 + 2, 12 + 2 (and N5 at 8) threads
#   engine13    the GPU test of the engine's counted scheduling operations, then N4 N10 N5 N2 N9 (VAL13
#               picks others) re-predicted with them (carry .whl_tests)
#   p3diag      P3's auto policy taken apart (operations by caller, hot spots, kernels), N10 and P3 re-predicted
#   final13     session 10's validation runs re-predicted (final model, engine counted here); P3c, P3u
#   p3group     P3's session-10 policy: weight unpacking by grouping, profile_step with either grouping, P3c
#   dequant14   benchmarks/dequant_bench.py (weight unpacking by kernel and tile), the kernels' GPU tests
#               (carry .whl_tests: pip download -d .whl_tests pytest), P3c with the row kernel
#   packed15    FLEXGEN_CUDA_GRAPHS=packed (graphs over packed weights and cache) against eager, OPT-30B
#               all on the GPU at 4 bits, 16 x 1 under 24 GiB; the graph tests on the GPU (carry .whl_tests)
#   matmul16    benchmarks/packed_matmul_bench.py (F.linear over packed weights vs unpack + cuBLAS), its GPU
#               tests, OPT-30B all on the GPU at 4 bits (P3g: 16 x 1, 24 GiB), graphs / eager, kernel on / off
#   p12         P1 and P2 ours beside the original (carry .whl_orig)
#   p3s12       P3g to the end, P3 (--percent auto), the original's P3 (carry .whl_orig)
#   cache12     benchmarks/cache_write_bench.py (fused compressed-cache write vs per-segment: bytes, host
#               time) and the compression tests on the GPU
#   eager12     eager decode steps with the Triton attention and without (FLEXGEN_TRITON_DECODE=0): N9 N2 N3,
#               with the attention kernel's eager host time and compiled variants; the model over both
#               (measured 2026-12-03; since then eager steps take the matmul path either way, so the two
#               runs of N9 N2 N3 now measure the same engine)
# At most 8 files come back from $OUT: each part writes one; run logs stay in /tmp/benchlogs.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/benchlogs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
lscpu | grep -E "Model name"; free -g | sed -n 2p
timeout 60 python3 -m flexgen.profile --out "$OUT/profile.json" --offload-dir /tmp/flexgen_prof 2>&1 | tail -4
export FLEXGEN_PROFILE=$OUT/profile.json
bench() { python3 benchmarks/bench.py "$@" --out /tmp/benchlogs; }
show() { grep -E "auto policy|predicted vs|breakdown|host memory held|peak host|exit status|rror|timeout" "$1"; }

for part in "$@"; do
  echo "=== $part"
  case $part in
    p4)
      for r in a b; do
        bench P4 --timeout 150 > "/tmp/benchlogs/ours_p4$r.txt" 2>&1; tail -1 "/tmp/benchlogs/ours_p4$r.txt"
        ORIG_TIMEOUT=150 bash benchmarks/original_flexgen/run.sh P4 > "/tmp/benchlogs/orig_p4$r.txt" 2>&1
        grep -A8 summary "/tmp/benchlogs/orig_p4$r.txt" | grep -E "throughput|latency"
      done | tee "$OUT/p4.txt" ;;
    compress)
      bench P2 L70C V6 P3 --timeout 240 > "$OUT/compress.txt" 2>&1; show "$OUT/compress.txt"; tail -5 "$OUT/compress.txt" ;;
    validate)
      bench V1 V2 V3 V5 V6 V9 V4 V7 V8 P3 --timeout 240 > "$OUT/validate.txt" 2>&1; show "$OUT/validate.txt"
      tail -11 "$OUT/validate.txt" ;;
    cpu-attn)
      M="$OUT/cpu_attention_bench.txt"
      timeout 100 python3 benchmarks/cpu_attention_bench.py --threads 1,4,8,14,16 --workers auto,1,threads > "$M" 2>&1
      timeout 60 python3 benchmarks/cpu_attention_bench.py --threads 14,16 --workers auto,1 --written-only >> "$M" 2>&1
      timeout 60 python3 benchmarks/cpu_attention_bench.py --threads 4,16 --workers auto --compress >> "$M" 2>&1
      grep -E "cache:|^ +[0-9]" "$M"
      bench C30 C30+--cpu-threads=14+--io-threads=2 C30+--cpu-threads=8+--io-threads=2 --timeout 300 \
        > "$OUT/c30.txt" 2>&1; show "$OUT/c30.txt"; tail -4 "$OUT/c30.txt" ;;
    cpu-attn-packed)
      M="$OUT/cpu_attention_packed.txt"
      timeout 120 python3 benchmarks/cpu_attention_bench.py --threads 4,8,16 --workers auto,1 --compress > "$M" 2>&1
      grep -E "cache:|^ +[0-9]" "$M"
      bench C30C --timeout 300 > "$OUT/c30c.txt" 2>&1; show "$OUT/c30c.txt"; tail -2 "$OUT/c30c.txt" ;;
    c30-stages)
      bench C30 C30+--sep-layer=false C30C+--gen-len=8 --timeout 240 > "$OUT/c30_stages.txt" 2>&1
      show "$OUT/c30_stages.txt"; tail -4 "$OUT/c30_stages.txt" ;;
    c30-profile)
      timeout 300 python3 benchmarks/profile_step.py facebook/opt-30b 32 2 0 100 0 100 100 0 overlap \
        cpu-cache-compute prefill no-kernels > "$OUT/c30_profile.txt" 2>&1; grep -E "^timings" "$OUT/c30_profile.txt" ;;
    gpu-tests)
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tsite .whl_tests/*.whl
      FLEXGEN_TEST_DEVICE=cuda PYTHONPATH=.:/tmp/tsite timeout 200 python3 -m pytest -q -p no:cacheprovider \
        tests/test_fidelity_opt.py tests/test_fidelity_llama.py tests/test_sampling.py tests/test_cpu_attention.py \
        tests/test_compression.py tests/test_triton_dequant.py tests/test_host_memory.py tests/test_policy_and_cli.py \
        tests/test_parallel_numa.py \
        -k "not cli_" > "$OUT/gpu_tests.txt" 2>&1
      tail -3 "$OUT/gpu_tests.txt"
      timeout 120 python3 benchmarks/gpu_smoke.py cuda 2>&1 | tail -1 | tee -a "$OUT/gpu_tests.txt" ;;
    kernels)
      { timeout 90 python3 benchmarks/profile_step.py facebook/opt-30b 8 3 0 100 100 0 100 0 overlap compress-weight
        timeout 60 python3 benchmarks/profile_step.py facebook/opt-13b 32 2 100 0 100 0 100 0 overlap compress-cache
      } > "$OUT/kernels.txt" 2>&1; grep -E "^timings" "$OUT/kernels.txt" ;;
    cap12)
      timeout 120 python3 -m flexgen.flex_opt --model facebook/opt-6.7b --path _DUMMY_ --prompt-len 512 --gen-len 32 \
        --percent 100 0 100 0 100 0 --gpu-batch-size 192 --num-gpu-batches 1 --gpu-mem 16GiB --force --no-log \
        > "$OUT/oom12.txt" 2>&1; echo "exit status $?" >> "$OUT/oom12.txt"; grep -vE "it/s|tensor/s" "$OUT/oom12.txt" | tail -4
      env -u PYTORCH_CUDA_ALLOC_CONF python3 benchmarks/bench.py P3 L3A --timeout 420 --out /tmp/benchlogs \
        > "$OUT/cap12.txt" 2>&1; show "$OUT/cap12.txt"; grep -E "reserved" "$OUT/cap12.txt"; tail -3 "$OUT/cap12.txt" ;;
    validate12)
      # VAL12 picks a subset (the whole set can outlast one 600 s call): VAL12="N1 N2" bash ... validate12
      bench ${VAL12:-N1 N2 N3 N4 N10 N5 N9 N6 N11 P3} --timeout 150 --extra "--cut-gen-len 6 --debug-mode breakdown" \
        > "$OUT/validate12.txt" 2>&1
      show "$OUT/validate12.txt" | grep -v "host memory held"; grep "per-step latency" "$OUT/validate12.txt"
      tail -12 "$OUT/validate12.txt"
      # the current model re-predicting every run from this call's profile (P3 and L3A when cap12 ran too)
      cat "$OUT/validate12.txt" $( [ -f "$OUT/cap12.txt" ] && echo "$OUT/cap12.txt" ) > /tmp/benchlogs/all12.txt
      python3 benchmarks/check_cost_model.py /tmp/benchlogs/all12.txt "$OUT/profile.json" ;;
    eager12)
      python3 benchmarks/decode_attention_bench.py --shapes P4 V1 L8 --eager > "$OUT/attn_eager.txt" 2>&1
      cat "$OUT/attn_eager.txt"
      for tr in 1 0; do
        FLEXGEN_TRITON_DECODE=$tr bench N9 N2 N3 --timeout 120 --extra "--cut-gen-len 6 --debug-mode breakdown" \
          > "$OUT/eager_triton$tr.txt" 2>&1
        echo "-- FLEXGEN_TRITON_DECODE=$tr"; grep "per-step latency" "$OUT/eager_triton$tr.txt"
        python3 benchmarks/check_cost_model.py "$OUT/eager_triton$tr.txt" "$OUT/profile.json" | tail -5
      done ;;
    ops12)
      # the engine's operations per eager decode step beside the cost model's count (tiny models on
      # the GPU), and N10's CPU attention at fewer compute threads (the profile's rate peaks at 8)
      { for a in "llama" "llama --ngb 8" "opt --percent 100 0 100 0 0 100" \
            "llama --percent 50 50 50 50 100 0 --ngb 8 --compress-weight --compress-cache" \
            "llama --percent 50 50 50 50 100 0 --ngb 8 --compress-cache" \
            "llama --percent 50 50 50 50 100 0 --ngb 8 --compress-weight" \
            "llama --percent 0 100 0 100 100 0 --ngb 2 --cpu-cache-compute" \
            "opt --percent 30 70 0 100 100 0 --ngb 4 --compress-weight --compress-cache"; do
          python3 benchmarks/count_ops.py $a --device cuda 2>&1 | grep -v -i warn | tail -2; done
        bench N10+--cpu-threads=8 N10+--cpu-threads=12+--io-threads=2 --timeout 120 \
          --extra "--cut-gen-len 6 --debug-mode breakdown" | grep -E "breakdown|per-step|^N10"; } > "$OUT/ops12.txt" 2>&1
      cat "$OUT/ops12.txt" ;;
    diag13)
      # what the model misses on N4, N10 and N5: the engine's operations by issuing function (tiny models on
      # the GPU), N4's step profiled at its real size, and CPU attention at other thread splits (full runs)
      { for a in "llama --percent 50 50 50 50 100 0 --ngb 8 --compress-weight --compress-cache" \
            "llama --percent 50 50 50 50 100 0 --ngb 8 --compress-weight" \
            "llama --percent 0 100 0 100 100 0 --ngb 2 --cpu-cache-compute" \
            "opt --percent 100 0 0 100 100 0 --ngb 2 --cpu-cache-compute --compress-cache"; do
          python3 benchmarks/count_ops.py $a --device cuda --by-caller --top 16 2>&1 | grep -v -i warn | tail -3; done
        ROWS=22 timeout 200 python3 benchmarks/profile_step.py meta-llama/Meta-Llama-3-8B 32 8 50 50 50 50 100 0 \
          overlap compress-weight compress-cache 2>&1 | grep -v -i warn | head -150
        bench N10+--cpu-threads=10+--io-threads=2 N10+--cpu-threads=12+--io-threads=2 \
          N5+--cpu-threads=10+--io-threads=2 N5+--cpu-threads=12+--io-threads=2 N5+--cpu-threads=8 --timeout 120 \
          --extra "--cut-gen-len 6 --debug-mode breakdown" | grep -E "breakdown|per-step|^N"; } > "$OUT/diag13.txt" 2>&1
      cat "$OUT/diag13.txt" ;;
    engine13)
      # the engine's scheduling operations counted on the GPU (optimizer/engine_ops.py) against a real
      # step, then the runs the model missed without them, re-predicted with them (carry .whl_tests)
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tsite .whl_tests/*.whl
      FLEXGEN_TEST_DEVICE=cuda PYTHONPATH=.:/tmp/tsite timeout 150 python3 -m pytest -q -p no:cacheprovider \
        tests/test_cost_model_ops.py -k "engine or gpu" 2>&1 | tail -3
      bench ${VAL13:-N4 N10 N5 N2 N9} --timeout 150 --extra "--cut-gen-len 6 --debug-mode breakdown" \
        > "$OUT/engine13.txt" 2>&1
      show "$OUT/engine13.txt" | grep -v "host memory held"; tail -7 "$OUT/engine13.txt"
      python3 benchmarks/check_cost_model.py "$OUT/engine13.txt" "$OUT/profile.json" ;;
    p3diag)
      # P3's auto policy (OPT-30B 20/80 4-bit weights, 4-bit cache on the GPU, 32 x 3) taken apart:
      # the engine's operations by caller, the step's Python hot spots and kernels; then N10 and P3
      # re-predicted with the engine's counted operations
      { python3 benchmarks/count_ops.py opt --percent 20 80 100 0 100 0 --ngb 3 --compress-weight --compress-cache \
          --device cuda --by-caller --top 16 2>&1 | grep -v -i warn | tail -3
        ROWS=24 timeout 240 python3 benchmarks/profile_step.py facebook/opt-30b 32 3 20 80 100 0 100 0 overlap \
          compress-weight compress-cache 2>&1 | grep -v -i warn | head -120
        bench N10 P3 --timeout 150 --extra "--cut-gen-len 6 --debug-mode breakdown" > /tmp/benchlogs/p3diag_runs.txt 2>&1
        show /tmp/benchlogs/p3diag_runs.txt | grep -v "host memory held"; tail -3 /tmp/benchlogs/p3diag_runs.txt
        python3 benchmarks/check_cost_model.py /tmp/benchlogs/p3diag_runs.txt "$OUT/profile.json"; } > "$OUT/p3diag.txt" 2>&1
      cat "$OUT/p3diag.txt" ;;
    final13)
      # session 10's validation runs re-predicted by the final model with each call's own profile and
      # the engine's operations counted on this GPU; then P3's auto policy of call 4 with and without
      # its caps (P3c, P3u)
      { for c in 2 4 5; do
          echo "-- call $c"; python3 benchmarks/check_cost_model.py benchmarks/results/h200-s10-call$c-runs.txt \
            benchmarks/results/h200-s10-call$c-profile.json; done
        bench P3c P3u --timeout 120 --extra "--cut-gen-len 6 --debug-mode breakdown" > /tmp/benchlogs/p3cu.txt 2>&1
        show /tmp/benchlogs/p3cu.txt | grep -v "host memory held"; grep "per-step" /tmp/benchlogs/p3cu.txt
        tail -3 /tmp/benchlogs/p3cu.txt; } > "$OUT/final13.txt" 2>&1
      cat "$OUT/final13.txt" ;;
    p3group)
      # P3's policy of session 10 (call 4): the GPU's weight unpacking by grouping (the profile's two
      # figures), profile_step's decode steps with the CLI's grouping and with FlexGen's, and the CLI
      # run re-predicted with the dim-1 rate
      { python3 -c "import json; g = json.load(open('$OUT/profile.json'))['gpu']; \
print('unpack G values/s: dim 0', round(g['dequant_gelem_s']), 'dim 1', round(g['dequant_dim1_gelem_s']))"
        for grp in "" flexgen-grouping; do
          echo "-- profile_step $grp"
          timeout 200 python3 benchmarks/profile_step.py facebook/opt-30b 32 3 20 80 100 0 100 0 overlap \
            compress-weight compress-cache no-kernels $grp 2>&1 | grep -E "^timings"; done
        bench P3c --timeout 120 --extra "--cut-gen-len 6 --debug-mode breakdown" > /tmp/benchlogs/p3g.txt 2>&1
        show /tmp/benchlogs/p3g.txt | grep -v "host memory held"; tail -2 /tmp/benchlogs/p3g.txt
        echo "-- P3c with FlexGen's grouping (64 along dim 0)"
        bench P3c --timeout 120 --extra "--cut-gen-len 6 --debug-mode breakdown --comp-weight-group 64 \
--comp-weight-dim 0 --comp-cache-group 64" > /tmp/benchlogs/p3g0.txt 2>&1
        show /tmp/benchlogs/p3g0.txt | grep -v "host memory held"; tail -2 /tmp/benchlogs/p3g0.txt; } > "$OUT/p3group.txt" 2>&1
      cat "$OUT/p3group.txt" ;;
    dequant14)
      # the row kernel for weights grouped along dim 1 (the CLI's default): its tiles against the
      # generic kernel, the GPU tests of the kernels, and P3c (call 4's P3 policy) with it
      { python3 -m pip install -q --no-index .whl_tests/*.whl 2>&1 | tail -1
        python3 -c "import json; g = json.load(open('$OUT/profile.json'))['gpu']; \
print('unpack G values/s: dim 0', round(g['dequant_gelem_s']), 'dim 1', round(g['dequant_dim1_gelem_s']))"
        timeout 120 python3 benchmarks/dequant_bench.py
        FLEXGEN_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -rf tests/test_triton_dequant.py \
          tests/test_compression.py 2>&1 | grep -E "^FAILED|passed|failed|Error" | cut -c1-400
        bench P3c --timeout 120 --extra "--cut-gen-len 6 --debug-mode breakdown" > /tmp/benchlogs/p3d.txt 2>&1
        show /tmp/benchlogs/p3d.txt | grep -v "host memory held"; tail -2 /tmp/benchlogs/p3d.txt
      } > "$OUT/dequant14.txt" 2>&1; cat "$OUT/dequant14.txt" ;;
    packed15)
      # decode steps over packed weights and cache on the GPU replayed as CUDA graphs
      # (FLEXGEN_CUDA_GRAPHS=packed) against eager, OPT-30B all on the GPU at 4 bits under the
      # 24 GiB cap, and the graph tests on the GPU (carry .whl_tests)
      { python3 -m pip install -q --no-index .whl_tests/*.whl 2>&1 | tail -1
        FLEXGEN_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -rf tests/test_cuda_graphs.py tests/test_triton_dequant.py 2>&1 \
          | grep -E "^FAILED|passed|failed" | cut -c1-300
        for mode in 1 packed; do
          echo "-- FLEXGEN_CUDA_GRAPHS=$mode"
          FLEXGEN_CUDA_GRAPHS=$mode bench P3c --timeout 150 --extra "--percent 100 0 100 0 100 0 --gpu-batch-size 16 \
--num-gpu-batches 1 --cut-gen-len 6" > /tmp/benchlogs/pk$mode.txt 2>&1
          show /tmp/benchlogs/pk$mode.txt | grep -v "host memory held"; grep -i "warn\|graph" /tmp/benchlogs/pk$mode.txt | head -3
          tail -1 /tmp/benchlogs/pk$mode.txt; done; } > "$OUT/packed15.txt" 2>&1; cat "$OUT/packed15.txt" ;;
    matmul16)
      # F.linear over packed weights (flexgen/memory/packed_matmul.py): the kernel by tile against
      # unpack + cuBLAS, its GPU tests, then OPT-30B all on the GPU at 4 bits under the 24 GiB cap
      # (P3g, 16 x 1): graphs (the default) / eager, kernel on / off (FLEXGEN_PACKED_MATMUL=0)
      { timeout 150 python3 benchmarks/packed_matmul_bench.py ${MM_TILES---tiles} 2>&1 | tail -${MM_TAIL:-80}
        python3 -m pip install -q --no-index .whl_tests/*.whl 2>&1 | tail -1
        FLEXGEN_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -rf tests/test_packed_matmul.py tests/test_cuda_graphs.py \
          tests/test_triton_dequant.py 2>&1 | grep -E "^FAILED|passed|failed" | cut -c1-300
        for run in ${MM_RUNS:-1:1 0:1 1:0}; do
          echo "-- FLEXGEN_CUDA_GRAPHS=${run%:*} FLEXGEN_PACKED_MATMUL=${run#*:}"
          FLEXGEN_CUDA_GRAPHS=${run%:*} FLEXGEN_PACKED_MATMUL=${run#*:} bench P3g --timeout 120 --extra "--cut-gen-len 6" \
            > /tmp/benchlogs/mm$run.txt 2>&1
          show /tmp/benchlogs/mm$run.txt | grep -v "host memory held"; grep -i "warn" /tmp/benchlogs/mm$run.txt | head -3
          tail -1 /tmp/benchlogs/mm$run.txt; done; } > "$OUT/matmul16.txt" 2>&1; cat "$OUT/matmul16.txt" ;;
    p12)
      # P1 and P2 (weights streamed from the CPU, fp16 and 4-bit) ours beside the original, for issue
      # 17's "keep >= 95% of the PCIe floor" (carry .whl_orig)
      { bench P1 P2 --timeout 200
        ORIG_TIMEOUT=200 bash benchmarks/original_flexgen/run.sh P1 P2 2>&1 | grep -A12 summary
      } > "$OUT/p12.txt" 2>&1; show "$OUT/p12.txt"; grep -E "^P[12]|throughput" "$OUT/p12.txt" ;;
    p3s12)
      # issue 17's P3 beside the original (carry .whl_orig): ours with the best measured policy (P3g)
      # to the end, ours with --percent auto (which predicts P3g's policy), the original's published
      # 30B policy projected from 5 steps (its 32 steps take ~2 minutes)
      { bench P3g --timeout 150; bench P3 --timeout 200
        ORIG_TIMEOUT=200 ORIG_EXTRA="--cut-gen-len 5" bash benchmarks/original_flexgen/run.sh P3 2>&1 | tail -5
      } > "$OUT/p3s12.txt" 2>&1; show "$OUT/p3s12.txt"; grep -E "^P3|throughput" "$OUT/p3s12.txt" ;;
    cache12)
      # the fused compressed-cache write against the per-segment one it replaced: identical bytes, host time
      { python3 benchmarks/cache_write_bench.py --percents 50 50 0
        python3 benchmarks/cache_write_bench.py --percents 100 0 0
        FLEXGEN_TEST_DEVICE=cuda python3 -m pytest -q -x tests/test_cache_writes.py tests/test_compression.py \
          tests/test_triton_dequant.py 2>&1 | tail -3; } > "$OUT/cache12.txt" 2>&1; cat "$OUT/cache12.txt" ;;
    *) echo "unknown part: $part" ;;
  esac
done
