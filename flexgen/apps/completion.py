"""Complete few-shot prompts, as in the original FlexGen's `flexgen/apps/completion.py`:

    python3 -m flexgen.apps.completion                       # the embedded SmolLM2-135M
    python3 -m flexgen.apps.completion --model facebook/opt-1.3b --percent 0 100 100 0 100 0

Sampling at temperature 0.7, up to 32 new tokens (--gen-len), stopping at a newline. The model
family (OPT or LLaMA) follows from --model; the policy flags are flex_opt's / flex_llama's.
`--prompt TEXT` (repeatable) replaces the built-in prompts. --prompt-len, --cut-gen-len,
--debug-mode and the log flags are accepted for compatibility and not used.
"""
from __future__ import annotations

import argparse
import sys

from ..cli import add_arguments, policy_from_args
from ..engine.generate import GenerationError
from ..env import ExecutionEnv
from ..memory.disk import DiskFullError
from ..models.registry import EMBEDDED_DEFAULT, ModelNotFound, resolve_model
from ..policy import PolicyError
from ..text import generate_text
from ..weights import WeightsError

PROMPTS = [
    "Question: Where were the 2004 Olympics held?\n"
    "Answer: Athens, Greece\n"
    "Question: What is the longest river on the earth?\n"
    "Answer:",

    "Extract the airport codes from this text.\n"
    "Text: \"I want a flight from New York to San Francisco.\"\n"
    "Airport codes: JFK, SFO.\n"
    "Text: \"I want you to book a flight from Phoenix to Las Vegas.\"\n"
    "Airport codes:",
]

# The errors flexgen.cli.main turns into one `error:` line and exit status 2.
USER_ERRORS = (PolicyError, ModelNotFound, WeightsError, GenerationError, DiskFullError)

DEFAULT_PATHS = {"opt": "~/opt_weights", "llama": "~/llama_weights"}


def model_class(model):
    """OptLM or LlamaLM, whichever family the model (name, directory, .gguf, config) belongs to."""
    family = resolve_model(model).family.family
    if family == "opt":
        from ..flex_opt import OptLM
        return OptLM
    from ..flex_llama import LlamaLM
    return LlamaLM


def load_model(args, policy):
    """(lm, env) for args.model on args.device, weights cached under args.path (default: the
    family's FlexGen default). The caller closes both (lm.close(); env.close_copy_threads())."""
    cls = model_class(args.model)
    path = args.path or DEFAULT_PATHS[cls.family_name]
    env = ExecutionEnv.create(args.offload_dir, device=args.device)
    try:
        lm = cls(args.model, env, path, policy, progress=args.verbose >= 1)
    except BaseException:
        env.close_copy_threads()
        raise
    if lm.tokenizer is None:
        lm.close()
        env.close_copy_threads()
        raise WeightsError(f"{args.model}: no tokenizer found next to the checkpoint; text prompts need one")
    return lm, env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m flexgen.apps.completion",
                                     description="Complete few-shot prompts (FlexGen's completion example).")
    add_arguments(parser, EMBEDDED_DEFAULT, None)
    # As in FlexGen's example, one GPU batch holds all the prompts unless told otherwise.
    parser.set_defaults(gpu_batch_size=None)
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    return parser


def run(args, out=None) -> list:
    out = out or sys.stdout
    prompts = args.prompt or PROMPTS
    if args.gpu_batch_size is None:
        args.gpu_batch_size = len(prompts)
    if args.temperature < 0:
        raise GenerationError(f"--temperature must be >= 0, got {args.temperature}")
    policy = policy_from_args(args)
    print("Initialize...", file=out, flush=True)
    lm, env = load_model(args, policy)
    try:
        print("Generate...", file=out, flush=True)
        completions = generate_text(lm, prompts, max_new_tokens=args.gen_len, do_sample=args.temperature > 0,
                                    temperature=args.temperature, seed=args.seed, stop=["\n"], chat=args.chat)
        print("Outputs:\n" + 70 * "-", file=out)
        for i, (prompt, c) in enumerate(zip(prompts, completions)):
            print(f"{i}: {prompt}{c.text}", file=out)
            print("-" * 70, file=out)
        print("Shutdown...", file=out, flush=True)
        return completions
    finally:
        lm.close()
        env.close_copy_threads()


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
