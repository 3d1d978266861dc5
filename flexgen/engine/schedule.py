"""The zig-zag block schedule: for each generated token, for each layer, for each GPU batch.

A layer's weights reach the compute device once per (token, layer) and serve all GPU batches of
the block. With overlap, the next layer's weights and the next batch's cache load while the
current batch computes, and the cache rows it produced are stored behind it. Offloaded
activations move in order on the compute stream (they are one hidden state per batch, small next
to weights and cache).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..models.base import FEED_FORWARD_KINDS, StepContext
from ..memory.packed_matmul import for_compute
from ..memory.placement import TieredBuffer
from .attention import attend as attention_core, in_window
from .cpu_attention import cpu_decode_attention, packed_chunks, row_chunks
from .graphs import DecodeGraphs, graph_mode, ineligible
from .io import IO, Pending
from .kv_cache import LayerCache


class ActivationStore:
    """Hidden states between layers, one slot per GPU batch, on the policy's activation tier."""

    def __init__(self, env, percents, dtype):
        self.env = env
        self.percents = percents
        self.dtype = dtype
        # Where the activation tier is the compute device itself, keep plain references.
        self.direct = percents[0] == 100 or (not env.is_cuda and percents[2] == 0)
        self.slots = {}
        self.buffers = {}

    def put(self, k, h):
        if self.direct:
            self.slots[k] = h
            return
        key = (k, tuple(h.shape))
        if key not in self.buffers:
            self.buffers[key] = TieredBuffer(self.env, h.shape, self.dtype, self.percents, split_dim=0,
                                             name=f"act{k}")
        self.buffers[key].store(h)
        self.slots[k] = key

    def get(self, k):
        slot = self.slots[k]
        return slot if self.direct else self.buffers[slot].load_joined()

    def close(self):
        for b in self.buffers.values():
            b.close()
        self.buffers, self.slots = {}, {}


