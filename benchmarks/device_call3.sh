#!/usr/bin/env bash
# Session 2, device call 3 (issue 6): the profile, predicted vs measured for nine policies over
# OPT-6.7B/13B/30B, and P3 with --percent auto (GPU capped at 24 GiB, host 110 GiB).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/benchlogs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
PYTHONPATH=. python3 benchmarks/pinned_probe.py
PYTHONPATH=. timeout 120 python3 -m flexgen.profile --out "$OUT/profile.json" --offload-dir /tmp/flexgen_prof 2>&1 | tail -4
export FLEXGEN_PROFILE=$OUT/profile.json
PYTHONPATH=. python3 benchmarks/bench.py V1 V2 V3 V5 V6 V9 V4 V7 V8 P3 --out /tmp/benchlogs --timeout 200 > "$OUT/validate.txt" 2>&1
grep -E "auto policy|predicted vs|rror|Killed|exit status" "$OUT/validate.txt"
echo "=== table"; tail -11 "$OUT/validate.txt"
