"""Checkpoint sources (a local Hugging Face directory, a .gguf file, a hub name) and their
conversion into the numpy weight cache, one tensor at a time so the model is never held twice."""
from __future__ import annotations

import glob
import json
import os

import numpy as np

from .gguf_file import count_tensors, gguf_config, gguf_tensor_meta, iter_gguf_tensors, open_gguf
from .numpy_cache import CacheWriter, WeightsError, reason

# Non-parameter buffers some checkpoints carry; the engine recomputes them.
_SKIP_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias", "position_ids")


def _is_gguf(source) -> bool:
    return str(source).lower().endswith(".gguf")


def _hf_weight_files(d) -> list[str]:
    """The weight files of an HF dir: safetensors preferred over .bin; a shard index, when present,
    names the files (repos sometimes carry extra files such as consolidated.safetensors)."""
    for index, pattern in (("model.safetensors.index.json", "*.safetensors"),
                           ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        ipath = os.path.join(d, index)
        if os.path.isfile(ipath):
            try:
                with open(ipath) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise WeightsError(f"cannot read shard index {ipath}: {reason(e)}") from None
            files = [os.path.join(d, s) for s in shards]
            missing = [s for s, f in zip(shards, files) if not os.path.isfile(f)]
            if missing:
                raise WeightsError(f"checkpoint shard {missing[0]} listed in {index} is missing from {d}")
            return files
        files = sorted(glob.glob(os.path.join(d, pattern)))
        if files:
            return files
    raise WeightsError(f"no weight files (*.safetensors or pytorch_model*.bin) in {d}")


def read_checkpoint_config(source) -> dict:
    source = str(source)
    if _is_gguf(source):
        if not os.path.isfile(source):
            raise WeightsError(f"GGUF file {source} does not exist")
        return gguf_config(source)
    if not os.path.isdir(source):
        raise WeightsError(f"checkpoint {source} is neither a directory nor a .gguf file")
    path = os.path.join(source, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"no config.json in {source} (not a Hugging Face checkpoint directory)") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: {reason(e)}") from None
    _hf_weight_files(source)  # fail now, not after the user waited for the model to be built
    return cfg


def _cache_name(key: str) -> str | None:
    if key.endswith(_SKIP_SUFFIXES):
        return None
    return key[len("model."):] if key.startswith("model.") else key


# Tensor metadata from a file's header, without reading its data: key -> (shape, dtype name, is float).
_SAFETENSORS_FLOATS = {"F16", "BF16", "F32", "F64"}


def _open_safetensors(path):
    from safetensors import safe_open
    f = safe_open(path, framework="pt")  # "pt" so bfloat16 checkpoints read too
    meta = {}
    for key in f.keys():
        sl = f.get_slice(key)
        dtype = sl.get_dtype()
        meta[key] = (tuple(sl.get_shape()), dtype, dtype in _SAFETENSORS_FLOATS)
    return meta, f.get_tensor


def _open_bin(path):
    import torch
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # pre-zipfile checkpoints cannot be mapped; read them plainly
            raise
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"holds a {type(sd).__name__}, not a state dict")
    meta = {k: ((tuple(t.shape), str(t.dtype).replace("torch.", ""), t.is_floating_point()) if torch.is_tensor(t)
                else ((), type(t).__name__, False)) for k, t in sd.items()}
    return meta, sd.__getitem__


def check_tensors(expected: dict, present: dict, what: str) -> None:
    """Every tensor the model needs is present, with its shape and a floating-point dtype.
    expected: cache name -> shape; present: cache name -> (file, shape, dtype name, is float)."""
    missing = [n for n in expected if n not in present]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise WeightsError(f"{what} lacks tensor {', '.join(missing[:3])}{more}, which its config needs")
    for name, shape in expected.items():
        file, got, dtype, is_float = present[name]
        if tuple(got) != tuple(shape):
            raise WeightsError(f"{file}: tensor {name} has shape {tuple(got)}, its config needs {tuple(shape)}")
        if not is_float:
            raise WeightsError(f"{file}: tensor {name} has dtype {dtype}, not a floating-point type")


