"""Tokenizers for checkpoint sources. A directory without tokenizer files is not an error (a bare
weight dump can still be benchmarked with token ids), so that case returns None."""
from __future__ import annotations

import os

from .numpy_cache import WeightsError, reason

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "spiece.model", "vocab.txt")


def load_tokenizer(source):
    source = str(source)
    from transformers import AutoTokenizer
    if source.lower().endswith(".gguf"):
        d, name = os.path.split(os.path.abspath(source))
        kwargs = {"gguf_file": name}
    else:
        d, kwargs = source, {}
        if not any(os.path.isfile(os.path.join(d, f)) for f in _TOKENIZER_FILES):
            return None
    try:
        return AutoTokenizer.from_pretrained(d, **kwargs)
    except Exception as e:
        raise WeightsError(f"cannot load the tokenizer from {source}: {reason(e)}") from None
