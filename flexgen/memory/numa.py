"""NUMA / CXL placement of the CPU tier, through the Linux memory-policy syscalls (no libnuma).

A CXL memory expander shows up as a NUMA node without CPUs, so "put the CPU tier on the
expander" is "bind the CPU tier's pages to that node". Two ways in, used together for every
CPU-tier allocation (see `NumaPlacement.allocate`):

* while the tensor is allocated and its pages first touched, the calling thread's policy is set
  with ``set_mempolicy`` (and restored afterwards). Pinned memory (cudaHostAlloc) is faulted in by
  the allocating thread, so it follows this policy;
* for pageable tensors, ``mbind`` (with MPOL_MF_MOVE) sets the policy of the pages that lie wholly
  inside the tensor, so pages faulted later by any thread (a weight reader, an I/O worker) follow
  it too, and pages glibc recycled from an earlier allocation are moved.

``--cpu-numa-node N`` uses MPOL_BIND (strict: an allocation that does not fit on N fails rather
than silently spilling to another node); ``--cpu-numa-interleave a,b`` uses MPOL_INTERLEAVE.
Nodes are read from /sys/devices/system/node/node*/. `page_nodes` and `vma_policy` report where
a buffer's pages really are (move_pages with no target nodes; /proc/self/numa_maps).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import glob
import os
import platform
import re

import torch

from ..policy import PolicyError

MPOL_DEFAULT, MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE = 0, 1, 2, 3
MPOL_MF_MOVE = 1 << 1
_MODE_NAMES = {MPOL_BIND: "bind", MPOL_INTERLEAVE: "interleave", MPOL_PREFERRED: "preferred"}

# syscall numbers (asm/unistd.h)
_SYSCALLS = {
    "x86_64": {"mbind": 237, "set_mempolicy": 238, "get_mempolicy": 239, "move_pages": 279},
    "aarch64": {"mbind": 235, "get_mempolicy": 236, "set_mempolicy": 237, "move_pages": 239},
}
_MASK_WORDS = 16                      # room for 1024 nodes
_MAXNODE = 64 * _MASK_WORDS + 1       # the kernel reads maxnode - 1 bits
_SYSFS = "/sys/devices/system/node"

_libc = None


def _syscall(name: str, *args) -> int:
    """Run a memory-policy syscall; raise OSError with errno on failure."""
    global _libc
    nums = _SYSCALLS.get(platform.machine())
    if nums is None:
        raise OSError(errno.ENOSYS, f"NUMA syscalls not known for {platform.machine()}")
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    ret = _libc.syscall(ctypes.c_long(nums[name]), *args)
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{name}: {os.strerror(e)}")
    return ret


def available_nodes(sysfs: str = _SYSFS) -> list[int]:
    """The NUMA nodes this machine has (CPU-less memory nodes such as CXL expanders included)."""
    nodes = []
    for path in glob.glob(os.path.join(sysfs, "node[0-9]*")):
        m = re.fullmatch(r"node(\d+)", os.path.basename(path))
        if m:
            nodes.append(int(m.group(1)))
    return sorted(nodes)


def _mask(nodes):
    arr = (ctypes.c_ulong * _MASK_WORDS)()
    for n in nodes:
        arr[n // 64] |= 1 << (n % 64)
    return arr


def _get_thread_policy():
    mode = ctypes.c_int(0)
    mask = (ctypes.c_ulong * _MASK_WORDS)()
    _syscall("get_mempolicy", ctypes.byref(mode), mask, ctypes.c_ulong(_MAXNODE), None, ctypes.c_ulong(0))
    return mode.value, mask


def _set_thread_policy(mode: int, mask) -> None:
    if mode == MPOL_DEFAULT:
        _syscall("set_mempolicy", ctypes.c_int(MPOL_DEFAULT), None, ctypes.c_ulong(0))
    else:
        _syscall("set_mempolicy", ctypes.c_int(mode), mask, ctypes.c_ulong(_MAXNODE))


def _page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass(frozen=True)
class NumaPlacement:
    mode: int          # MPOL_BIND or MPOL_INTERLEAVE
    nodes: tuple

    # ---- construction from the flags ------------------------------------------------------------
    @classmethod
    def from_args(cls, node=None, interleave=None) -> "NumaPlacement | None":
        """--cpu-numa-node N and/or --cpu-numa-interleave a,b (a string or a sequence of ints);
        None when neither is given. A node this machine does not have is a PolicyError."""
        if node is None and interleave is None:
            return None
        if node is not None and interleave is not None:
            raise PolicyError("--cpu-numa-node and --cpu-numa-interleave are exclusive: give one")
        have = available_nodes()
        if node is not None:
            nodes, mode, flag = [_node_int(node, "--cpu-numa-node")], MPOL_BIND, "--cpu-numa-node"
        else:
            items = interleave.split(",") if isinstance(interleave, str) else list(interleave)
            if not items or any(str(x).strip() == "" for x in items):
                raise PolicyError(f"--cpu-numa-interleave takes a comma-separated list of nodes, got {interleave!r}")
            nodes = [_node_int(x, "--cpu-numa-interleave") for x in items]
            if len(set(nodes)) != len(nodes):
                raise PolicyError(f"--cpu-numa-interleave lists a node twice: {interleave!r}")
            mode, flag = MPOL_INTERLEAVE, "--cpu-numa-interleave"
        if not have:
            raise PolicyError(f"{flag}: this system exposes no NUMA nodes ({_SYSFS} is missing)")
        missing = [n for n in nodes if n not in have]
        if missing:
            names = ", ".join(map(str, missing))
            raise PolicyError(f"{flag}: NUMA node {names} does not exist; this machine has node(s) "
                              f"{', '.join(map(str, have))}")
        if max(nodes) >= 64 * _MASK_WORDS:
            raise PolicyError(f"{flag}: node numbers above {64 * _MASK_WORDS - 1} are not supported")
        placement = cls(mode, tuple(nodes))
        placement.check()
        return placement

    def check(self):
        """Fail now, with a clear message, if this process may not set memory policies (e.g. a
        container whose seccomp profile blocks set_mempolicy/mbind)."""
        try:
            with self.scope():
                pass
        except OSError as e:
            raise PolicyError(f"cannot set the NUMA memory policy ({e}); run without "
                              f"--cpu-numa-node/--cpu-numa-interleave") from None

    def describe(self) -> str:
        nodes = ",".join(map(str, self.nodes))
        return f"node {nodes} (bind)" if self.mode == MPOL_BIND else f"interleave {nodes}"

    # ---- applying it ------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self):
        """This thread's allocations (page faults) follow the placement inside the block."""
        old_mode, old_mask = _get_thread_policy()
        _set_thread_policy(self.mode, _mask(self.nodes))
        try:
            yield self
        finally:
            _set_thread_policy(old_mode, old_mask)

    def bind_pages(self, t: torch.Tensor) -> bool:
        """mbind the pages lying wholly inside t's memory (moving any already there). False when
        the tensor spans no whole page."""
        nbytes = t.numel() * t.element_size()
        if nbytes == 0:
            return False
        page = _page_size()
        start = (t.data_ptr() + page - 1) // page * page
        end = (t.data_ptr() + nbytes) // page * page
        if end <= start:
            return False
        _syscall("mbind", ctypes.c_ulong(start), ctypes.c_ulong(end - start), ctypes.c_int(self.mode),
                 _mask(self.nodes), ctypes.c_ulong(_MAXNODE), ctypes.c_uint(MPOL_MF_MOVE))
        return True

    def allocate(self, shape, dtype, pin: bool, on_free=None) -> torch.Tensor:
        """An empty host tensor (pinned if pin) with its pages on the placement's nodes."""
        def place(t):
            self.bind_pages(t)
            touch_pages(t)

        from . import host_memory
        with self.scope():   # pinned memory is placed while pageable, then locked where it is
            return host_memory.empty(shape, dtype, pin, prepare=place, on_free=on_free)


