"""Ranks, point-to-point transfers between pipeline stages, and the guard that ends every rank
cleanly when one of them fails.

Launch: torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or the original
FlexGen's flags (--head-ip --port with --rank --local-rank --world-size, or --use-mpi to read them
from Open MPI's environment), or one process alone.

Failures: sends are asynchronous and every wait for a peer is watched by the guard thread. A
peer that dies breaks its connections (the wait fails at once); one that goes silent is caught by
the timeout (--comm-timeout). The rank that notices writes one message naming the rank and the
cause into the rendezvous store (the first writer wins) and prints it; every other rank's guard
sees it there and ends too. Each rank removes its own offload files and exits with status 2.
SIGTERM (torchrun stopping the survivors of a failed rank) also removes them before exiting.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

ABORT_KEY = "flexgen/abort"


class DistError(RuntimeError):
    """A failure of the pipeline (a peer lost, a timeout, a bad launch), for the user."""


class LaunchError(DistError):
    """The launch flags or environment do not describe a valid set of ranks."""


@dataclass
class Launch:
    rank: int
    world_size: int
    local_rank: int
    init_method: str | None   # None: one process, no process group

    @property
    def distributed(self) -> bool:
        return self.init_method is not None


def _env_int(name):
    v = os.environ.get(name)
    return None if v in (None, "") else int(v)


def launch_from_args(args) -> Launch:
    """The ranks as the flags and the launcher's environment give them."""
    if args.head_ip is not None or args.port is not None:
        if args.head_ip is None or args.port is None:
            raise LaunchError("--head-ip and --port go together")
        if args.use_mpi:
            names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")
            if any(_env_int(n) is None for n in names):
                raise LaunchError("--use-mpi: Open MPI's OMPI_COMM_WORLD_* variables are not set "
                                  "(start the ranks with mpirun)")
            rank, world, local = (_env_int(n) for n in names)
        else:
            rank, world = args.rank, args.world_size
            local = args.local_rank if args.local_rank is not None else rank
            if rank is None or world is None:
                raise LaunchError("--head-ip/--port need --rank and --world-size (or --use-mpi)")
        init = f"tcp://{args.head_ip}:{args.port}"
    elif _env_int("WORLD_SIZE") is not None and _env_int("RANK") is not None:   # torchrun
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        local = _env_int("LOCAL_RANK") if _env_int("LOCAL_RANK") is not None else rank
        init = "env://"
    else:
        if args.world_size not in (None, 1):
            raise LaunchError("--world-size > 1 needs --head-ip and --port (or start the ranks with torchrun)")
        rank, world, local, init = 0, 1, 0, None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise LaunchError(f"rank {rank} of world size {world} (local rank {local}) is not a valid rank")
    if world == 1:
        init = None
    return Launch(rank, world, local, init)


def guess_rank(args) -> int:
    """This process's rank before anything is set up (who prints an argument error), or 0."""
    for v in (os.environ.get("OMPI_COMM_WORLD_RANK") if getattr(args, "use_mpi", False) else None,
              getattr(args, "rank", None), os.environ.get("RANK")):
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                pass
    return 0


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "]" in text and text.startswith("["):   # gloo: "[.../pair.cc:545] Read error ...: Connection reset by peer"
        text = text.split("]", 1)[1].strip()
    low = text.lower()
    if "connection reset" in low or "connection closed" in low or "broken pipe" in low or "eof" in low:
        return "its connection closed: it died or exited"
    if "timed out" in low or "timeout" in low:
        return "timed out: it is hung or stopped"
    return text