def _iter_hf_tensors(d, expected=None, dtype=np.float16):
    """Yield (total, None, None) first, then (file, cache name, array of `dtype`) per tensor."""
    import torch
    to = torch.float32 if dtype == np.float32 else torch.float16
    opened, present = [], {}
    for path in _hf_weight_files(d):
        try:
            meta, get = (_open_safetensors if path.endswith(".safetensors") else _open_bin)(path)
        except Exception as e:
            raise WeightsError(f"checkpoint file {path} is truncated or corrupt: {reason(e)}") from None
        opened.append((path, meta, get))
        for key, (shape, dtype, is_float) in meta.items():
            name = _cache_name(key)
            if name is not None and (name not in present or not present[name][3]):
                present[name] = (path, shape, dtype, is_float)
    if expected is not None:
        check_tensors(expected, present, f"checkpoint {d}")
    yield sum(_cache_name(k) is not None for _, meta, _ in opened for k in meta), None, None
    for path, meta, get in opened:
        for key, (_, _, is_float) in meta.items():
            name = _cache_name(key)
            if name is None or not is_float:
                continue
            try:
                arr = get(key).to(to).numpy()
            except Exception as e:
                raise WeightsError(f"checkpoint file {path} is truncated or corrupt "
                                   f"(reading {key}): {reason(e)}") from None
            yield path, name, arr


def convert_checkpoint(source, cache_dir, progress=True, expected: dict | None = None,
                       dtype=np.float16) -> None:
    """Convert an HF checkpoint directory or a .gguf file into the numpy cache at cache_dir, in
    `dtype` (float16: FlexGen's cache; float32 for float32 compute).
    expected (cache name -> shape, what the model will read) is checked against the checkpoint's
    headers before anything is written."""
    from tqdm.auto import tqdm
    source = str(source)
    read_checkpoint_config(source)  # validates the source before anything is written
    if _is_gguf(source):
        reader = open_gguf(source)
        if expected is not None:
            check_tensors(expected, gguf_tensor_meta(source, reader), f"GGUF file {source}")
        total = count_tensors(reader)
        tensors = ((source, n, w) for n, w in iter_gguf_tensors(source, reader))
    else:
        tensors = _iter_hf_tensors(source, expected, dtype)
        total = next(tensors)[0]
    writer = CacheWriter(cache_dir, source, dtype)
    seen = set()
    try:
        with tqdm(total=total, desc="converting weights", unit="tensor", disable=not progress) as bar:
            for _, name, arr in tensors:
                if name not in seen:  # tied copies in a .bin (e.g. OPT lm_head) appear twice
                    seen.add(name)
                    writer.write(name, np.asarray(arr))
                bar.update(1)
        writer.finish()
    except BaseException:
        # Keep the files of an interrupted run (no marker, so it is redone) except a temp file.
        for p in writer.written:
            if os.path.basename(p).endswith(".tmp") and os.path.exists(p):
                os.remove(p)
        raise


def resolve_hub_checkpoint(name) -> str | None:
    """Local snapshot dir for a hub model name, downloading config, tokenizer and weights if needed.
    Returns None when `name` is not a valid hub repo id (so the caller can try other meanings)."""
    import huggingface_hub as hub
    if not isinstance(name, str) or name.count("/") != 1 or name.startswith(("/", ".", "~")):
        return None
    small = ["*.json", "*.txt", "*.model", "tokenizer*"]
    # Safetensors first; .bin only for repos without them (never download both copies).
    for local in (True, False):
        for weights in ("*.safetensors", "pytorch_model*.bin"):
            try:
                d = hub.snapshot_download(name, local_files_only=local, allow_patterns=small + [weights])
            except Exception:
                if local:
                    continue
                raise WeightsError(f"cannot download {name} from the Hugging Face hub (offline?); pass a "
                                   "local checkpoint directory with --model or an existing weight cache "
                                   "with --path") from None
            try:
                if os.path.isfile(os.path.join(d, "config.json")) and _hf_weight_files(d):
                    return d
            except WeightsError:
                pass
    raise WeightsError(f"{name} on the Hugging Face hub has no config.json with safetensors or "
                       "pytorch_model*.bin weights")