def _node_int(v, flag) -> int:
    try:
        n = int(str(v).strip())
    except ValueError:
        raise PolicyError(f"{flag} takes NUMA node numbers, got {v!r}") from None
    if n < 0:
        raise PolicyError(f"{flag} takes NUMA node numbers (0 or more), got {v!r}")
    return n


def touch_pages(t: torch.Tensor) -> None:
    """Write one byte in every page of a freshly allocated (uninitialised) tensor, so the pages are
    faulted in now, under the current policy."""
    n = t.numel() * t.element_size()
    if n == 0:
        return
    flat = t.detach().reshape(-1).view(torch.uint8)
    flat[::_page_size()].zero_()
    flat[-1:].zero_()


# ---- where pages really are (for tests and diagnostics) --------------------------------------------

def page_nodes(t: torch.Tensor, max_pages: int = 4096) -> list[int]:
    """The NUMA node of (up to max_pages of, evenly spaced) the pages under t, from move_pages
    with no target nodes; a negative entry is -errno (e.g. -ENOENT: page not present)."""
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return []
    page = _page_size()
    first = t.data_ptr() // page * page
    last = (t.data_ptr() + nbytes - 1) // page * page
    count = (last - first) // page + 1
    stride = max(1, count // max_pages)
    addrs = [first + i * page for i in range(0, count, stride)]
    pages = (ctypes.c_void_p * len(addrs))(*addrs)
    status = (ctypes.c_int * len(addrs))()
    _syscall("move_pages", ctypes.c_int(0), ctypes.c_ulong(len(addrs)), pages, None, status, ctypes.c_int(0))
    return list(status)


def vma_policy(addr: int):
    """(policy, {node: pages}) of the mapping holding `addr`, from /proc/self/numa_maps; None
    when the kernel does not expose it."""
    try:
        with open("/proc/self/maps") as f:
            starts = [int(a, 16) for a, b in (line.split()[0].split("-") for line in f)
                      if int(a, 16) <= addr < int(b, 16)]
        with open("/proc/self/numa_maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    if not starts:
        return None
    for line in lines:
        fields = line.split()
        if int(fields[0], 16) == starts[0]:
            counts = {int(m.group(1)): int(m.group(2)) for m in
                      (re.fullmatch(r"N(\d+)=(\d+)", x) for x in fields[2:]) if m}
            return fields[1], counts
    return None
