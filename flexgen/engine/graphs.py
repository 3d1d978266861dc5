"""Decode steps replayed as CUDA graphs, for blocks whose layers all stay on the compute device.

With weights, KV cache and activations on the GPU, a decode step of a small batch is bound by
host time: ~20 kernels per layer launched from Python cost more than the GPU spends reading the
weights (P4, OPT-6.7B x 8: ~18 ms of host time for ~4 ms of memory traffic). Here the whole
decode step of one GPU batch, embedding to the head's logits, is captured once as a CUDA graph
and replayed every step after the step's inputs are copied into static buffers. Sampling, stop
tokens and logprobs stay outside (the block's emit), exactly as in the eager path.

A step is capturable when nothing in it is a Python value that changes per step ("static"):
 - attention runs over the cache's whole capacity (prompt + new tokens) with the rows not
   written yet masked like padding: their scores are -inf, so they add exact zeros to the softmax
   (the same result as over the written rows, within a rounding of the longer sums);
 - the new K/V row is written with index_copy_ at a device-tensor position;
 - the valid mask and the positions are computed in the graph from the block's prompt mask
   (copied once per block) and the current length (a device scalar, set per step).
The families' forward functions are used as they are: they only see ctx.input_ids,
ctx.positions and ctx.attend, all static here.

A graph holds the addresses of the tensors it read when captured, so the KV caches of a graph
block are kept here across blocks: a later block of the same shape (GPU batch size, number of GPU
batches, capacity) reuses the caches and the graphs. Another shape frees them first, so at most
one block's caches are held, the memory an eager block holds while it runs (the memory model's
peak; an eager block of another shape frees them before it allocates its own). The graphs' own
memory is one step's live intermediates per GPU batch, in one shared pool (P4: ~2 MiB of tensors,
(8, 32, 544) float32 scores, an (8, 16384) MLP activation, (8, 50272) logits; the pool rounds them
up to allocator segments of 2-20 MiB), and the static inputs are a few KiB: both negligible next
to the 13 GB of weights and 2.3 GB of cache, so the memory model leaves them out.

Packed weights and a packed KV cache on the device fit the same step: F.linear reads each
layer's weights packed (memory/packed_matmul.py; where that kernel cannot, they are unpacked
inside the step as eagerly), the new K/V row is quantised and stored at the device-tensor
position, and the whole capacity is unpacked for attention, with the new row itself attended at
full precision (as the eager step does). OPT-30B at 4 bits, all on the H200 under a 24 GiB cap,
16 x 1: 0.034 s per decode step replayed against 0.084 eager (benchmarks/RESULTS.md, session 12).
The graph pool then holds one layer's unpacked cache capacity, which the memory pre-flight
counts (memory_model.graph_pool_bytes).

FLEXGEN_CUDA_GRAPHS=0 (or ExecutionEnv.cuda_graphs = False, the CLI's `--no-cuda-graphs`) turns this off;
FLEXGEN_CUDA_GRAPHS=static runs the static step without capture on any device (the CPU tests
prove with it that the static formulation gives the eager path's tokens).
"""
from __future__ import annotations

import os
import warnings

import torch

from ..memory.packed_matmul import for_compute
from ..models.base import StepContext
from ..policy import PolicyError
from . import triton_decode
from .attention import attend as attention_core

ENV_VAR = "FLEXGEN_CUDA_GRAPHS"


def _flag() -> str:
    flag = os.environ.get(ENV_VAR, "1").strip().lower()
    if flag not in ("", "1", "0", "static", "packed"):
        raise PolicyError(f"{ENV_VAR} must be 1 (CUDA graphs where possible), 0 (off), static or packed, "
                          f"got {flag!r}")
    return flag


def graph_mode(env) -> str | None:
    """"graph" (capture and replay), "static" (the capturable step run eagerly) or None."""
    flag = _flag()
    if flag == "0" or not env.cuda_graphs:
        return None
    if flag == "static":
        return "static"
    return "graph" if env.is_cuda else None