class Guard:
    """A thread per rank that ends the process cleanly when the pipeline cannot go on: a failure
    written to the store by any rank, a wait for a peer longer than the timeout, a peer whose
    heartbeat stops, or SIGTERM / SIGINT. Ending means: remove this rank's offload files, print
    the message if this rank was the first to see the failure, exit with status 2."""

    def __init__(self, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.store = None
        self.cleanup_paths: list[str] = []
        self.cleanups: list = []
        self._waiting = None             # (since, what, peer) of the main thread's current wait
        self._stop = threading.Event()
        self._failing = threading.Lock()
        self._thread = None
        self._beats = {}
        self._rfd = None

    # ---- set-up --------------------------------------------------------------------------------
    def install_signals(self):
        """Signals wake the guard thread through a socket (a process blocked in a collective
        never runs Python signal handlers in time)."""
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._rfd, self._wsock = r, w
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)

    def start(self, store=None):
        """Start watching (signals now; the store and heartbeats once attach() gives the store)."""
        self.store = store
        self._thread = threading.Thread(target=self._loop, name="flexgen-dist-guard", daemon=True)
        self._thread.start()

    def attach(self, store):
        self.store = store

    def stop(self):
        """Stop watching (the normal end): peers stop judging this rank by its heartbeat."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None
        if self.store is not None:
            try:
                self.store.set(f"flexgen/beat/{self.rank}", "done")
            except Exception:
                pass

    # ---- what the main thread calls --------------------------------------------------------------
    @contextlib.contextmanager
    def waiting(self, what: str, peer: int | None, timeout_s: float | None = None):
        self._waiting = (time.monotonic(), what, peer, timeout_s or self.timeout_s)
        try:
            yield
        finally:
            self._waiting = None

    def fail(self, message: str, code: int = 2, quiet: bool = False):
        """End this rank: print `error: message` if no rank reported a failure before, clean up,
        exit. Never returns."""
        if not self._failing.acquire(blocking=True, timeout=30):
            os._exit(code)
        first = not quiet
        if self.store is not None and not quiet:
            try:
                first = self.store.compare_set(ABORT_KEY, "", message).decode() == message
            except Exception:   # the store is gone too: say it ourselves
                first = True
        if first:
            print(f"error: {message}", file=sys.stderr, flush=True)
        self.clean_up()
        self._linger()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _linger(self):
        """Rank 0 may host the rendezvous store: before it exits, give the other ranks a moment to
        read the failure there (else they would report the store's loss instead of the cause)."""
        if self.store is None:
            return
        try:
            self.store.add("flexgen/abort_seen", 1)
            t0 = time.monotonic()
            while self.rank == 0 and time.monotonic() - t0 < 1.5:
                if int(self.store.add("flexgen/abort_seen", 0)) >= self.world_size:
                    break
                time.sleep(0.05)
        except Exception:
            pass

    def clean_up(self):
        for fn in self.cleanups:
            try:
                fn()
            except Exception:
                pass
        for p in self.cleanup_paths:
            shutil.rmtree(p, ignore_errors=True)

    # ---- the thread ----------------------------------------------------------------------------------
    def _loop(self):
        beat, last_beat, published = 0, 0.0, None
        while not self._stop.wait(0.2):
            self._check_signal()
            now = time.monotonic()
            w = self._waiting
            if w is not None and now - w[0] > w[3] + 2:
                self.fail(self.timeout_message(w[2], w[1], w[3]))
            if self.store is None:
                continue
            try:
                if self.store.check([ABORT_KEY]):
                    self.fail("", quiet=True)
                # a wait longer than a second is published, so that a rank that times out can
                # follow the chain of waits to the rank that is really stuck
                peer = w[2] if w is not None and now - w[0] > 1.0 and w[2] is not None else None
                if peer != published:
                    self.store.set(f"flexgen/waits/{self.rank}", "" if peer is None else str(peer))
                    published = peer
                if now - last_beat >= 1.0:
                    beat += 1
                    last_beat = now
                    self.store.set(f"flexgen/beat/{self.rank}", str(beat))
                    self._check_beats(now)
            except Exception as e:
                if self._stop.is_set():
                    return
                self.fail(f"rank {self.rank}: lost the rendezvous store (rank 0 or the launcher ended): {_short(e)}")

    def timeout_message(self, peer, what, limit) -> str:
        """Nothing came from `peer` within the limit: name the rank at the end of the chain of
        waits (peer may itself be waiting for a stuck rank further up the pipeline)."""
        if peer is None:
            return f"rank {self.rank}: no {what} within {limit:g} s (a peer is hung or stopped; see --comm-timeout)"
        chain, k = [peer], peer
        try:
            while self.store is not None and len(chain) <= self.world_size:
                key = f"flexgen/waits/{k}"
                nxt = self.store.get(key).decode() if self.store.check([key]) else ""
                if not nxt or int(nxt) in chain or int(nxt) == self.rank:
                    break
                k = int(nxt)
                chain.append(k)
        except Exception:
            pass
        via = f" (rank {self.rank} waits for {' <- '.join(f'rank {c}' for c in chain)})" if len(chain) > 1 else ""
        return (f"rank {chain[-1]} is hung or stopped: rank {self.rank} got no {what} within {limit:g} s"
                f"{via}; see --comm-timeout")

    def _check_beats(self, now):
        for r in range(self.world_size):
            if r == self.rank:
                continue
            key = f"flexgen/beat/{r}"
            value = self.store.get(key) if self.store.check([key]) else b""
            seen = self._beats.get(r)
            if seen is None or seen[0] != value:
                self._beats[r] = (value, now)
            elif value and value != b"done" and now - seen[1] > self.timeout_s:
                self.fail(f"rank {self.rank}: rank {r} stopped answering (no heartbeat for "
                          f"{self.timeout_s:g} s: it died, hung or was stopped)")

    def _check_signal(self):
        if self._rfd is None:
            return
        try:
            data = self._rfd.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        for b in data:
            if b == signal.SIGINT:
                self.fail(f"rank {self.rank}: interrupted", code=130)
            if b == signal.SIGTERM:   # the launcher stops us: it reports the cause itself
                self.fail("", quiet=True)


class Comm:
    """Point-to-point transfers between ranks; the control group (gloo) for barriers and small
    objects. With one rank, sends to itself are kept in order in memory."""

    def __init__(self, launch: Launch, comm_device: str, device: torch.device, guard: Guard,
                 timeout_s: float):
        self.rank, self.world_size = launch.rank, launch.world_size
        self.guard = guard
        self.timeout_s = timeout_s
        self.device = torch.device(device) if comm_device == "gpu" else torch.device("cpu")
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self._local = deque()
        self._sends = []
        self._barriers = 0
        self.data_group = None
        self.ctrl_group = None
        self.launch = launch

    def connect(self, connect_timeout_s: float):
        """Join the process group (every rank must arrive within connect_timeout_s)."""
        if not self.launch.distributed:
            return
        import torch.distributed as dist
        self.dist = dist
        if self.backend == "nccl":
            # wait() blocks the host until the transfer is done, so the guard sees a silent peer
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        with self.guard.waiting("connection to the other ranks", None, connect_timeout_s):
            try:
                dist.init_process_group("gloo", init_method=self.launch.init_method, rank=self.rank,
                                        world_size=self.world_size,
                                        timeout=datetime.timedelta(seconds=self.timeout_s))
            except Exception as e:
                raise DistError(f"could not join the {self.world_size} ranks at {self.launch.init_method}: "
                                f"{_short(e)}") from e
        self.ctrl_group = dist.group.WORLD
        self.data_group = self.ctrl_group if self.backend == "gloo" else dist.new_group(backend="nccl")
        from torch.distributed import distributed_c10d
        self.store = distributed_c10d._get_default_store()
        self.guard.attach(self.store)

    # ---- point to point ------------------------------------------------------------------------
    def send(self, t: torch.Tensor, dst: int):
        """Start sending t to dst; the send completes in the background (flush() waits)."""
        t = t.contiguous()
        if dst == self.rank:
            self._local.append(t.clone())
            return
        t = t.to(self.device)
        work = self.dist.isend(t, dst, group=self.data_group)
        self._sends.append((work, t, dst))
        if len(self._sends) > 64:   # forget the finished ones (never block here: the ring could lock up)
            self._sends = [x for x in self._sends if not x[0].is_completed()]

    def recv(self, shape, dtype, src: int, what: str) -> torch.Tensor:
        return self.irecv(shape, dtype, src, what).wait()

    def irecv(self, shape, dtype, src: int, what: str) -> "_Recv":
        if src == self.rank:   # taken when waited for: it may be sent after this receive is posted
            return _Recv(self, None, None, src, what)
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        return _Recv(self, self.dist.irecv(buf, src, group=self.data_group), buf, src, what)

    def flush(self):
        self._wait_sends(len(self._sends))

    def _wait_sends(self, n):
        for work, _, dst in self._sends[:n]:
            with self.guard.waiting("acknowledgement of a send", dst):
                try:
                    work.wait()
                except Exception as e:
                    raise DistError(f"rank {self.rank}: lost rank {dst} while sending to it: {_short(e)}") from e
        del self._sends[:n]

    # ---- control ---------------------------------------------------------------------------------
    def barrier(self, what: str, timeout_s: float):
        """Every rank reaches this point (through the store: no collective timeout, and the guard
        keeps watching heartbeats while we wait)."""
        if not self.launch.distributed:
            return
        self._barriers += 1   # every rank passes the same barriers in the same order
        key = f"flexgen/barrier/{self._barriers}/{what}"
        self.store.add(key, 1)
        t0 = time.monotonic()
        with self.guard.waiting(f"arrival of every rank at '{what}'", None, timeout_s):
            while int(self.store.add(key, 0)) < self.world_size:
                time.sleep(0.05)
                if time.monotonic() - t0 > timeout_s + 5:
                    raise DistError(f"rank {self.rank}: not every rank reached '{what}' within {timeout_s:g} s")

    def gather_objects(self, obj) -> list | None:
        """obj from every rank, on rank 0 (None elsewhere)."""
        if not self.launch.distributed:
            return [obj]
        out = [None] * self.world_size if self.rank == 0 else None
        with self.guard.waiting("a gather of results", None):
            self.dist.gather_object(obj, out, dst=0, group=self.ctrl_group)
        return out

    def all_gather_objects(self, obj) -> list:
        if not self.launch.distributed:
            return [obj]
        out = [None] * self.world_size
        with self.guard.waiting("an exchange of set-up facts", None):
            self.dist.all_gather_object(out, obj, group=self.ctrl_group)
        return out

    def close(self):
        """Normal end: the guard stops watching, every rank agrees it is done, the group goes."""
        if not self.launch.distributed:
            return
        self.flush()
        self.guard.stop()
        try:
            self.dist.barrier(group=self.ctrl_group)
            self.dist.destroy_process_group()
        except Exception as e:
            raise DistError(f"rank {self.rank}: a peer failed at the end of the run: {_short(e)}") from e


class _Recv:
    def __init__(self, comm, work, buf, src, what):
        self.comm, self.work, self.buf, self.src, self.what = comm, work, buf, src, what

    def wait(self) -> torch.Tensor:
        if self.buf is None:
            self.buf = self.comm._local.popleft()
        if self.work is not None:
            with self.comm.guard.waiting(self.what, self.src):
                try:
                    self.work.wait()
                except Exception as e:
                    cause = _short(e)
                    if cause.startswith("timed out"):
                        raise DistError(self.comm.guard.timeout_message(self.src, self.what,
                                                                        self.comm.timeout_s)) from e
                    raise DistError(f"rank {self.comm.rank}: lost rank {self.src} while waiting for "
                                    f"{self.what}: {cause}") from e
            self.work = None
        return self.buf
