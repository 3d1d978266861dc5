"""Parallelism control: how many threads go to CPU compute and how many to I/O.

Two knobs, each a positive integer or "auto" (the default):

* ``cpu_threads``: torch's intra-op threads (CPU compute: CPU attention, and every op of a
  CPU-only run). Applied with ``torch.set_num_threads``.
* ``io_threads``: the worker count of each of the engine's I/O pools (``env.pool("load")`` and
  ``env.pool("store")``: disk reads and writes, and on a GPU the host side of disk <-> device
  relays).

The ``auto`` rule (simple on purpose). What has been measured (benchmarks/RESULTS.md, H100 host,
16-core Xeon): CPU decode attention over 1 GB of fp16 cache runs at 26.4 ms with 14 torch threads
and 21.4 ms with 16 (the kernel is memory-bound and scales to all cores), so the 2 cores kept for
I/O cost ~20% of the kernel's speed when nothing is on disk, hence the first rule below. End to
end, OPT-30B with weights and cache on the CPU and CPU attention (nothing on disk): auto's 16 + 1
ran at 25.1 tok/s, 14 + 2 at 22.9 and 8 + 2 at 19.1 (same machine, one call).

* usable cores = ``len(os.sched_getaffinity(0))`` (what this process may run on, e.g. under
  taskset or a cgroup cpuset), else ``os.cpu_count()``.
* A policy with nothing on disk gets io_threads = 1 (its pools only ever wait) and every core for
  compute: the CPU attention kernel is memory-bound and still gains from the 15th and 16th core.
  Otherwise:
* io_threads = 2 with 8 or more usable cores, else 1. The block schedule never has more than two
  loads in flight (the next stage's weights and the next GPU batch's cache), so a third load
  worker would sit idle; stores queue behind compute and are written by the store pool.
* cpu_threads = usable - io_threads with 8 or more usable cores, else all usable cores. I/O
  workers spend most of their time blocked in pread/pwrite (which release the GIL), so on a small
  machine taking a core away from compute costs more than the contention it avoids; on a larger
  one the reserved cores keep CPU attention from being descheduled behind the copies.
  (16 cores: 14 compute + 2 I/O; 2 cores: 2 compute + 1 I/O.)

* A GPU run with CPU attention (``cpu_cache_compute`` with cache in CPU memory) and a profile of
  this machine: cpu_threads = the thread count at which the profile measured its best CPU
  attention rate (over a packed cache when the cache is compressed), no more than the cores left
  beside I/O. Measured on the lent H200 host (16 cores, benchmarks/RESULTS.md session 10), where
  the profile peaks at 8 threads: OPT-13B's packed CPU attention (N5) took 2.79 s a step at auto's
  16 threads and 0.59 s at 8; LLaMA-3-8B's fp16 one (N10) 0.61 s at 16 and 0.44 at 8. On the H100
  host the profile's best was all 16 cores, which the rule then keeps. The model's CPU attention
  rate is the profile's best, so prediction and run agree on the split.

Explicit values are checked: a positive integer no larger than the usable cores.
"""
from __future__ import annotations

import dataclasses
import os

from .policy import PolicyError

AUTO = "auto"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class ThreadSplit:
    cpu_threads: int
    io_threads: int
    cpu_auto: bool
    io_auto: bool
    cores: int

    def describe(self) -> str:
        def tag(auto):
            return " (auto)" if auto else ""
        return (f"torch threads: {self.cpu_threads}{tag(self.cpu_auto)}, "
                f"io threads: {self.io_threads}{tag(self.io_auto)}")


def _parse(value, flag: str, cores: int):
    """None/"auto" -> None; otherwise an int in [1, cores], or a PolicyError."""
    if value is None:
        return None
    if isinstance(value, str):
        s = value.strip().lower()
        if s == AUTO:
            return None
        try:
            value = int(s)
        except ValueError:
            raise PolicyError(f"{flag} takes a positive integer or 'auto', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"{flag} takes a positive integer or 'auto', got {value!r}")
    if value < 1:
        raise PolicyError(f"{flag} must be at least 1, got {value}")
    if value > cores:
        raise PolicyError(f"{flag} {value} is more than the {cores} usable cores of this process")
    return value


def auto_io_threads(cores: int, uses_disk: bool = True) -> int:
    return 2 if cores >= 8 and uses_disk else 1


def auto_cpu_threads(cores: int, io_threads: int, uses_disk: bool = True) -> int:
    return max(1, cores - io_threads) if cores >= 8 and uses_disk else cores


def attention_threads(profile: dict | None, compressed: bool) -> int | None:
    """The thread count at which the profile measured its best CPU attention (over a packed cache
    when compressed), or None without such figures."""
    cpu = (profile or {}).get("cpu") or {}
    rates = cpu.get("packed_attention_gelem_s" if compressed else "attention_gib_s") or cpu.get("attention_gib_s")
    if not rates:
        return None
    return int(max(rates, key=lambda t: (rates[t], -int(t))))


def uses_cpu_attention(policy) -> bool:
    return bool(policy.cpu_cache_compute) and policy.percents("cache")[1] > 0


def resolve_threads(cpu_threads=None, io_threads=None, cores: int | None = None,
                    uses_disk: bool = True, attention: int | None = None) -> ThreadSplit:
    """The thread split for these settings (ints, "auto" or None) on `cores` usable cores;
    uses_disk: whether the policy puts anything on disk (False: no core is kept for I/O);
    attention: the profile's best CPU attention thread count, for a GPU run with CPU attention."""
    cores = usable_cores() if cores is None else cores
    cpu = _parse(cpu_threads, "--cpu-threads", cores)
    io = _parse(io_threads, "--io-threads", cores)
    io_auto, cpu_auto = io is None, cpu is None
    if io is None:
        io = auto_io_threads(cores, uses_disk)
    if cpu is None:
        cpu = auto_cpu_threads(cores, io, uses_disk)
        if attention is not None:
            cpu = max(1, min(attention, cores - io if cores >= 8 else cores))
    return ThreadSplit(cpu, io, cpu_auto, io_auto, cores)


def policy_uses_disk(policy) -> bool:
    return any(policy.percents(kind)[2] > 0 for kind in ("weight", "cache", "act"))


def policy_threads(policy, cpu_threads=None, io_threads=None, cores: int | None = None,
                   profile: dict | None = None, is_cuda: bool = True) -> ThreadSplit:
    """resolve_threads for a policy: what it puts on disk, and on a GPU its CPU attention's best
    thread count from the profile."""
    attention = (attention_threads(profile, policy.compress_cache)
                 if is_cuda and uses_cpu_attention(policy) else None)
    return resolve_threads(cpu_threads, io_threads, cores, uses_disk=policy_uses_disk(policy), attention=attention)
