"""Weight readers and the FlexGen numpy weight cache.

Sources: a local Hugging Face checkpoint dir (safetensors or .bin, sharded or not), a llama.cpp
.gguf file (LLaMA), or a hub name. Every source is converted once into the numpy cache, which the
engine then memory-maps tensor by tensor.
"""
from .convert import convert_checkpoint, read_checkpoint_config, resolve_hub_checkpoint
from .gguf_file import find_smollm2_gguf
from .numpy_cache import WeightsError, cache_is_complete, load_cached
from .tokenizer import load_tokenizer

__all__ = ["WeightsError", "cache_is_complete", "load_cached", "convert_checkpoint",
           "read_checkpoint_config", "load_tokenizer", "find_smollm2_gguf", "resolve_hub_checkpoint"]
