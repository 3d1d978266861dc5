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

    def run():
        if "--model" not in argv or argv[argv.index("--model") + 1:][:1] == ["flexgen"]:
            _check_model_args(argv, backend)   # a typo fails in a second, not after lm-eval indexes its tasks
        cli_evaluate()

    main_errors(run, extra=(backend.ModelArgsError,))


def _check_model_args(argv, backend):
    import json

    from lm_eval.utils import simple_parse_args_string
    for flag in ("--model_args", "-a"):
        if flag not in argv:
            continue
        given = {}
        for value in argv[argv.index(flag) + 1:]:
            if value.startswith("-"):
                break
            if value.lstrip().startswith("{"):
                try:
                    given.update(json.loads(value))
                except ValueError:
                    return          # lm-eval reports it
            else:
                given.update(simple_parse_args_string(value))
        backend.flexgen_args(**{k: v for k, v in given.items() if k not in backend.BACKEND_OPTIONS})


if __name__ == "__main__":
    main()