class BlockRunner:
    def __init__(self, layers, env, policy, weights, dtype):
        self.layers = layers
        self.env = env
        self.policy = policy
        self.weights = weights
        self.dtype = dtype
        self.io = IO(env, policy.overlap)
        # Stages are what the schedule walks; without sep_layer an attention layer and the MLP
        # after it form one stage (their weights move together).
        self.stages = []
        for idx, layer in enumerate(layers):
            if (not policy.sep_layer and layer.kind in FEED_FORWARD_KINDS and self.stages
                    and layers[self.stages[-1][-1]].kind == "attention"):
                self.stages[-1].append(idx)
            else:
                self.stages.append([idx])
        self.timings = new_timings()
        self._step_events = []             # (decode step index, start, end) of steps not waited for
        self.graphs = DecodeGraphs(self)   # decode steps as CUDA graphs, where the block allows

    def close(self):
        """Free what the runner keeps between blocks (the decode graphs and their caches)."""
        self.graphs.close()

    # ---- one block of gpu_batch_size x num_gpu_batches sequences -----------------------------
    def run(self, ids: np.ndarray, prompt_mask: np.ndarray, max_new_tokens: int, sampler, stop_ids, pad_id: int,
            on_step=None, want_logprobs: bool = False, score: bool = False, forced=None,
            top_logprobs: int = 0) -> "BlockResult":
        """Generate max_new_tokens for one block. With score, the head also runs over every prompt
        position and the log-probability of each prompt token given the ones before is returned
        (with the argmax at each position, and the top_logprobs best alternatives when asked)."""
        state = self.open_block(ids, prompt_mask, max_new_tokens, sampler, stop_ids, pad_id, want_logprobs,
                                score, forced, top_logprobs)
        completed = False
        try:
            for i in range(max_new_tokens):
                self.run_step(state, i)
                if on_step is not None:
                    on_step(i)
                if state.blk.all_stopped():
                    break
            completed = True
        finally:
            self.close_block(state, completed)
        return state.blk.result()

    # The three parts of run(), for a caller that interleaves several blocks (the pipeline of
    # flexgen/dist runs one block per micro-batch and steps them in turn). A runner whose layer
    # list does not start with the embedding reads each GPU batch's input hidden states from
    # `hidden_in`; one that does not end with the head returns its output hidden states.
    def open_block(self, ids, prompt_mask, max_new_tokens, sampler, stop_ids, pad_id, want_logprobs=False,
                   score=False, forced=None, top_logprobs: int = 0) -> "BlockState":
        env, p = self.env, self.policy
        B, s0 = ids.shape
        T = max_new_tokens
        gbs, ngb = p.gpu_batch_size, p.num_gpu_batches
        assert B == gbs * ngb
        blk = _Block(env.device, ids, prompt_mask, T, sampler, stop_ids, pad_id, gbs, want_logprobs, score, forced,
                     top_logprobs)
        mode = self.graph_mode(T) if not self.graphs.in_use else None
        if mode is not None:
            return BlockState(blk, self.graphs.open(s0, T, mode), ActivationStore(env, p.percents("act"), self.dtype),
                              graphs=self.graphs)
        if not self.graphs.in_use:   # never hold a graph block's caches beside another block's
            self.graphs.close()
        return BlockState(blk, self.make_caches(s0 + T), ActivationStore(env, p.percents("act"), self.dtype))

    def graph_mode(self, max_new_tokens: int):
        """How a block of max_new_tokens would decode: "graph", "static" (engine/graphs.py) or None."""
        if max_new_tokens < 2:   # no decode step
            return None
        mode = graph_mode(self.env)
        return mode if mode is not None and ineligible(self) is None else None

    def prepare(self, ids, prompt_mask, max_new_tokens: int, pad_id: int):
        """Run the first two steps of a block of this shape and drop its tokens: what the shape
        costs once (capturing the decode graphs) is paid here, and the next block of the shape
        reuses it (a benchmark's warm-up)."""
        from .sampling import Sampler, SamplingParams
        state = self.open_block(ids, prompt_mask, max_new_tokens, Sampler(SamplingParams(), self.env.device), None,
                                pad_id)
        completed = False
        try:
            for i in range(min(2, max_new_tokens)):
                self.run_step(state, i)
            completed = True
        finally:
            self.close_block(state, completed)
        self.timings = new_timings()

    def make_caches(self, max_len: int) -> dict:
        """{(layer, GPU batch): LayerCache} of max_len positions for every attention layer."""
        env, p = self.env, self.policy
        caches = {}
        try:
            for li, layer in enumerate(self.layers):
                if layer.kind == "attention":
                    for k in range(p.num_gpu_batches):
                        caches[(li, k)] = LayerCache(env, max_len, p.gpu_batch_size, layer.kv_heads, layer.head_dim,
                                                     self.dtype, p.percents("cache"), f"cache{li}.{k}",
                                                     p.cpu_cache_compute,
                                                     p.comp_cache_config if p.compress_cache else None)
        except BaseException:
            for c in caches.values():
                c.close(recycle=False)
            raise
        return caches

    def run_step(self, state: "BlockState", i: int, hidden_in=None):
        """Generation step i of the block: every layer of this runner over every live GPU batch.
        hidden_in: (B, s, hidden) input hidden states when the first layer is not the embedding.
        Returns the output hidden states (B, s, hidden; zeros for stopped GPU batches) when the
        last layer is not the head, else None (the head chose the next tokens into the block)."""
        env, blk, gbs, ngb = self.env, state.blk, self.policy.gpu_batch_size, self.policy.num_gpu_batches
        t0 = time.perf_counter()
        self._cpu_attn_s = self._gpu_wait_s = 0.0
        if i > 0 and state.graphs is not None and not env.is_cuda:   # the static step, uncaptured
            state.graphs.step(blk, i, blk.finished_batches(ngb))
            return self._step_done(i, t0)
        if i > 0 and state.graphs is not None:   # the whole step from static buffers (engine/graphs.py)
            # no wait for the device: the host queues the next step while this one runs (a step
            # needs nothing back from the GPU); CUDA events time it, read when the block closes
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            state.graphs.step(blk, i, blk.finished_batches(ngb))
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._step_events.append((len(self.timings["decode"]), start, end))
            self.timings["decode"].append(0.0)
            self.timings["cpu_attention"].append(0.0)
            self.timings["gpu_wait"].append(0.0)
            return None
        s0 = blk.s0
        start = 0 if i == 0 else s0 + i - 1
        cur = s0 if i == 0 else s0 + i
        valid = blk.mask[:, :cur]
        positions = (valid.long().cumsum(-1) * valid - 1)[:, start:cur]
        step = _Step(i, start, cur, blk.out, valid, positions, gbs)
        step.unpadded = blk.unpadded
        # A GPU batch whose sequences have all stopped costs nothing more.
        step.skip = blk.finished_batches(ngb) if i > 0 else set()
        if self.layers[0].kind != "embed":
            for k in range(ngb):
                if k not in step.skip:
                    state.acts.put(k, hidden_in[k * gbs:(k + 1) * gbs].to(env.device, self.dtype))
        self._run_step(step, state.caches, state.acts, state.pending_cache, blk)
        out = None
        if self.layers[-1].kind != "head":
            parts = [state.acts.get(k) if k not in step.skip else None for k in range(ngb)]
            like = next(x for x in parts if x is not None)
            out = torch.cat([x if x is not None else torch.zeros_like(like) for x in parts])
        return self._step_done(i, t0, out)

    def _step_done(self, i, t0, out=None):
        self.env.synchronize()
        self.timings["prefill" if i == 0 else "decode"].append(time.perf_counter() - t0)
        if i > 0:
            self.timings["cpu_attention"].append(self._cpu_attn_s)
            self.timings["gpu_wait"].append(self._gpu_wait_s)
        return out

    def _read_step_events(self):
        """The decode steps' device times, from the events their steps recorded."""
        for idx, start, end in self._step_events:
            end.synchronize()
            if idx < len(self.timings["decode"]):
                self.timings["decode"][idx] = start.elapsed_time(end) / 1e3
        self._step_events = []

    def close_block(self, state: "BlockState", completed: bool):
        """Free the block's caches and activations; with completed, first wait for the cache
        stores still in flight (a failed block's buffers are dropped, not reused)."""
        try:
            self._read_step_events()
            if completed:
                for f in state.pending_cache.values():
                    f.wait_host()
        except BaseException:
            completed = False
            raise
        finally:
            if state.graphs is not None:      # its caches stay with the graphs for the next block
                state.graphs.release(completed)
            else:
                for c in state.caches.values():   # reused only when no copy into it can still be in flight
                    c.close(recycle=completed)
            state.acts.close()

    def _run_step(self, step, caches, acts, pending_cache, blk):
        io, ngb, stages = self.io, self.policy.num_gpu_batches, self.stages

        def load_cache(j, k):
            li = next((x for x in stages[j] if self.layers[x].kind == "attention"), None)
            if li is None or step.i == 0 or k in step.skip:
                return None
            cache = caches[(li, k)]
            if not cache.needs_store:  # all of it is read in place: nothing to load
                return None
            return io.load(lambda: cache.load(step.start), cache.loads_from_disk,
                           after=pending_cache.get((li, k)))

        def load_weights(j):
            if all(self.weights.resident(x) for x in stages[j]):  # views, no transfer to wait for
                return Pending([self.weights.load(x) for x in stages[j]])
            on_disk = any(self.weights.on_disk(x) for x in stages[j])
            # packed weights cross as packed bytes; they are unpacked on the compute stream
            return io.load(lambda: [self.weights.load(x, defer=True) for x in stages[j]], on_disk)

        w_next = load_weights(0)
        cache_next = {(0, 0): load_cache(0, 0)}
        for j, stage in enumerate(stages):
            w_fut = w_next
            if j + 1 < len(stages):
                w_next = load_weights(j + 1)
            wdicts = None
            for k in range(ngb):
                nxt = (j, k + 1) if k + 1 < ngb else (j + 1, 0)
                if nxt[0] < len(stages):
                    cache_next[nxt] = load_cache(*nxt)
                cfut = cache_next.pop((j, k))
                if k in step.skip:
                    continue
                if wdicts is None:
                    wdicts = io.result(w_fut) if w_fut.event or w_fut.future else w_fut.value
                    # packed matrices F.linear can read in place stay packed (decode) when one GPU
                    # batch uses them; several unpack once and share the matrix: each packed
                    # F.linear costs about the GPU time of an unpack plus cuBLAS at 32 rows and
                    # adds host operations, which an eager step pays per batch
                    wdicts = [{key: for_compute(w, packed=ngb == 1) for key, w in d.items()} for d in wdicts]
                loaded = io.result(cfut) if cfut is not None else None
                h = acts.get(k) if j > 0 or self.layers[stage[0]].kind != "embed" else None
                h = self._compute(stage, wdicts, h, k, step, caches, loaded, pending_cache, blk.score)
                if self.layers[stage[-1]].kind == "head":
                    blk.emit(h, k, step.i)
                else:
                    acts.put(k, h)

    def _compute(self, stage, wdicts, h, k, step, caches, loaded, pending_cache, score=False):
        b0, b1 = k * step.gbs, (k + 1) * step.gbs
        ctx = step.context(k)
        for li, w in zip(stage, wdicts):
            layer = self.layers[li]
            if layer.kind == "attention":
                ctx.attend = self._attender(caches[(li, k)], loaded, step, b0, b1, li, k, pending_cache)
            elif layer.kind == "head" and not (score and step.i == 0):
                h = h[:, -1:]
            h = layer.forward(w, h, ctx)
            # the closure refers to the step, which holds ctx: left set, that cycle would keep this
            # layer's loaded cache alive until Python's cycle collector ran (GBs of GPU memory)
            ctx.attend = None
        return h

    def _attender(self, cache, loaded, step, b0, b1, li, k, pending_cache):
        valid = step.valid[b0:b1]
        invalid = step.invalid[b0:b1] if step.i > 0 else None
        sparsity = self.policy.attn_sparsity

        def attend(q, k_new, v_new, scale, window=None):
            """window: sliding-window attention over the last `window` positions (keys before it
            are masked like padding, wherever the cache is)."""
            k_rows = k_new.transpose(0, 1)   # (s, b, kv_heads, d): the cache layout (written by copy)
            v_rows = v_new.transpose(0, 1)
            rows = cache.new_rows(k_rows, v_rows)   # compressed: K and V quantised by one call
            cache.write_resident(rows, step.start)
            if cache.needs_store:
                pending_cache[(li, k)] = self.io.store(lambda: cache.store_rest(rows, step.start),
                                                       cache.stores_to_disk, rows.tensors())
            if step.i == 0:
                return attention_core(q, k_new, v_new, valid, scale, sparsity, window=window,
                                      unpadded=step.unpadded[k])
            seen, unseen = valid, invalid
            if window is not None and window < valid.shape[1]:
                seen = in_window(valid, window)
                unseen = ~seen
            rep = q.shape[2] // k_new.shape[2]
            outs = []
            for seg, (a, b) in enumerate(cache.ranges):
                qs = q[:, :, a * rep:b * rep]
                if cache.cpu_compute and cache.k.tiers[seg] != "gpu" and sparsity >= 1.0:
                    outs.append(self._cpu_attention(cache, seg, loaded, qs, k_rows[:, :, a:b], v_rows[:, :, a:b],
                                                    step, unseen if unseen is not None else ~seen, scale))
                    continue
                if cache.resident[seg] and not cache.compressed:  # new row already written in place
                    ks, vs = cache.resident_rows(seg, step.cur)
                else:  # past rows (unpacked into a buffer with room), the new row at full precision
                    ks, vs = cache.past_and_new(seg, step.start, k_rows[:, :, a:b], v_rows[:, :, a:b],
                                                None if cache.resident[seg] else loaded[seg])
                dev = ks.device
                if dev != q.device:  # top-k sparse attention next to the cache, float32 on the CPU
                    o = attention_core(qs.to(dev, torch.float32), ks.permute(1, 0, 2, 3).float(),
                                       vs.permute(1, 0, 2, 3).float(), seen.to(dev), scale, sparsity)
                    o = o.to(q.device, q.dtype)
                else:
                    o = attention_core(qs, ks.permute(1, 0, 2, 3), vs.permute(1, 0, 2, 3), seen, scale, sparsity,
                                       invalid=unseen)
                outs.append(o)
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

        return attend

    def _cpu_attention(self, cache, seg, loaded, qs, k_new, v_new, step, invalid, scale):
        """Decode attention for a CPU-held cache segment, computed on the CPU where it lies. The
        compute thread's time is split into waiting for the device (its queue up to this layer's
        query: weight transfers and device compute) and the CPU kernel (timings["gpu_wait"],
        timings["cpu_attention"], per decode step)."""
        t0 = time.perf_counter()
        q, k_new, v_new, invalid = qs.cpu(), k_new.cpu(), v_new.cpu(), invalid.cpu()
        t1 = time.perf_counter()
        past = _cpu_rows(cache, seg, loaded, step.start)
        o = cpu_decode_attention(q, past, step.start, k_new, v_new, invalid, scale)
        self._gpu_wait_s += t1 - t0
        self._cpu_attn_s += time.perf_counter() - t1
        return o.to(qs.device, qs.dtype)