def _in_place(env, percents) -> bool:
    """Whether a placement puts everything where the compute device reads it in place."""
    _, cpu, disk = percents
    return disk == 0 and (cpu == 0 or not env.is_cuda)


def ineligible(runner) -> str | None:
    """Why the runner's decode steps cannot be captured, or None when they can."""
    p, env, layers = runner.policy, runner.env, runner.layers
    if layers[0].kind != "embed" or layers[-1].kind != "head":
        return "a pipeline stage (hidden states in or out)"
    if any(layer.kind == "moe" for layer in layers):
        return "routed experts (their shapes depend on the data)"
    # packed weights on the device are unpacked inside the step, by the same kernel as eagerly
    packed_here = p.compress_weight and _in_place(env, p.percents("weight"))
    if not (packed_here or all(runner.weights.resident(j) for j in range(len(layers)))):
        return "weights not all on the compute device"
    if not _in_place(env, p.percents("cache")) or (p.cpu_cache_compute and p.cache_cpu_percent):
        return "the KV cache is not all on the compute device"
    if not _in_place(env, p.percents("act")):
        return "activations off the compute device"
    if p.attn_sparsity < 1.0:
        return "sparse attention"
    return None


class _Batch:
    """One GPU batch's static inputs and its graph."""

    def __init__(self, gbs, cap, device):
        self.ids = torch.zeros((gbs, 1), dtype=torch.long, device=device)
        self.mask = torch.zeros((gbs, cap), dtype=torch.bool, device=device)
        self.graph = None
        self.logits = None   # the graph's output


