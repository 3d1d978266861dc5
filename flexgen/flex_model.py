"""Any family, one entry point: `python3 -m flexgen.flex_model --model NAME|DIR|FILE.gguf ...`.

The family comes from the model itself (a known name, the checkpoint's config.json or the GGUF
metadata), and the run is exactly flex_opt's or flex_llama's (LLaMA, Qwen2, Mistral, Mixtral),
with the same flags, defaults and benchmark log."""
from __future__ import annotations

import sys

from .cli import main_errors

DEFAULT_MODEL = "smollm2-135m"


def model_arg(argv) -> str:
    """The value of --model in argv (argparse's spellings: --model X, --model=X), else the default."""
    for i, a in enumerate(argv):
        if a == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--model="):
            return a.split("=", 1)[1]
    return DEFAULT_MODEL


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        from .flex_llama import main as llama_main
        return llama_main(argv)
    from .cli import lm_class_for
    cls = main_errors(lambda: lm_class_for(model_arg(argv)))
    if cls.family_name == "opt":
        from .flex_opt import main as entry
    else:
        from .flex_llama import main as entry
    return entry(argv)


if __name__ == "__main__":
    main()
