"""LLaMA-1/2/3 and its variants Qwen2/Qwen2.5, Mistral and Mixtral (any LlamaForCausalLM,
Qwen2ForCausalLM, MistralForCausalLM or MixtralForCausalLM checkpoint, LLaMA or Qwen2 GGUF, or
known name) with FlexGen's API and CLI: `python3 -m flexgen.flex_llama --model smollm2-135m`."""
from .cli import main as _main
from .engine.generate import LM
from .env import ExecutionEnv
from .models.llama import LlamaConfig, get_llama_config
from .policy import CompressionConfig, Policy

__all__ = ["LlamaLM", "Policy", "ExecutionEnv", "CompressionConfig", "LlamaConfig", "get_llama_config"]


class LlamaLM(LM):
    """LlamaLM(model, env, path, policy): a known name, a LlamaConfig / MixtralConfig, a checkpoint
    dir or a .gguf of the LLaMA family or its variants (the architecture is read from the config)."""
    family_name = "llama"


def main(argv=None):
    _main(LlamaLM, "smollm2-135m", "~/llama_weights", "fl", argv)


if __name__ == "__main__":
    main()
