"""Asynchronous loads and stores that overlap compute.

Loads (weights, cache, activations) run in one worker thread and stores in another, each on its
own CUDA stream. A worker waits for its copies to land before it hands results over, so the
compute thread never races a copy; on the compute side, tensors made on a side stream are tied to
the compute stream (record_stream) so the caching allocator does not recycle them too early.
Without overlap, everything runs in order on the calling thread.
"""
from __future__ import annotations

import concurrent.futures as cf

import torch


def _done(value) -> cf.Future:
    f = cf.Future()
    f.set_result(value)
    return f


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
    return obj


class IO:
    def __init__(self, env, overlap: bool):
        self.env = env
        self.overlap = overlap

    def _run(self, kind, fn, wait_for=None, event=None):
        if wait_for is not None:
            wait_for.result()
        if event is not None:
            event.synchronize()
        stream = self.env.stream(kind)
        if stream is None:
            return fn()
        with torch.cuda.stream(stream):
            result = fn()
        stream.synchronize()
        return result

    def load(self, fn, wait_for: cf.Future | None = None) -> cf.Future:
        if not self.overlap:
            if wait_for is not None:
                wait_for.result()
            return _done(fn())
        return self.env.pool("load").submit(self._run, "load", fn, wait_for)

    def store(self, fn) -> cf.Future:
        if not self.overlap:
            return _done(fn())
        event = None
        if self.env.is_cuda:
            event = torch.cuda.Event()
            event.record()  # the data to store is ready once the compute stream reaches here
        return self.env.pool("store").submit(self._run, "store", fn, None, event)

    def result(self, fut: cf.Future):
        value = fut.result()
        if self.overlap and self.env.is_cuda:
            adopt(value, torch.cuda.current_stream(self.env.device))
        return value
