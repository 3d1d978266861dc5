"""The LLaMA family over a pipeline of ranks: `torchrun --nproc-per-node N -m flexgen.dist_flex_llama
[flex_llama's flags]` (launch flags as flexgen.dist_flex_opt). See flexgen/dist/."""
from .dist.cli import main as _main
from .flex_llama import LlamaLM


def main(argv=None):
    _main(LlamaLM, "smollm2-135m", "~/llama_weights", "dist-fl", argv)


if __name__ == "__main__":
    main()