class DecodeGraphs:
    """The static decode step of one runner: its caches, static buffers and graphs."""

    def __init__(self, runner):
        self.runner = runner
        self.key = None
        self.caches = {}
        self.batches = {}
        self.capture = False
        self.in_use = False
        self.pool = self.stream = None
        self.failed = None   # why a capture failed: this runner then runs the static step uncaptured

    def open(self, s0: int, T: int, mode: str) -> dict:
        """The caches for a block of s0 + T positions (kept from the last block of this shape)."""
        r = self.runner
        p = r.policy
        key = (p.gpu_batch_size, p.num_gpu_batches, s0 + T)
        if key != self.key:
            self.close()
            self.caches = r.make_caches(s0 + T)
            self.key = key
            dev = r.env.device
            self.cur = torch.zeros(1, dtype=torch.long, device=dev)
            self.cols = torch.arange(s0 + T, device=dev)
        # rows past the prompt are attended (masked) before they are written: make them finite
        for c in self.caches.values():
            c.clear_rows(0, s0 + T, s0)
        self.capture = mode == "graph" and self.failed is None
        self.in_use = True
        self.fresh = set(range(p.num_gpu_batches))   # batches whose prompt mask is not copied yet
        return dict(self.caches)

    def release(self, completed: bool):
        """The block is done; a failed one may have left a capture half made: drop everything."""
        self.in_use = False
        if not completed:
            self.close()

    def close(self):
        self.batches = {}   # graphs first: they use the caches and the pool
        for c in self.caches.values():
            c.close()
        self.caches, self.key, self.pool = {}, None, None

    # ---- one decode step -----------------------------------------------------------------------
    def step(self, blk, i: int, skip):
        """Decode step i of the block: each live GPU batch's logits, handed to blk.emit."""
        r = self.runner
        gbs, cur = r.policy.gpu_batch_size, blk.s0 + i
        self.cur.fill_(cur)
        for k in range(r.policy.num_gpu_batches):
            if k in skip:
                continue
            b0, b1 = k * gbs, (k + 1) * gbs
            b = self.batches.get(k)
            if b is None:
                b = self.batches[k] = _Batch(gbs, self.cols.numel(), r.env.device)
            if k in self.fresh:
                b.mask.copy_(blk.mask[b0:b1])
                self.fresh.discard(k)
            b.ids.copy_(blk.out[b0:b1, cur - 1:cur])
            # the static step runs what its graph records, captured or not (the same kernels)
            with triton_decode.for_graphs():
                if not self.capture:
                    logits = self._forward(k, b)
                elif b.graph is None:
                    logits = self._capture(k, b)
                else:
                    b.graph.replay()
                    logits = b.logits
            blk.emit(logits, k, i)

    def _forward(self, k, b):
        """The decode step of GPU batch k on the static buffers (what the graph records)."""
        r = self.runner
        valid = b.mask & (self.cols < self.cur)
        invalid = ~valid
        # the eager path's positions: real tokens before this one (the new token is always real)
        ctx = StepContext(input_ids=b.ids, positions=valid.sum(-1, keepdim=True) - 1)
        at = self.cur - 1      # the cache row this step writes
        windows = {}
        h = None
        for li, layer in enumerate(r.layers):
            if layer.kind == "attention":
                ctx.attend = self._attender(self.caches[(li, k)], valid, invalid, at, windows)
            elif layer.kind == "head":
                h = h[:, -1:]
            w = {key: for_compute(x) for key, x in r.weights.load(li, defer=True).items()}
            h = layer.forward(w, h, ctx)
            ctx.attend = None
        return h

    def _attender(self, cache, valid, invalid, at, windows):
        cap = self.cols.numel()
        if cache.compressed:   # the packed stores (capacity, b, kv_heads, groups, bytes), in place
            packed = (cache.k.view_rows(0, cap, defer=True), cache.v.view_rows(0, cap, defer=True))
        else:
            stored = cache.resident_rows(0, cap)   # (capacity, b, kv_heads, d)

        def attend(q, k_new, v_new, scale, window=None):
            k_row, v_row = k_new.transpose(0, 1), v_new.transpose(0, 1)
            if cache.compressed:
                # as the eager step: the new row is stored quantised, the rows before it are read
                # unpacked, and the new row itself is attended at full precision
                rows = cache.new_rows(k_row, v_row)
                for store, parts in zip(packed, (rows.k, rows.v)):
                    for dst, src in zip(store.tensors(), parts):
                        dst.index_copy_(0, at, src)
                kc, vc = packed[0].value(), packed[1].value()   # the whole capacity, unpacked
            else:
                kc, vc = stored
            kc.index_copy_(0, at, k_row.to(kc.dtype))
            vc.index_copy_(0, at, v_row.to(vc.dtype))
            seen, unseen = valid, invalid
            if window is not None:   # the last `window` positions, as attention.in_window keeps them
                if window not in windows:
                    inside = valid & (self.cols >= self.cur - window)
                    windows[window] = (inside, ~inside)
                seen, unseen = windows[window]
            return attention_core(q, kc.permute(1, 0, 2, 3), vc.permute(1, 0, 2, 3), seen, scale, invalid=unseen)

        return attend

    def _capture(self, k, b):
        """Run the step once on the capture stream (the warm-up CUDA graphs need), record it as GPU
        batch k's graph and replay that for this step (rewriting the same cache row)."""
        dev = self.runner.env.device
        main = torch.cuda.current_stream(dev)
        if self.stream is None:
            self.stream = torch.cuda.Stream(dev)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        stream = self.stream
        stream.wait_stream(main)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            out = self._forward(k, b)
            try:
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    b.logits = self._forward(k, b)
                except BaseException:
                    try:   # leave the stream out of capture mode; the first error is the one to report
                        graph.capture_end()
                    except Exception:
                        pass
                    raise
                graph.capture_end()
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as e:   # something in the step cannot be captured: decode on without
                self._give_up(e)
            else:
                b.graph = graph
        main.wait_stream(stream)
        if b.graph is not None:   # this step's result from the graph too, as every later step's:
            b.graph.replay()      # no token of a run comes from different kernels than the next
            return b.logits
        if out.is_cuda:
            out.record_stream(main)
        return out

    def _give_up(self, e):
        """After a failed capture: the warm-up's result is the step's; this runner's later
        steps run the static step uncaptured (the same tokens, eager speed)."""
        self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        warnings.warn(f"CUDA graph capture failed ({self.failed}); decoding without graphs")
        self.capture = False
        self.stream = self.pool = None   # a stream left mid-capture is not used again
        for b in self.batches.values():
            b.graph, b.logits = None, None
