"""OPT with FlexGen's API and CLI: `python3 -m flexgen.flex_opt --model facebook/opt-1.3b ...`.

Scripts written for the original FlexGen import from here:
    from flexgen.flex_opt import Policy, OptLM, ExecutionEnv, CompressionConfig
"""
from .cli import main as _main
from .engine.generate import LM
from .env import ExecutionEnv
from .models.opt import OptConfig, get_opt_config
from .policy import CompressionConfig, Policy

__all__ = ["OptLM", "Policy", "ExecutionEnv", "CompressionConfig", "OptConfig", "get_opt_config"]


class OptLM(LM):
    """OptLM(model, env, path, policy): model is an OPT name, an OptConfig or a checkpoint dir."""
    family_name = "opt"


def main(argv=None):
    _main(OptLM, "facebook/opt-6.7b", "~/opt_weights", "fo", argv)


if __name__ == "__main__":
    main()
