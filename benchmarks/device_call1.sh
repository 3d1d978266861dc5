#!/usr/bin/env bash
# Session 2, device call 1: PCIe bandwidth, the machine profile (saved to $OUT/profile.json for the
# later calls), P4 ours beside the original twice (interleaved), P2 (4-bit weights from CPU, issue
# 4) and LLaMA-2-70B with 4-bit weights (issue 3). Carry .whl_orig.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
lscpu | grep -E "Model name|^CPU\(s\)"
lscpu | grep -o -w -E "avx512f|avx512_bf16|avx512_fp16|amx_bf16|amx_tile|f16c" | sort -u | tr '\n' ' '; echo
free -g | head -2
PYTHONPATH=. python3 benchmarks/bandwidth.py 2
PYTHONPATH=. timeout 150 python3 -m flexgen.profile --out "$OUT/profile.json" --offload-dir /tmp/flexgen_prof 2>&1 | tail -6
export FLEXGEN_PROFILE=$OUT/profile.json
show() { grep -E "predicted vs|peak host|peak gpu|total throughput|decode throughput|timeout|rror" "$1" | tail -7; }
for r in a b; do
  PYTHONPATH=. python3 benchmarks/bench.py P4 --out "$OUT" --timeout 150 > "$OUT/ours_p4$r.txt" 2>&1; show "$OUT/ours_p4$r.txt"
  ORIG_TIMEOUT=150 bash benchmarks/original_flexgen/run.sh P4 > "$OUT/orig_p4$r.txt" 2>&1; grep -A8 summary "$OUT/orig_p4$r.txt" | grep -E "throughput|latency"
done
for s in P2 L70C; do
  PYTHONPATH=. python3 benchmarks/bench.py $s --out "$OUT" --timeout 220 > "$OUT/$s.txt" 2>&1; show "$OUT/$s.txt"; grep -E "host memory held" "$OUT/$s.txt"
done
echo "=== table"; for f in ours_p4a ours_p4b P2 L70C; do tail -1 "$OUT/$f.txt"; done
