"""From what the user typed (a name, a config, a local directory, a .gguf file) to a model family,
its config, and where its weights and tokenizer come from."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .base import ModelFamily
from .llama import LlamaConfig, LlamaFamily, get_llama_config
from .mixtral import MixtralConfig, MixtralFamily, get_mixtral_config
from .opt import OptConfig, OptFamily, get_opt_config

EMBEDDED_DEFAULT = "smollm2-135m"

# Hugging Face architecture name -> (family name, config class, family class). The family name is
# the entry point's (flex_opt, flex_llama); Qwen2, Mistral and Mixtral run as LLaMA variants.
ARCHITECTURES = {
    "OPTForCausalLM": ("opt", OptConfig, OptFamily),
    "LlamaForCausalLM": ("llama", LlamaConfig, LlamaFamily),
    "Qwen2ForCausalLM": ("llama", LlamaConfig, LlamaFamily),
    "MistralForCausalLM": ("llama", LlamaConfig, LlamaFamily),
    "MixtralForCausalLM": ("llama", MixtralConfig, MixtralFamily),
}
# model_type (for configs without `architectures`) -> the same
MODEL_TYPES = {"opt": "OPTForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}
# family name -> [(config class, family class, known-name lookup)], tried in order
FAMILIES = {"opt": [(OptConfig, OptFamily, get_opt_config)],
            "llama": [(LlamaConfig, LlamaFamily, get_llama_config),
                      (MixtralConfig, MixtralFamily, get_mixtral_config)]}


class ModelNotFound(ValueError):
    """An unknown model name or an unusable checkpoint, with a message meant for the user."""


@dataclass
class ResolvedModel:
    family: ModelFamily
    name: str                 # short name: the weight cache is <path>/<name>-np (-np-float32 for float32 compute)
    source: str | None        # local HF directory or .gguf file to convert weights from
    hub_name: str | None      # hub name to fetch a checkpoint from when no local source


def _from_hf_dict(d: dict, name: str, source: str) -> ModelFamily:
    """The family of a config dict read from source (config.json or a .gguf); a config that lacks
    what its family needs, or holds nonsense, is a ModelNotFound naming source."""
    if not isinstance(d, dict):
        raise ModelNotFound(f"{source}: the config is a JSON {type(d).__name__}, not an object")
    archs = d.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    model_type = d.get("model_type")
    arch = next((a for a in list(archs) + [MODEL_TYPES.get(model_type)] if isinstance(a, str) and a in ARCHITECTURES),
                None)
    if arch is None:
        raise ModelNotFound(f"{source}: architecture {archs or model_type} is not supported "
                            f"(supported: {', '.join(ARCHITECTURES)})")
    _, cfg_cls, fam_cls = ARCHITECTURES[arch]
    try:
        family = fam_cls(cfg_cls.from_hf(d, name=name))
        family.info()       # derived sizes (head_dim ...) must work too
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        msg = str(e) if isinstance(e, ValueError) else f"malformed config ({type(e).__name__}: {e})"
        raise ModelNotFound(f"{source}: {msg}") from None
    return family


def is_gguf_model(model) -> bool:
    """Whether the model's weights come from a GGUF file (without reading it)."""
    if not isinstance(model, (str, os.PathLike)):
        return False
    m = os.fspath(model)
    return m.lower() == EMBEDDED_DEFAULT or m.lower().endswith(".gguf")


def resolve_model(model, family: str | None = None) -> ResolvedModel:
    """family restricts the answer ("opt" for flex_opt, "llama" for flex_llama)."""
    if isinstance(model, (OptConfig, LlamaConfig)):
        fam_cls = (OptFamily if isinstance(model, OptConfig) else
                   MixtralFamily if isinstance(model, MixtralConfig) else LlamaFamily)
        resolved = ResolvedModel(fam_cls(model), model.name.split("/")[-1], None, None)
    elif isinstance(model, (str, os.PathLike)):
        resolved = _resolve_str(os.fspath(model), family)
    else:
        raise ModelNotFound(f"model must be a name, a path or a config, got {type(model).__name__}")
    if family is not None and resolved.family.family != family:
        entry = {"opt": "flexgen.flex_opt", "llama": "flexgen.flex_llama"}[resolved.family.family]
        raise ModelNotFound(f"{model}: this is a {resolved.family.family.upper()} model; run it with "
                            f"python3 -m {entry}")
    return resolved


def _resolve_str(model: str, family: str | None) -> ResolvedModel:
    from .. import weights

    if model.lower() == EMBEDDED_DEFAULT:
        model = weights.find_smollm2_gguf()
    path = os.path.expanduser(model)
    if os.path.isfile(path) and path.endswith(".gguf"):
        d = weights.read_checkpoint_config(path)
        name = os.path.basename(path)[: -len(".gguf")]
        return ResolvedModel(_from_hf_dict(d, name, path), name, path, None)
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ModelNotFound(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        try:
            with open(cfg_path) as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise ModelNotFound(f"{cfg_path} cannot be read: {e}") from None
        name = os.path.basename(os.path.normpath(path))
        return ResolvedModel(_from_hf_dict(d, name, cfg_path), name, path, None)
    if model.startswith(("/", ".", "~")) or model.endswith(".gguf") or model.count("/") > 1:
        raise ModelNotFound(f"{model}: no such file or directory")
    for fam, entries in FAMILIES.items():
        if family is not None and fam != family:
            continue
        for _, fam_cls, get_config in entries:
            try:
                cfg = get_config(model)
            except KeyError:
                continue
            return ResolvedModel(fam_cls(cfg), model.split("/")[-1], None, model if "/" in model else None)
    known = sorted(k for fam in FAMILIES if family in (None, fam) for k in _known_names(fam))
    raise ModelNotFound(f"unknown model {model!r}: give a local checkpoint directory, a .gguf file, "
                        f"{EMBEDDED_DEFAULT!r}, or one of: {', '.join(known)}")


def _known_names(fam):
    from . import llama, mixtral, opt
    return list(opt.KNOWN_CONFIGS) if fam == "opt" else list(llama.KNOWN_CONFIGS) + list(mixtral.KNOWN_CONFIGS)
