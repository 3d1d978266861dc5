"""The disk tier moves tensors larger than one system call can (Linux: at most 0x7ffff000 bytes
per pwrite/preadv, so a Qwen2.5-72B embedding, 2.3 GiB in fp16, needs several calls)."""
import os

import pytest
import torch

from flexgen.memory import disk
from flexgen.memory.disk import DiskFullError, DiskTensor


def test_large_write_and_read_take_several_calls(tmp_path, monkeypatch):
    cap = 1000   # bytes per call: the kernel's cap, scaled down
    calls = {"w": 0, "r": 0}
    real_pwrite, real_preadv = os.pwrite, os.preadv

    def pwrite(fd, buf, off):
        calls["w"] += 1
        return real_pwrite(fd, buf[:cap], off)

    def preadv(fd, bufs, off):
        calls["r"] += 1
        return real_preadv(fd, [bufs[0][:cap]], off)

    monkeypatch.setattr(disk.os, "pwrite", pwrite)
    monkeypatch.setattr(disk.os, "preadv", preadv)
    t = DiskTensor(str(tmp_path), (37, 50), torch.float16)
    x = torch.randn(37, 50).half()
    try:
        t.write(x)
        assert torch.equal(t.read(), x)
        assert torch.equal(t.read(5, 20), x[5:20])
    finally:
        t.close()
    assert calls == {"w": 4, "r": 4 + 2}   # 3700 bytes written and read, then 1500 read


def test_a_write_that_stops_is_disk_full(tmp_path, monkeypatch):
    monkeypatch.setattr(disk.os, "pwrite", lambda fd, buf, off: 0)
    t = DiskTensor(str(tmp_path), (4, 4), torch.float32)
    try:
        with pytest.raises(DiskFullError, match="short write"):
            t.write(torch.zeros(4, 4))
    finally:
        t.close()
