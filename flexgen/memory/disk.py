"""File-backed tensors: the disk tier.

A DiskTensor is a raw file of a fixed shape and dtype under the offload directory. Reads and
writes go straight between the file and a (pinned) host tensor with pread/pwrite, so no extra
host copy is made, and only whole rows of the first dimension are read or written.
"""
from __future__ import annotations

import errno
import math
import os
import uuid

import torch


class DiskFullError(OSError):
    """The offload directory ran out of space."""


def _check_write(n_written: int, expected: int, path: str):
    if n_written != expected:
        raise DiskFullError(errno.ENOSPC, f"short write to {path} ({n_written} of {expected} bytes)")


def _all(call, fd, buf: memoryview, offset: int) -> int:
    """pwrite / preadv until the whole buffer is done: Linux moves at most 0x7ffff000 bytes
    (just under 2 GiB) per call, so one call leaves a large tensor (e.g. a 152K x 8192 fp16
    embedding) short. Stops early only when the call moves nothing (disk full, end of file)."""
    done = 0
    while done < buf.nbytes:
        n = call(fd, buf[done:], offset + done)
        if n <= 0:
            break
        done += n
    return done


class DiskTensor:
    def __init__(self, directory: str, shape, dtype: torch.dtype, name: str = "t"):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.row_bytes = self.itemsize * math.prod(self.shape[1:])
        self.nbytes = self.row_bytes * (self.shape[0] if self.shape else 1)
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        self.path = os.path.join(directory, f"{safe}.{uuid.uuid4().hex[:8]}.bin")
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            # Reserve the space now so that a full disk fails here, not in the middle of a run.
            if hasattr(os, "posix_fallocate") and self.nbytes > 0:
                os.posix_fallocate(self.fd, 0, self.nbytes)
            else:
                os.ftruncate(self.fd, self.nbytes)
        except OSError as e:
            self.close()
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(e.errno, f"disk full while offloading to {directory}: "
                                             f"needed {self.nbytes / 2**20:.1f} MiB more") from e
            raise

    def write(self, src: torch.Tensor, row_start: int = 0):
        """Write rows [row_start, row_start + len(src)) from a CPU tensor."""
        src = src.detach()
        if src.device.type != "cpu":
            src = src.cpu()
        src = src.to(self.dtype).contiguous()
        data = src.view(-1).view(torch.uint8).numpy()
        offset = row_start * self.row_bytes
        try:
            n = _all(os.pwrite, self.fd, memoryview(data), offset)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(e.errno, f"disk full while writing {self.path}") from e
            raise
        _check_write(n, data.nbytes, self.path)

    def read_into(self, dst: torch.Tensor, row_start: int = 0, row_end: int | None = None):
        """Read rows [row_start, row_end) into the contiguous CPU tensor dst."""
        row_end = self.shape[0] if row_end is None else row_end
        nbytes = (row_end - row_start) * self.row_bytes
        view = dst.view(-1).view(torch.uint8).numpy()
        assert view.nbytes == nbytes, (view.nbytes, nbytes)
        got = _all(lambda fd, b, off: os.preadv(fd, [b], off), self.fd, memoryview(view), row_start * self.row_bytes)
        if got != nbytes:
            raise OSError(errno.EIO, f"short read from {self.path} ({got} of {nbytes} bytes)")
        return dst

    def read(self, row_start: int = 0, row_end: int | None = None, pin: bool = False) -> torch.Tensor:
        row_end = self.shape[0] if row_end is None else row_end
        out = torch.empty((row_end - row_start,) + self.shape[1:], dtype=self.dtype, pin_memory=pin)
        return self.read_into(out, row_start, row_end)

    def close(self, delete: bool = True):
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)
            self.fd = None
        if delete and os.path.exists(self.path):
            os.remove(self.path)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
