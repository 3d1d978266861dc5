#!/usr/bin/env bash
# Run HERE (a machine with PyPI), from anywhere: prepares <repo>/.whl_orig/, which the device run
# carries (`carry: [".whl_orig"]`):
#   .whl_orig/flexgen-0.1.8-py3-none-any.whl   the ORIGINAL FlexGen (same import name as ours)
#   .whl_orig/attrs-*.whl                      its one import the device image may lack (flexgen/utils.py: `from attr import ...`)
#   .whl_orig/hf_home/hub/models--facebook--opt-{30b,6.7b}/   stand-in OPT tokenizer (make_tokenizer.py)
# Not fetched: pulp (a Requires-Dist of flexgen 0.1.8, imported only by experimental/cost_model.py,
# never by flexgen.flex_opt; its wheel carries CBC binaries, tens of MB). torch, transformers, numpy,
# tqdm, tokenizers, huggingface_hub are on the device.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DST="$REPO/.whl_orig"
PY="${PYTHON:-python3}"

grep -qxF '/.whl_orig/' "$REPO/.git/info/exclude" 2>/dev/null || {
    mkdir -p "$REPO/.git/info"; echo '/.whl_orig/' >> "$REPO/.git/info/exclude"; }

rm -rf "$DST"
mkdir -p "$DST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d "$DST" flexgen==0.1.8 attrs==26.1.0

# The tokenizer builder needs `tokenizers`; bring it into a scratch folder if this python lacks it.
if ! "$PY" -c "import tokenizers" 2>/dev/null; then
    SCRATCH="$(mktemp -d)"; trap 'rm -rf "$SCRATCH"' EXIT
    "$PY" -m pip install -q --target "$SCRATCH" tokenizers
    export PYTHONPATH="$SCRATCH${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" "$HERE/make_tokenizer.py" "$DST/hf_home/hub"

ls -la "$DST"
du -sh "$DST"
