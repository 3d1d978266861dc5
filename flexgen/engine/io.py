"""Loads and stores that overlap compute.

On a GPU, copies between pinned host memory and the device are issued from the compute thread on
side streams (one for loads, one for stores) and ordered with CUDA events: the compute stream
waits for a load's event only when it needs the data, so the host never blocks on a transfer.
Only work that needs the host to wait (disk reads and writes) goes to worker threads; a worker
synchronises its stream before handing results over. Tensors made on a side stream are tied to
the stream that uses them (record_stream) so the caching allocator does not recycle them early.
Without overlap, everything runs in order on the calling thread and the compute stream.
"""
from __future__ import annotations

import concurrent.futures as cf

import torch


def adopt(obj, stream):
    """Tie every CUDA tensor in obj (nested dict/list/tuple) to `stream`."""
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            obj.record_stream(stream)
    elif isinstance(obj, dict):
        for v in obj.values():
            adopt(v, stream)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            adopt(v, stream)
    elif hasattr(obj, "tensors"):   # placement.Deferred: packed parts to unpack on `stream`
        adopt(obj.tensors(), stream)
    return obj


class Pending:
    """A load or store in flight: a worker thread's future, or CUDA work behind an event."""

    def __init__(self, value=None, event=None, future: cf.Future | None = None):
        self.value, self.event, self.future = value, event, future

    def wait_host(self):
        """Block the host until the work is done (for consumers that read on the CPU)."""
        if self.future is not None:
            self.value = self.future.result()
            self.future = None
        if self.event is not None:
            self.event.synchronize()

    def order_before(self, stream):
        """Make `stream` wait for this work, blocking the host only for thread work."""
        if self.future is not None:
            self.value = self.future.result()
            self.future = None
        if self.event is not None and stream is not None:
            stream.wait_event(self.event)

    def result(self, stream=None):
        """The value, usable on `stream` (None on the CPU)."""
        self.order_before(stream)
        if stream is not None:
            adopt(self.value, stream)
        return self.value


class IO:
    def __init__(self, env, overlap: bool):
        self.env = env
        self.overlap = overlap

    def _in_thread(self, kind, fn, after, event):
        if after is not None:
            after.wait_host()
        if event is not None:
            event.synchronize()
        stream = self.env.stream(kind)
        if stream is None:
            return fn()
        with torch.cuda.stream(stream):
            result = fn()
        stream.synchronize()
        return result

    def result(self, pending: Pending):
        """A load's value, ready for use on the compute stream."""
        stream = torch.cuda.current_stream(self.env.device) if self.env.is_cuda else None
        return pending.result(stream)

    def load(self, fn, uses_disk: bool, after: Pending | None = None) -> Pending:
        """Run a load; `after` is a store it must follow (the same buffer written earlier)."""
        if not self.overlap:
            if after is not None:
                after.wait_host()
            return Pending(fn())
        if uses_disk or not self.env.is_cuda:
            if not uses_disk:  # nothing to transfer on a CPU-only machine
                if after is not None:
                    after.wait_host()
                return Pending(fn())
            return Pending(future=self.env.pool("load").submit(self._in_thread, "load", fn, after, None))
        stream = self.env.stream("load")
        if after is not None:
            after.order_before(stream)
        with torch.cuda.stream(stream):
            value = fn()
            event = torch.cuda.Event()
            event.record(stream)
        return Pending(value, event)

    def store(self, fn, uses_disk: bool, tensors=()) -> Pending:
        """Run a store of `tensors` (made by compute so far) written by fn."""
        if not self.overlap:
            fn()
            return Pending()
        if not self.env.is_cuda:
            if not uses_disk:
                fn()
                return Pending()
            return Pending(future=self.env.pool("store").submit(self._in_thread, "store", fn, None, None))
        ready = torch.cuda.Event()
        ready.record()  # the data is complete once the compute stream reaches this point
        if uses_disk:
            return Pending(future=self.env.pool("store").submit(self._in_thread, "store", fn, None, ready))
        stream = self.env.stream("store")
        stream.wait_event(ready)
        for t in tensors:
            t.record_stream(stream)
        with torch.cuda.stream(stream):
            fn()
            event = torch.cuda.Event()
            event.record(stream)
        return Pending(event=event)
