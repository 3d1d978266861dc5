"""LLaMA-1/2/3 (and any LlamaForCausalLM checkpoint or LLaMA GGUF) with FlexGen's API and CLI:
`python3 -m flexgen.flex_llama --model smollm2-135m`."""
from .cli import main as _main
from .engine.generate import LM
from .env import ExecutionEnv
from .models.llama import LlamaConfig, get_llama_config
from .policy import CompressionConfig, Policy

__all__ = ["LlamaLM", "Policy", "ExecutionEnv", "CompressionConfig", "LlamaConfig", "get_llama_config"]


class LlamaLM(LM):
    """LlamaLM(model, env, path, policy): a LLaMA name, a LlamaConfig, a checkpoint dir or a .gguf."""
    family_name = "llama"


def main(argv=None):
    _main(LlamaLM, "smollm2-135m", "~/llama_weights", "fl", argv)


if __name__ == "__main__":
    main()
