"""The execution environment: the compute device, host memory and the offload directory.

FlexGen's `ExecutionEnv.create(offload_dir)` is kept. The environment owns allocation on each
tier, the moves between tiers, and the worker threads that let I/O overlap compute.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import tempfile

import torch

from .memory.disk import DiskTensor
from .memory.placement import Staging
from .policy import PolicyError


class ExecutionEnv:
    def __init__(self, device: torch.device, offload_dir: str):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.offload_dir = offload_dir
        self._staging = Staging()
        self._pools = {}
        self._streams = {}
        self._disk_tensors = []

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, offload_dir: str | None = None, device: str | None = None) -> "ExecutionEnv":
        if device is None or device == "auto":
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise PolicyError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if dev.type not in ("cpu", "cuda"):
            raise PolicyError(f"unsupported device {device!r} (use cpu or cuda[:N])")
        if offload_dir is None:
            offload_dir = os.path.join(tempfile.gettempdir(), "flexgen_offload")
        offload_dir = os.path.abspath(os.path.expanduser(offload_dir))
        try:
            os.makedirs(offload_dir, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=offload_dir, prefix=".probe")
            probe.close()
        except OSError as e:
            raise PolicyError(f"offload dir {offload_dir} cannot be written: {e.strerror}") from e
        return cls(dev, offload_dir)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float16 if self.is_cuda else torch.float32

    # ---- allocation on tiers ------------------------------------------------------------------
    def allocate(self, tier: str, shape, dtype, name="t", pin=True):
        if tier == "gpu":
            return torch.empty(shape, dtype=dtype, device=self.device)
        if tier == "cpu":
            return torch.empty(shape, dtype=dtype, pin_memory=bool(pin and self.is_cuda))
        if tier == "disk":
            t = DiskTensor(self.offload_dir, shape, dtype, name=name)
            self._disk_tensors.append(t)
            return t
        raise ValueError(tier)

    # ---- moves --------------------------------------------------------------------------------
    def to_compute(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self.device:
            return t
        return t.to(self.device, non_blocking=t.is_pinned())

    def read_disk(self, dt: DiskTensor, row_start=0, row_end=None, to_compute=True) -> torch.Tensor:
        row_end = dt.shape[0] if row_end is None else row_end
        shape = (row_end - row_start,) + dt.shape[1:]
        if not (self.is_cuda and to_compute):
            return dt.read(row_start, row_end)
        nbytes = (row_end - row_start) * dt.row_bytes
        host = self._staging.get(nbytes, pin=True).view(dt.dtype).view(shape)
        dt.read_into(host, row_start, row_end)
        out = host.to(self.device, non_blocking=True)
        # The staging buffer is reused by this thread's next read: wait for the copy to land.
        torch.cuda.current_stream(self.device).synchronize()
        return out

    def write_disk(self, dt: DiskTensor, src: torch.Tensor, row_start=0):
        if src.device.type == "cuda":
            host = self._staging.get(src.numel() * src.element_size(), pin=True)
            host = host.view(src.dtype).view(src.shape)
            host.copy_(src)  # blocking D2H into pinned memory
            src = host
        dt.write(src, row_start)

    # ---- streams and worker threads -----------------------------------------------------------
    def pool(self, name: str) -> cf.ThreadPoolExecutor:
        if name not in self._pools:
            self._pools[name] = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"flexgen-{name}")
        return self._pools[name]

    def stream(self, name: str):
        """A CUDA side stream for one worker (None on the CPU)."""
        if not self.is_cuda:
            return None
        if name not in self._streams:
            self._streams[name] = torch.cuda.Stream(self.device)
        return self._streams[name]

    def synchronize(self):
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def free_disk_bytes(self) -> int:
        return shutil.disk_usage(self.offload_dir).free

    def close_copy_threads(self):
        for p in self._pools.values():
            p.shutdown(wait=True)
        self._pools = {}
        for t in self._disk_tensors:
            t.close()
        self._disk_tensors = []

    def __repr__(self):
        return f"ExecutionEnv(device={self.device}, offload_dir={self.offload_dir})"