class _Step:
    def __init__(self, i, start, cur, out, valid, positions, gbs):
        self.i, self.start, self.cur = i, start, cur
        self.out, self.valid, self.positions, self.gbs = out, valid, positions, gbs
        self.invalid = ~valid  # once per step, not once per layer
        self._contexts = {}

    def context(self, k) -> StepContext:
        """GPU batch k's context, shared by every layer of this step (so a family can compute
        per-step values, like rotary angles, once)."""
        if k not in self._contexts:
            b0, b1 = k * self.gbs, (k + 1) * self.gbs
            self._contexts[k] = StepContext(input_ids=self.out[b0:b1, self.start:self.cur],
                                            positions=self.positions[b0:b1])
        return self._contexts[k]


def new_timings() -> dict:
    """Seconds per step: prefill, decode; and per decode step, the compute thread's time in CPU
    attention and waiting for the device before it (both 0 without CPU attention)."""
    return {"prefill": [], "decode": [], "cpu_attention": [], "gpu_wait": []}


def _cpu_rows(cache, seg, loaded, n):
    """past(lo, hi) for the CPU attention kernel over the first n positions: chunks of a resident
    (heads-major) segment as views, or unpacked chunk by chunk when compressed; chunks of the rows
    read from disk (unpacked already, position-major) copied out."""
    if not cache.resident[seg]:
        pk, pv = loaded[seg]
        return row_chunks(pk[:n], pv[:n])
    if cache.compressed:
        def parts(buf):
            return [p.segments[seg][1][:n] for p in buf.parts]
        return packed_chunks(parts(cache.k), parts(cache.v), cache.k.config, cache.k.shape[-1])
    # the whole capacity of the heads-major store (zero-filled where not written yet): its
    # matrices are evenly strided, which the GEMM needs to run fast; the kernel masks rows >= n
    return row_chunks(*cache.resident_rows(seg, cache.k.shape[0]))


