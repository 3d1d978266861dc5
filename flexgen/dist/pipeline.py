"""The pipeline: each rank holds one stage (a contiguous range of layers, its weights and KV cache
placed by the policy on this rank's GPU, CPU memory and disk) and runs it with the engine's
BlockRunner over micro-batches that flow from stage to stage.

A micro-batch is one block of gpu_batch_size x num_gpu_batches sequences with its own KV cache;
`num_inner_iterations` of them are in flight, so that stage s computes micro-batch m while stage
s + 1 computes m - 1. For generation step i and micro-batch m:

    stage 0     <- tokens of step i-1 (and which sequences stopped) from the last stage
                   embed + its layers                              -> header + hidden to stage 1
    stage s     <- header + hidden from s-1; its layers            -> header + hidden to s+1
    last stage  <- header + hidden; its layers + head, sampling    -> tokens to stage 0

The header (the previous step's tokens and stop flags) keeps every stage's copy of the block in
step, so each one skips the same finished GPU batches and drops the same finished micro-batches:
stop tokens and early stop work across stages. A micro-batch whose sequences have all stopped is
announced once down the pipeline and then leaves every stage's loop. Sends are asynchronous;
with async_comm the next micro-batch's receives are posted before the current one computes.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..engine.generate import fill_block, widen
from ..engine.schedule import new_timings
from ..models.registry import resolve_model
from .stages import describe_stage, split_stages


class PipelineLM:
    """One rank's stage of a model split over comm.world_size ranks.

    PipelineLM(lm_class, model, env, path, policy, comm): lm_class is OptLM or LlamaLM; every rank
    builds its own with the same arguments. generate() must be called on every rank with the same
    arguments; rank 0 gets the token ids, the others None."""

    def __init__(self, lm_class, model, env, path, policy, comm, num_inner_iterations: int | None = None,
                 async_comm: bool = False, progress: bool = True, load_timeout_s: float = 3600.0):
        self.comm, self.policy, self.env = comm, policy, env
        family = resolve_model(model, lm_class.family_name).family
        all_layers = family.layers()
        self.ranges = split_stages(all_layers, comm.world_size)
        self.stage, self.num_stages = comm.rank, comm.world_size
        self.layer_range = self.ranges[self.stage]
        self.stage_names = [describe_stage(all_layers, r) for r in self.ranges]
        self.num_inner_iterations = num_inner_iterations or comm.world_size
        self.async_comm = async_comm
        self.timings = {"prefill": [], "decode": []}
        self.wait_s = 0.0
        # rank 0 converts a checkpoint into the weight cache (once) before any rank reads it
        if comm.rank == 0:
            lm_class.prepare_weight_cache(model, path, env.compute_dtype)
        comm.barrier("weight cache ready", load_timeout_s)
        self.lm = lm_class(model, env, path, policy, progress=progress, layer_range=self.layer_range)

    @property
    def info(self):
        return self.lm.info

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    # ---- generation ------------------------------------------------------------------------------
    def generate(self, inputs, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 stop=None, cut_gen_len=None, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 attention_mask=None, **_ignored):
        """As LM.generate (token ids, same shape and padding rules), through the pipeline."""
        lm = self.lm
        ids, mask, steps, stop_ids, sampler = lm.prepare_generation(
            inputs, max_new_tokens, attention_mask, do_sample, temperature, top_k, top_p, seed, cut_gen_len, stop)
        self.timings = {"prefill": [], "decode": []}
        lm.runner.timings = new_timings()
        self.wait_s = 0.0
        block = self.policy.block_size
        group = block * self.num_inner_iterations
        outs = []
        for g in range(0, len(ids), group):
            part, part_mask = ids[g:g + group], mask[g:g + group]
            micro = []
            for b in range(0, len(part), block):
                micro.append((fill_block(part[b:b + block], block), fill_block(part_mask[b:b + block], block),
                              min(block, len(part) - b)))
            res = self._run_group(micro, steps, sampler, stop_ids)
            if res is not None:
                outs.extend(r[:n] for r, (_, _, n) in zip(res, micro))
        self.comm.flush()
        if self.stage != 0:
            return None
        return widen(np.concatenate(outs), max_new_tokens - steps, lm.info.pad_token_id)

    def _run_group(self, micro, T, sampler, stop_ids):
        """Run one group of micro-batches through the pipeline for T steps. Stage 0 returns each
        micro-batch's output rows."""
        comm, runner, lm = self.comm, self.lm.runner, self.lm
        N, s = self.num_stages, self.stage
        first, last = s == 0, s == N - 1
        prev, nxt = (s - 1) % N, (s + 1) % N
        pad = lm.info.pad_token_id
        B = self.policy.block_size
        H = lm.info.hidden_size
        dtype = self.env.compute_dtype
        s0 = micro[0][0].shape[1]
        M = len(micro)
        states = []
        completed = False
        try:
            for ids, mask, _ in micro:
                states.append(runner.open_block(ids, mask, T, sampler, stop_ids, pad))
            dropped = set()
            order = [(i, m) for i in range(T + 1) for m in range(M)]
            t_start = time.perf_counter()
            t_last = None
            pos = 0
            pending = None   # the next item's posted receives (async_comm)

            def next_item(from_pos):
                for q in range(from_pos, len(order)):
                    i, m = order[q]
                    if m in dropped or (i == T and not first):
                        continue
                    return q
                return None

            def post(q):
                """Receives for item q: (tokens) on stage 0, (header, hidden) elsewhere."""
                i, m = order[q]
                if first:
                    return [comm.irecv((2, B), torch.long, N - 1, f"tokens of step {i - 1}")] if i > 0 else []
                seq = s0 if i == 0 else 1
                return [comm.irecv((2, B), torch.long, prev, f"a header of step {i}"),
                        comm.irecv((B, seq, H), dtype, prev, f"hidden states of step {i}")]

            pos = next_item(0)
            while pos is not None:
                i, m = order[pos]
                st = states[m]
                blk = st.blk
                recvs = pending if pending is not None else post(pos)
                pending = None
                t0 = time.perf_counter()
                got = [r.wait() for r in recvs]
                self.wait_s += time.perf_counter() - t0
                if i > 0:
                    header = got[0].to(blk.out.device)
                    blk.out[:, s0 + i - 1] = header[0]
                    blk.stopped.copy_(header[1].bool())
                if first and i > 0 and m == self._last_live(M, dropped):
                    now = time.perf_counter()   # every micro-batch's tokens of step i-1 are back
                    self.timings["prefill" if i == 1 else "decode"].append(now - (t_last or t_start))
                    t_last = now
                if first and i == T:
                    pos = next_item(pos + 1)
                    continue
                done = i > 0 and blk.all_stopped()
                hidden_in = None if first else got[1]
                if done:
                    dropped.add(m)
                # post the next item's receives before computing this one
                nq = next_item(pos + 1)
                if self.async_comm and nq is not None:
                    pending = post(nq)
                if done:
                    if not last:
                        comm.send(self._header(blk, i, s0, B), nxt)
                        comm.send(torch.zeros((B, s0 if i == 0 else 1, H), dtype=dtype), nxt)
                    pos = nq
                    continue
                out = runner.run_step(st, i, hidden_in)
                if last:
                    comm.send(torch.stack([blk.out[:, s0 + i], blk.stopped.long()]), 0)
                else:
                    comm.send(self._header(blk, i, s0, B), nxt)
                    comm.send(out, nxt)
                pos = nq
            completed = True
        finally:
            for st in states:
                runner.close_block(st, completed)
        if not first:
            return None
        return [st.blk.out.cpu().numpy() for st in states]

    @staticmethod
    def _last_live(M, dropped):
        live = [m for m in range(M) if m not in dropped]
        return live[-1] if live else None

    @staticmethod
    def _header(blk, i, s0, B):
        if i == 0:
            return torch.zeros((2, B), dtype=torch.long)
        return torch.stack([blk.out[:, s0 + i - 1], blk.stopped.long()])

    def close(self):
        self.lm.close()
