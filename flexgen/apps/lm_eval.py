"""lm-evaluation-harness's command line with FlexGen as the model:

    python3 -m flexgen.apps.lm_eval --model_args model=smollm2-135m,percent=0:100:100:0:100:0,gpu_batch_size=8 \\
        --tasks hellaswag --limit 100

Every argument is lm-eval's own (`lm-eval run --help`); `--model` defaults to flexgen. model_args
are FlexGen's flags with underscores (see flexgen.integrations.lm_eval). A bad model_arg or
policy ends with one `error:` line and exit status 2.
"""
from __future__ import annotations

import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    from ..cli import main_errors
    from ..integrations import lm_eval as backend  # registers --model flexgen
    from lm_eval.__main__ import cli_evaluate

    if argv and argv[0] not in ("run", "ls", "validate", "-h", "--help"):
        argv.insert(0, "run")
    if argv and argv[0] == "run" and not any(a in ("--model", "-M") or a.startswith("--model=") for a in argv):
        argv[1:1] = ["--model", "flexgen"]
    sys.argv = ["lm-eval"] + argv
    main_errors(cli_evaluate, extra=(backend.ModelArgsError,))


if __name__ == "__main__":
    main()
