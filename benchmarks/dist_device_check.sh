#!/usr/bin/env bash
# Issue 15's device check, on ONE GPU: 2 ranks share it, hidden states through host memory
# (--comm-device cpu; NCCL cannot join two ranks on one GPU). Parts, one or more per call:
#   tokens   fp16 greedy tokens of the pipeline (torchrun, 2 ranks) == one process, for random
#            OPT and LLaMA checkpoints (12 layers, hidden 1024) and four placements   (~3 min)
#   o67      throughput: OPT-6.7B all on the GPU, 1 process vs 2 ranks (+ --async-comm)  (~3 min)
#   p1       throughput: P1 (OPT-30B, weights streamed from CPU), 1 process vs 2 ranks    (~6 min)
# Usage (repository root): bash benchmarks/dist_device_check.sh tokens o67 ; bash benchmarks/dist_device_check.sh p1
# Each part prints a short table last; full logs in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
lscpu | grep -E "Model name"; free -g | sed -n 2p; date -u
PYTHON=python3
RUN="$PYTHON benchmarks/dist_tokens.py run"
TR="$PYTHON -m torch.distributed.run --nproc-per-node 2 --master-port 29544 benchmarks/dist_tokens.py run"

for part in "$@"; do
  echo "=== $part"
  case $part in
    tokens)
      $PYTHON benchmarks/dist_tokens.py build /tmp/dist_ckpt > "$OUT/tokens_build.txt" 2>&1 || { tail -5 "$OUT/tokens_build.txt"; continue; }
      : > "$OUT/tokens.txt"
      for model in opt-mid llama-mid; do
        for pol in "100 0 100 0 100 0" "0 100 100 0 100 0|--async-comm" "30 50 0 100 100 0|--cpu-cache-compute" \
                   "0 100 50 50 100 0|--compress-weight --compress-cache"; do
          pct=${pol%%|*}; extra=""; [ "$pol" != "$pct" ] && extra=${pol#*|}
          one_extra=${extra/--async-comm/}
          tag="$model $pct $extra"
          $RUN --model /tmp/dist_ckpt/$model --percent $pct $one_extra --out /tmp/one.npy >> "$OUT/tokens.txt" 2>&1
          $TR --model /tmp/dist_ckpt/$model --percent $pct $extra --comm-device cpu --out /tmp/pp.npy >> "$OUT/tokens.txt" 2>&1
          echo "$tag: $($PYTHON benchmarks/dist_tokens.py compare /tmp/one.npy /tmp/pp.npy 2>&1 | tail -1)"
          rm -f /tmp/one.npy /tmp/pp.npy
        done
      done | tee "$OUT/tokens_table.txt"
      grep -E "token/s" "$OUT/tokens.txt" | tail -4 ;;
    o67)
      timeout 560 $PYTHON benchmarks/dist_bench.py O67 --ranks 1,2 --comm-device cpu --timeout 240 --out "$OUT" 2>&1 | tail -12
      timeout 300 $PYTHON benchmarks/dist_bench.py O67 --ranks 2 --comm-device cpu --async-comm --timeout 240 --out "$OUT/async" 2>&1 | tail -5 ;;
    p1)
      timeout 590 $PYTHON benchmarks/dist_bench.py P1 --ranks 1,2 --comm-device cpu --timeout 360 --out "$OUT" 2>&1 | tail -12 ;;
    *) echo "unknown part $part (tokens, o67, p1)" ;;
  esac
done
