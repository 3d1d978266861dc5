#!/usr/bin/env bash
# Issue 16: pipeline parallelism on 2 and 4 GPUs (nvidia-h200-x2 / -x4), one device call per part:
#   p1     P1 (OPT-30B, --percent 0 100 100 0 100 0, 8 x 3 per micro-batch) on 1, 2 (, 4) GPUs, and the
#          original FlexGen 0.1.8's dist_flex_opt on the same flags (carry .whl_orig; its ranks are
#          started by hand with --head-ip --port --rank --local-rank --world-size)
#   p2     the same with --compress-weight (P2)
#   big    OPT-175B with 4-bit weights, --percent auto per rank, on 2 (and 4) GPUs
# Usage (repository root): bash benchmarks/dist_scaling.sh p1   (then p2, then big)
# RANKS overrides the rank counts (default: 1,2 on two GPUs, 1,2,4 on four). NVLink multicast
# stays off (NCCL_NVLS_ENABLE=0 as the machine sets it); hidden states go GPU to GPU over NCCL.
# Expectation: near-linear scaling (each rank streams 1/N of the weights over its own PCIe link):
# >= 1.8x on 2 GPUs, >= 3.3x on 4. The table is printed last; logs in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=. NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -8
lscpu | grep -E "Model name|NUMA node\(s\)"; free -g | sed -n 2p; date -u
NGPU=$(nvidia-smi -L | wc -l)
DEFAULT=1,2; [ "$NGPU" -ge 4 ] && DEFAULT=1,2,4
RANKS=${RANKS:-$DEFAULT}
ORIG=""
if ls .whl_orig/flexgen-0.1.8-*.whl >/dev/null 2>&1; then
  rm -rf /tmp/orig && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/orig .whl_orig/*.whl \
    && ORIG=--orig
  export HF_HOME="$PWD/.whl_orig/hf_home" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  export HF_HUB_CACHE="$HF_HOME/hub"
fi
for part in "$@"; do
  echo "=== $part (ranks $RANKS)"
  case $part in
    p1)  timeout 590 python3 benchmarks/dist_bench.py P1 --ranks "$RANKS" $ORIG --timeout 200 --out "$OUT" 2>&1 | tail -16 ;;
    p2)  timeout 590 python3 benchmarks/dist_bench.py P2 --ranks "$RANKS" --timeout 200 --out "$OUT" 2>&1 | tail -14 ;;
    big) R=${RANKS#1,}; timeout 590 python3 benchmarks/dist_bench.py O175C --ranks "$R" --timeout 560 --out "$OUT" 2>&1 | tail -14 ;;
    *) echo "unknown part $part (p1, p2, big)" ;;
  esac
done
