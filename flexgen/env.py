"""The execution environment: the compute device, host memory and the offload directory.

FlexGen's `ExecutionEnv.create(offload_dir)` is kept. The environment owns allocation on each
tier, the moves between tiers, and the worker threads that let I/O overlap compute.

Parallelism control (`cpu_threads`, `io_threads`; see flexgen/parallel.py for the `auto` rule):
torch's intra-op thread count is set at creation, and each I/O pool gets `io_threads` workers.
More than one worker per pool keeps the engine's ordering: every load that must follow a store of
the same buffer waits for that store's future (engine/io.py, `after=`), a buffer's next store only
comes after compute that consumed its previous load, disk reads and writes are positional
(pread/pwrite on distinct rows), and each worker thread has its own staging buffer and side stream.

NUMA / CXL (`numa_node`, `numa_interleave`; flexgen/memory/numa.py): the CPU tier's allocations
(weights, cache and activations homed on "cpu", and the disk relays' staging buffers) are placed
on the chosen nodes. Host bytes held by those allocations are counted (pinned and pageable, live
and peak) for the run's report.

Reuse: a KV cache's CPU-tier memory is handed back at the end of its block (`recycle`) and taken
again, zeroed, by the next block's cache of the same size (`allocate(..., reuse=True)`). Fresh
pages cost a fault on first touch: measured on the H100 host, writing the OPT-30B prompt's 45 GiB
of K/V into fresh memory took 12.9 of a 13.2 s prefill. Spare memory is released as soon as a
cache allocation finds none of its size, and by `release_spares` (a model's close, a new model's
pre-flight).
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import math
import os
import shutil
import tempfile
import threading

import torch

from .memory import host_memory
from .memory.disk import DiskTensor
from .memory.numa import NumaPlacement
from .memory.oom import HostMemoryCapExceeded
from .memory.placement import Staging
from .parallel import ThreadSplit, policy_threads, resolve_threads, uses_cpu_attention
from .policy import PolicyError


class HostBytes:
    """Host memory held by the environment's CPU-tier allocations and staging buffers: live bytes
    (an allocation stops counting when its tensor is freed) and the peak, pinned and pageable
    apart."""

    def __init__(self, cap: int | None = None):
        self._lock = threading.Lock()
        self.live = {True: 0, False: 0}
        self.peak = {True: 0, False: 0}
        self.cap = cap      # --cpu-mem: the CPU tier never holds more than this

    def hold(self, n: int, pinned: bool):
        """Count n bytes as held; returns the call that stops counting them. Past the cap:
        HostMemoryCapExceeded, and nothing is counted."""
        with self._lock:
            if self.cap is not None and self.live[True] + self.live[False] + n > self.cap:
                raise HostMemoryCapExceeded(
                    f"host memory cap (--cpu-mem {self.cap / 2**30:.1f} GiB) reached: "
                    f"{(self.live[True] + self.live[False]) / 2**30:.2f} GiB held, {n / 2**30:.2f} GiB more asked")
            self.live[pinned] += n
            self.peak[pinned] = max(self.peak[pinned], self.live[pinned])
        return functools.partial(self._sub, n, pinned)

    def _sub(self, n, pinned):
        with self._lock:
            self.live[pinned] -= n

    @property
    def pinned(self) -> int:
        return self.live[True]

    @property
    def pageable(self) -> int:
        return self.live[False]

    def describe(self, peak: bool = False) -> str:
        src = self.peak if peak else self.live
        return f"pinned {src[True] / 2**30:.3f} GiB, pageable {src[False] / 2**30:.3f} GiB"


class ExecutionEnv:
    def __init__(self, device: torch.device, offload_dir: str, threads: ThreadSplit | None = None,
                 numa: NumaPlacement | None = None, gpu_mem: int | None = None, cpu_mem: int | None = None):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.offload_dir = offload_dir
        self.gpu_cap = None
        if gpu_mem is not None and self.is_cuda:
            self._cap_gpu(gpu_mem)
        if threads is None:  # constructed directly: leave torch alone, one worker per pool
            threads = ThreadSplit(torch.get_num_threads(), 1, False, False, torch.get_num_threads())
        self.threads = threads
        self._fitted_for = None   # the policy fit_threads last resolved the split for
        self.numa = numa
        self.host_bytes = HostBytes(cpu_mem)
        self._staging = Staging(alloc=self._alloc_staging)
        self._pools = {}
        self._streams = {}
        self._lock = threading.Lock()
        self._disk_tensors = []
        self._spares = {}   # (bytes, pinned) -> [host memory a closed KV cache handed back]
        # Decode steps replayed as CUDA graphs where a block allows it (engine/graphs.py); the
        # CLI's --no-cuda-graphs clears it
        self.cuda_graphs = True

    def _cap_gpu(self, nbytes: int) -> None:
        """A hard cap, as on a smaller card: PyTorch's allocator refuses to reserve past it."""
        total = torch.cuda.get_device_properties(self.device).total_memory
        if nbytes > total:
            raise PolicyError(f"--gpu-mem {nbytes / 2**30:.1f} GiB is more than this GPU has "
                              f"({total / 2**30:.1f} GiB)")
        torch.cuda.set_per_process_memory_fraction(nbytes / total, self.device)
        self.gpu_cap = nbytes

    def gpu_budget(self) -> int | None:
        """GPU bytes this process may still take: free memory, or what the cap leaves."""
        if not self.is_cuda:
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        if self.gpu_cap is None:
            return free
        return max(0, min(free, self.gpu_cap - torch.cuda.memory_reserved(self.device)))

    @property
    def cpu_threads(self) -> int:
        return self.threads.cpu_threads

    @property
    def io_threads(self) -> int:
        return self.threads.io_threads

    def fit_threads(self, policy, profile: dict | None = None) -> None:
        """Re-resolve an `auto` thread split for the policy (no I/O cores when nothing is on
        disk; CPU attention at the profile's best thread count; see parallel.py). Before any I/O
        pool exists; explicit counts stay. A second call for the same policy (the CLI fits the
        split before the header, the model again when it is built) keeps the first's."""
        t = self.threads
        if not (t.cpu_auto or t.io_auto) or self._pools or policy == self._fitted_for:
            return
        if profile is None and self.is_cuda and uses_cpu_attention(policy):
            from .profile import this_machines_profile
            profile = this_machines_profile()
        self.threads = policy_threads(policy, None if t.cpu_auto else t.cpu_threads,
                                      None if t.io_auto else t.io_threads, t.cores, profile, self.is_cuda)
        self._fitted_for = policy
        torch.set_num_threads(self.threads.cpu_threads)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, offload_dir: str | None = None, device: str | None = None, cpu_threads=None,
               io_threads=None, numa_node=None, numa_interleave=None, gpu_mem: int | None = None,
               cpu_mem: int | None = None) -> "ExecutionEnv":
        """cpu_threads / io_threads: a positive int, "auto" or None (auto); numa_node: a node for
        the CPU tier (bind); numa_interleave: "a,b" or a list of nodes; gpu_mem / cpu_mem: hard
        caps in bytes on the GPU memory this process takes and on its CPU tier. Bad values:
        PolicyError."""
        threads = resolve_threads(cpu_threads, io_threads)
        numa = NumaPlacement.from_args(numa_node, numa_interleave)
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
        torch.set_num_threads(threads.cpu_threads)
        return cls(dev, offload_dir, threads, numa, gpu_mem=gpu_mem, cpu_mem=cpu_mem)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float16 if self.is_cuda else torch.float32

    # ---- allocation on tiers ------------------------------------------------------------------
    def allocate(self, tier: str, shape, dtype, name="t", pin=True, reuse=False):
        """reuse: on the cpu tier, take zeroed memory that a closed KV cache handed back (recycle)
        when there is some of this size."""
        if tier == "gpu":
            return torch.empty(shape, dtype=dtype, device=self.device)
        if tier == "cpu":
            pinned = bool(pin and self.is_cuda)
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            with self._lock:
                spare = self._spares.get((nbytes, pinned)) if reuse else None
                base = spare.pop() if spare else None
                if reuse and base is None:   # a cache of another shape: the spares would only add to the peak
                    self._spares = {}
            if base is not None:
                return base.zero_().view(dtype).view(shape)
            return self._alloc_host(shape, dtype, pinned)
        if tier == "disk":
            t = DiskTensor(self.offload_dir, shape, dtype, name=name)
            self._disk_tensors.append(t)
            return t
        raise ValueError(tier)

    def recycle(self, t: torch.Tensor, pin=True) -> None:
        """Hand back the cpu-tier memory under t (allocated with reuse=True; no view of it may be
        used any more) for the next allocation of its size."""
        base = (t if t._base is None else t._base).reshape(-1).view(torch.uint8)
        with self._lock:
            self._spares.setdefault((base.numel(), bool(pin and self.is_cuda)), []).append(base)

    def release_spares(self) -> None:
        with self._lock:
            self._spares = {}

    def _alloc_host(self, shape, dtype, pinned: bool) -> torch.Tensor:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        on_free = self.host_bytes.hold(nbytes, pinned)   # counted until the memory is freed
        try:
            if self.numa is not None:
                return self.numa.allocate(shape, dtype, pinned, on_free=on_free)
            # a mapping of its own: exact size when pinned (torch rounds up to 2^k), zero-filled
            return host_memory.empty(shape, dtype, pinned, on_free=on_free)
        except BaseException:
            on_free()
            raise

    def _alloc_staging(self, nbytes: int, pin: bool) -> torch.Tensor:
        return self._alloc_host((nbytes,), torch.uint8, bool(pin and self.is_cuda))

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

    def copy_to_host(self, dst: torch.Tensor, src: torch.Tensor):
        """src (on the device) into dst, a strided view of host memory: put into dst's memory order
        on the device, one copy into this thread's pinned staging buffer, then one host copy (a
        device-to-host copy into a strided pageable view would go element by element)."""
        order = sorted(range(dst.dim()), key=lambda i: -dst.stride(i))
        dst.permute(order).copy_(self._staged(src.permute(order).contiguous()))

    def write_disk(self, dt: DiskTensor, src: torch.Tensor, row_start=0):
        dt.write(self._staged(src) if src.device.type == "cuda" else src, row_start)

    def _staged(self, src: torch.Tensor) -> torch.Tensor:
        """A device tensor copied (blocking) into this thread's pinned staging buffer, laid out
        contiguously; the thread's next relay reuses the buffer."""
        host = self._staging.get(src.numel() * src.element_size(), pin=True).view(src.dtype).view(src.shape)
        host.copy_(src)
        return host

    # ---- streams and worker threads -----------------------------------------------------------
    def pool(self, name: str) -> cf.ThreadPoolExecutor:
        """The worker pool for one kind of I/O ("load", "store"), io_threads workers."""
        with self._lock:
            if name not in self._pools:
                self._pools[name] = cf.ThreadPoolExecutor(max_workers=self.io_threads,
                                                          thread_name_prefix=f"flexgen-{name}")
            return self._pools[name]

    def stream(self, name: str):
        """A CUDA side stream for one kind of work, one per calling thread (None on the CPU), so a
        pool worker that synchronises its stream waits only for its own copies."""
        if not self.is_cuda:
            return None
        key = (name, threading.get_ident())
        with self._lock:
            if key not in self._streams:
                self._streams[key] = torch.cuda.Stream(self.device)
            return self._streams[key]

    def describe_parallel(self) -> str:
        """The run's header fields for threads, NUMA placement and host memory held."""
        t = self.threads
        out = (f"torch threads: {torch.get_num_threads()}{' (auto)' if t.cpu_auto else ''}, "
               f"io threads: {t.io_threads}{' (auto)' if t.io_auto else ''} of {t.cores} cores")
        if self.numa is not None:
            out += f", cpu numa: {self.numa.describe()}"
        if self.gpu_cap is not None:
            out += f", gpu cap: {self.gpu_cap / 2**30:.1f} GiB"
        if self.host_bytes.cap is not None:
            out += f", cpu tier cap: {self.host_bytes.cap / 2**30:.1f} GiB"
        return out

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
        self.release_spares()

    def __repr__(self):
        return (f"ExecutionEnv(device={self.device}, offload_dir={self.offload_dir}, "
                f"cpu_threads={self.cpu_threads}, io_threads={self.io_threads}, numa={self.numa})")
