"""The weight cache in FlexGen's numpy layout: one `np.save` file per tensor, named by its Hugging
Face key without the leading "model.", float16, no ".npy" suffix (the original FlexGen's layout, so
caches made by either program are interchangeable). For float32 compute (the CPU) a second cache
holds float32: a float32 or bfloat16 checkpoint, or a GGUF's dequantized blocks, keep their exact
values, which float16 would round (transformers' float32 is the reference there).

Files are written to a temporary name and renamed, and a marker is written last: a directory
without the marker is an interrupted conversion and gets redone instead of being trusted.
"""
from __future__ import annotations

import errno
import json
import os

import numpy as np

MARKER = ".flexgen_complete"


class WeightsError(Exception):
    """A user-facing problem with weights or checkpoints; the message is one line."""


def reason(e: BaseException, limit: int = 240) -> str:
    """A library's exception as one short line for a WeightsError: torch's weights-only unpickler
    buries the cause under paragraphs of advice, so its own line is taken."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
    for i, line in enumerate(lines[:-1]):
        if line.endswith("WeightsUnpickler error:"):
            return f"not a plain state dict ({lines[i + 1]})"[:limit]
    return lines[0][:limit]


def cache_is_complete(cache_dir) -> bool:
    try:
        with open(os.path.join(cache_dir, MARKER)) as f:
            meta = json.load(f)
        names = [n for n in os.listdir(cache_dir) if not n.startswith(".")]
    except (OSError, ValueError):
        return False
    # A marker copied without its files (or files deleted later) does not count as complete.
    return isinstance(meta, dict) and len(names) >= int(meta.get("count", 0))


def load_cached(cache_dir, name, shape) -> np.ndarray:
    """Memory-mapped view of one cached tensor, checked against the shape the model expects."""
    path = os.path.join(cache_dir, name)
    if not os.path.isfile(path):
        raise WeightsError(f"missing weight file {name} in {cache_dir}")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # a bad header or a file shorter than its header says
        raise WeightsError(f"weight file {name} in {cache_dir} is truncated or corrupt ({reason(e)})") from None
    # np.load maps the file lazily; check the size so a short file fails here, not mid-generation.
    if not isinstance(arr, np.ndarray) or arr.offset + arr.nbytes > os.path.getsize(path):
        raise WeightsError(f"weight file {name} in {cache_dir} is truncated or corrupt")
    if arr.dtype.kind != "f":
        raise WeightsError(f"weight file {name} in {cache_dir} holds {arr.dtype}, not floating-point values")
    if tuple(arr.shape) != tuple(shape):
        raise WeightsError(f"weight {name} has shape {tuple(arr.shape)}, expected {tuple(shape)} "
                           "(checkpoint does not match the model config)")
    return arr


def _is_disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class CacheWriter:
    """Writes tensors into a cache dir; on a full disk removes everything it wrote (a half cache
    is useless and only holds the space the user needs to free)."""

    def __init__(self, cache_dir, source, dtype=np.float16):
        self.cache_dir = str(cache_dir)
        self.source = str(source)
        self.dtype = dtype
        self.written: list[str] = []
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            # Drop an old marker first, so a crash during re-conversion is not taken as complete.
            marker = os.path.join(self.cache_dir, MARKER)
            if os.path.exists(marker):
                os.remove(marker)
        except OSError as e:
            self._fail(e)

    def write(self, name: str, array) -> None:
        if "/" in name or name.startswith("."):
            raise WeightsError(f"unexpected tensor name {name!r} in {self.source}")
        path = os.path.join(self.cache_dir, name)
        tmp = os.path.join(self.cache_dir, f".{name}.tmp")
        try:
            with open(tmp, "wb") as f:
                self.written.append(tmp)
                np.save(f, np.ascontiguousarray(array, dtype=self.dtype))
            os.replace(tmp, path)
            self.written[-1] = path
        except OSError as e:
            self._fail(e)

    def finish(self) -> None:
        """Write the marker; only now is the cache complete."""
        names = {os.path.basename(p) for p in self.written}
        try:
            with open(os.path.join(self.cache_dir, MARKER), "w") as f:
                json.dump({"source": self.source, "count": len(names)}, f)
        except OSError as e:
            self._fail(e)

    def _fail(self, e: OSError):
        if _is_disk_full(e):
            self.cleanup()
            raise WeightsError(f"disk full while converting weights to {self.cache_dir}: {e}") from None
        raise WeightsError(f"cannot write the weight cache {self.cache_dir}: {e}") from None

    def cleanup(self) -> None:
        for p in self.written:
            try:
                os.remove(p)
            except OSError:
                pass
        self.written.clear()