class BlockState:
    """One block in flight: its tokens and stop state, KV caches, activations, pending stores."""

    def __init__(self, blk, caches, acts, graphs=None):
        self.blk, self.caches, self.acts = blk, caches, acts
        self.pending_cache = {}
        self.graphs = graphs   # DecodeGraphs when the decode steps replay graphs


class BlockResult:
    """Numpy arrays of one block: ids (B, s0 + T); logprobs (B, T) of the generated tokens;
    scores (B, s0) of the prompt tokens and score_argmax (B, s0) the model's best token at each
    prompt position; top_ids / top_logprobs (B, T, k) and prompt_top_ids / prompt_top_logprobs
    (B, s0, k) the k best alternatives."""
    FIELDS = ("ids", "logprobs", "scores", "score_argmax", "top_ids", "top_logprobs", "prompt_top_ids",
              "prompt_top_logprobs")

    def __init__(self, **arrays):
        for name in self.FIELDS:
            setattr(self, name, arrays.get(name))


class _Block:
    """The token buffer and per-sequence state of the block being generated."""

    def __init__(self, dev, ids, prompt_mask, T, sampler, stop_ids, pad_id, gbs, want_logprobs, score, forced,
                 top_k=0):
        B, s0 = ids.shape
        self.s0, self.gbs, self.pad_id, self.sampler = s0, gbs, pad_id, sampler
        self.out = torch.full((B, s0 + T), pad_id, dtype=torch.long, device=dev)
        self.out[:, :s0] = torch.as_tensor(ids, device=dev)
        self.mask = torch.ones((B, s0 + T), dtype=torch.bool, device=dev)
        self.mask[:, :s0] = torch.as_tensor(prompt_mask, device=dev)
        # GPU batches whose prompts have no padding: their prefill attention is plain causal (known
        # on the host, so choosing the mask-free kernel costs no sync)
        pm = np.asarray(prompt_mask, dtype=bool)
        self.unpadded = [bool(pm[a:a + gbs].all()) for a in range(0, B, gbs)]
        self.stopped = torch.zeros(B, dtype=torch.bool, device=dev)
        self.stop_t = torch.as_tensor(sorted(stop_ids), device=dev) if stop_ids else None
        self.logprobs = torch.zeros((B, T), dtype=torch.float32, device=dev) if want_logprobs else None
        self.score = score
        self.scores = torch.zeros((B, s0), dtype=torch.float32, device=dev) if score else None
        self.score_argmax = torch.zeros((B, s0), dtype=torch.long, device=dev) if score else None
        self.top_k = top_k
        self.top = None
        if top_k:  # (ids, logprobs) of the k best tokens at each generated / prompt position
            self.top = (torch.zeros((B, T, top_k), dtype=torch.long, device=dev),
                        torch.zeros((B, T, top_k), dtype=torch.float32, device=dev))
        self.prompt_top = None
        if top_k and score:
            self.prompt_top = (torch.zeros((B, s0, top_k), dtype=torch.long, device=dev),
                               torch.zeros((B, s0, top_k), dtype=torch.float32, device=dev))
        # Teacher forcing: the tokens to feed instead of sampling (their logprobs are recorded).
        self.forced = None if forced is None else torch.as_tensor(forced, dtype=torch.long, device=dev)

    def all_stopped(self) -> bool:
        return self.stop_t is not None and bool(self.stopped.all())

    def finished_batches(self, ngb) -> set:
        if self.stop_t is None or ngb == 1:
            return set()
        done = self.stopped.view(ngb, self.gbs).all(dim=1).tolist()
        return {k for k, d in enumerate(done) if d}

    def emit(self, logits, k, i):
        """Choose batch k's tokens of step i from the head's logits (b, s, V)."""
        b0, b1 = k * self.gbs, (k + 1) * self.gbs
        logits = logits.float()
        if self.scores is not None and i == 0:
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = self.out[b0:b1, 1:self.s0, None]
            self.scores[b0:b1, 1:] = logp.gather(-1, target).squeeze(-1)
            self.score_argmax[b0:b1, 1:] = logp.argmax(dim=-1)
            if self.prompt_top is not None:
                vals, idx = logp.topk(self.top_k, dim=-1)
                self.prompt_top[0][b0:b1, 1:], self.prompt_top[1][b0:b1, 1:] = idx, vals
            del logp
        last = logits[:, -1]
        ids = self.sampler(last) if self.forced is None else self.forced[b0:b1, i]
        if self.logprobs is not None or self.top is not None:  # under the model (temperature 1)
            full = torch.log_softmax(last, dim=-1)
            lp = full.gather(-1, ids[:, None]).squeeze(-1)
            if self.top is not None:
                vals, idx = full.topk(self.top_k, dim=-1)
                self.top[0][b0:b1, i], self.top[1][b0:b1, i] = idx, vals
        if self.stop_t is not None:
            done = self.stopped[b0:b1]
            ids = torch.where(done, torch.full_like(ids, self.pad_id), ids)
            self.stopped[b0:b1] = done | torch.isin(ids, self.stop_t)
            if self.logprobs is not None:
                lp = torch.where(done, torch.zeros_like(lp), lp)
        if self.logprobs is not None:
            self.logprobs[b0:b1, i] = lp
        self.out[b0:b1, self.s0 + i] = ids

    def result(self) -> BlockResult:
        cpu = lambda t: None if t is None else t.cpu().numpy()  # noqa: E731
        top, ptop = self.top or (None, None), self.prompt_top or (None, None)
        return BlockResult(ids=cpu(self.out), logprobs=cpu(self.logprobs), scores=cpu(self.scores),
                           score_argmax=cpu(self.score_argmax), top_ids=cpu(top[0]), top_logprobs=cpu(top[1]),
                           prompt_top_ids=cpu(ptop[0]), prompt_top_logprobs=cpu(ptop[1]))
