#!/usr/bin/env bash
# Device side: run the ORIGINAL FlexGen (PyPI flexgen 0.1.8) on the benchmark scenarios of
# shared/DESIGN.md, with dummy weights and the stand-in tokenizer that setup.sh built.
# Needs `.whl_orig` carried. Usage: bash benchmarks/original_flexgen/run.sh [P1] [P2] [P4] ...
#   (default: P4 P1 P2). Extra flex_opt flags for every scenario: ORIG_EXTRA="--overlap false".
#   ORIG_TIMEOUT=SECONDS caps each scenario (default: none).
# Output: each scenario's whole output in $OUT/orig_<ID>.txt (or /tmp/orig_flexgen_out/), then a
# summary of the benchmark blocks.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SITE=/tmp/orig
LOGDIR="${OUT:-/tmp/orig_flexgen_out}"
mkdir -p "$LOGDIR"

ls "$REPO"/.whl_orig/flexgen-0.1.8-*.whl >/dev/null || { echo "no .whl_orig: run setup.sh here and carry .whl_orig"; exit 2; }
rm -rf "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$REPO"/.whl_orig/*.whl || exit 2
# No patches: flexgen 0.1.8 runs unchanged on torch 2.11 / numpy 2 / transformers 5 (README.md here).

# Only the original on the path; run from an empty folder, never the repo root (our package is
# also called `flexgen`).
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1
export HF_HOME="$REPO/.whl_orig/hf_home" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export HF_HUB_CACHE="$HF_HOME/hub"; unset TRANSFORMERS_CACHE HUGGINGFACE_HUB_CACHE
WORK=/tmp/orig_flexgen_run
mkdir -p "$WORK" && cd "$WORK" || exit 2
python3 - <<'EOF' || exit 2
import flexgen, flexgen.flex_opt, torch, transformers, numpy
assert flexgen.__file__.startswith("/tmp/orig/"), f"wrong flexgen: {flexgen.__file__}"
from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained("facebook/opt-30b", padding_side="left")
ids = t(["Paris is the capital city of"], padding="max_length", max_length=512).input_ids[0]
assert len(ids) == 512 and sum(i != 1 for i in ids) == 7, ids[-10:]
print(f"original flexgen at {flexgen.__file__}; torch {torch.__version__}, transformers "
      f"{transformers.__version__}, numpy {numpy.__version__}; GPU {torch.cuda.get_device_name(0)}")
EOF

COMMON="--path _DUMMY_ --prompt-len 512 --gen-len 32 --offload-dir /tmp/orig_flexgen_offload"
P1="--model facebook/opt-30b --percent 0 100 100 0 100 0 --gpu-batch-size 8 --num-gpu-batches 3"
declare -A SC=(
    [P1]="$P1"
    [P2]="$P1 --compress-weight"
    # its published OPT-30B policy (FlexGen's benchmark/flexgen/bench_suite.py), P3's figure to beat
    [P3]="--model facebook/opt-30b --percent 0 100 0 100 0 100 --gpu-batch-size 16 --num-gpu-batches 8 --compress-cache"
    [P4]="--model facebook/opt-6.7b --percent 100 0 100 0 100 0 --gpu-batch-size 8 --num-gpu-batches 1"
)
IDS=("$@"); [ ${#IDS[@]} -eq 0 ] && IDS=(P4 P1 P2)
TO=(); [ -n "${ORIG_TIMEOUT:-}" ] && TO=(timeout "$ORIG_TIMEOUT")
status=0
for id in "${IDS[@]}"; do
    [ -n "${SC[$id]:-}" ] || { echo "unknown scenario $id (known: ${!SC[*]})"; status=2; continue; }
    args="${SC[$id]} $COMMON --log-file $WORK/orig_$id.log ${ORIG_EXTRA:-}"
    echo "=== original FlexGen $id: python3 -m flexgen.flex_opt $args"
    t0=$(date +%s)
    "${TO[@]}" python3 -m flexgen.flex_opt $args 2>&1 | tee "$LOGDIR/orig_$id.txt"
    rc=${PIPESTATUS[0]}
    echo "=== $id rc=$rc wall=$(( $(date +%s) - t0 )) s"
    [ "$rc" -eq 0 ] || status=1
    rm -rf /tmp/orig_flexgen_offload
done

echo "=== summary (original FlexGen 0.1.8)"
for id in "${IDS[@]}"; do
    f="$LOGDIR/orig_$id.txt"; [ -f "$f" ] || continue
    echo "--- $id"
    grep -E "^(prefill latency|decode latency|total latency|peak gpu mem)" "$f" || echo "(no benchmark block; see $f)"
done
exit $status
