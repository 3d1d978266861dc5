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

from ..cli import add_arguments, main_errors, open_model, policy_from_args
from ..engine.generate import GenerationError
from ..models.registry import EMBEDDED_DEFAULT
from ..text import generate_text

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
    lm, env = open_model(args, policy, need_tokenizer=True)
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
    main_errors(lambda: run(args))


if __name__ == "__main__":
    main()
