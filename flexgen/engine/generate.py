"""generate(): prompts in, token ids out, for any model family on any placement."""
from __future__ import annotations

import os

import numpy as np
import torch

from .. import weights as weight_io
from ..models.registry import resolve_model
from .sampling import Sampler, SamplingParams
from .schedule import BlockResult, BlockRunner, new_timings
from .weight_store import WeightStore

DUMMY_MARK = "_DUMMY_"


class GenerationError(ValueError):
    """Bad generation arguments, with a message meant for the user."""


class LM:
    """A model placed by a policy, ready to generate (OptLM and LlamaLM are this, per family)."""
    family_name: str | None = None

    def __init__(self, model, env, path, policy, progress: bool = True, layer_range: tuple | None = None):
        """layer_range (lo, hi): hold and run only the family's layers[lo:hi] (one pipeline stage of
        flexgen/dist: only those weights are read and placed, only their KV cache is made)."""
        resolved = resolve_model(model, self.family_name)
        self.family = resolved.family
        self.config = self.family.config
        self.info = self.family.info()
        self.env, self.policy, self.path = env, policy, path
        env.fit_threads(policy)   # an `auto` split gives I/O no cores when nothing is on disk
        env.release_spares()      # cache memory another model left for reuse
        self.name = resolved.name
        self._resolved = resolved
        self._tokenizer = False
        self._cache_dir = None
        self.layers = self.family.layers()
        if layer_range is not None:
            self.layers = self.layers[layer_range[0]:layer_range[1]]
        self.dtype = env.compute_dtype
        read_tensor = None
        if path is None or DUMMY_MARK not in str(path):
            cache_dir = self._cache_dir = self._prepare_weight_cache(path, self.dtype)
            read_tensor = lambda file, shape: weight_io.load_cached(cache_dir, file, shape)  # noqa: E731
        self.weights = WeightStore(env, self.layers, policy.percents("weight"), policy.pin_weight,
                                   self.dtype, read_tensor, progress=progress,
                                   compression=policy.comp_weight_config if policy.compress_weight else None)
        self.runner = BlockRunner(self.layers, env, policy, self.weights, self.dtype)

    # ---- weights and tokenizer ----------------------------------------------------------------
    @classmethod
    def prepare_weight_cache(cls, model, path, compute_dtype=torch.float16):
        """Convert the model's checkpoint into the weight cache under path, if it is not there yet
        (what the constructor does first, for an env computing in compute_dtype): lets one
        process convert before several read it."""
        if path is not None and DUMMY_MARK in str(path):
            return None
        lm = cls.__new__(cls)
        resolved = resolve_model(model, cls.family_name)
        lm._resolved, lm.name, lm.layers = resolved, resolved.name, resolved.family.layers()
        return lm._prepare_weight_cache(path, compute_dtype)

    def _prepare_weight_cache(self, path, compute_dtype) -> str:
        """The cache to read: FlexGen's float16 one (`<name>-np`), or for float32 compute a float32
        one (`<name>-np-float32`: float32, bfloat16 and GGUF-dequantized weights keep their exact
        values, so CPU runs match transformers' float32). Without a checkpoint to convert, float32
        compute reads an existing float16 cache (one made by the original FlexGen, say)."""
        root = os.path.expanduser(path or os.path.join("~", "flexgen_weights"))
        half = os.path.join(root, f"{self.name}-np")
        wide = compute_dtype == torch.float32
        cache_dir = os.path.join(root, f"{self.name}-np-float32") if wide else half
        expected = {f: shape for layer in self.layers for w in layer.weights for f, shape in w.files()}

        def usable(d):
            return weight_io.cache_is_complete(d) or (
                os.path.isdir(d) and all(os.path.exists(os.path.join(d, f)) for f in expected))
        if usable(cache_dir):
            return cache_dir
        if wide and usable(half) and self._resolved.source is None:
            return half   # no local checkpoint: FlexGen's cache rather than a download
        source = self._source()
        if source is None:
            raise weight_io.WeightsError(
                f"no weights for {self.name}: {half} does not exist and there is no checkpoint to "
                f"convert (pass a checkpoint directory as the model, or --path {DUMMY_MARK} for dummy weights)")
        weight_io.convert_checkpoint(source, cache_dir, expected=expected,
                                     dtype=np.float32 if wide else np.float16)
        return cache_dir

    def _source(self):
        r = self._resolved
        if r.source is None and r.hub_name is not None:
            r.source = weight_io.resolve_hub_checkpoint(r.hub_name)
        return r.source

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer, or None when there is none available offline."""
        if self._tokenizer is False:
            self._tokenizer = None
            # A GGUF tokenizer takes seconds to rebuild from the file's vocabulary: keep a copy in
            # the weight cache and load that next time.
            saved = os.path.join(self._cache_dir, "tokenizer") if self._cache_dir else None
            try:
                if saved and os.path.isfile(os.path.join(saved, "tokenizer_config.json")):
                    self._tokenizer = weight_io.load_tokenizer(saved)
                    return self._tokenizer
                source = self._resolved.source
                if source is None and self._resolved.hub_name is not None:
                    source = _cached_hub_snapshot(self._resolved.hub_name)
                if source is not None:
                    self._tokenizer = weight_io.load_tokenizer(source)
                    if saved and self._tokenizer is not None and str(source).endswith(".gguf"):
                        self._tokenizer.save_pretrained(saved)
            except Exception:  # a model without a usable tokenizer still generates ids
                self._tokenizer = self._tokenizer or None
        return self._tokenizer

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, inputs, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 stop=None, debug_mode=None, cut_gen_len=None, verbose: int = 0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, attention_mask=None, on_step=None,
                 return_logprobs: bool = False):
        """Generate for equally long, left-padded prompts (rows of token ids).

        Returns (num_prompts, prompt_len + max_new_tokens) ids: the prompts, then the generated
        tokens; after a sequence emits a stop token the rest is padding. The attention mask is
        `ids != pad_token_id` unless given (needed where the pad id is also a real token, as in
        chat prompts whose pad is their end-of-turn token). With return_logprobs, also returns
        (num_prompts, max_new_tokens) log-probabilities of the generated tokens under the model
        (0 after a sequence has stopped)."""
        ids, mask, steps, stop_ids, sampler = self.prepare_generation(
            inputs, max_new_tokens, attention_mask, do_sample, temperature, top_k, top_p, seed, cut_gen_len, stop)
        results = self._run_blocks(ids, mask, steps, sampler, stop_ids, on_step, want_logprobs=return_logprobs)
        missing = max_new_tokens - steps
        out = widen(np.concatenate([r.ids for r in results]), missing, self.info.pad_token_id)
        if not return_logprobs:
            return out
        return out, widen(np.concatenate([r.logprobs for r in results]), missing, 0.0)

    def prepare_generation(self, inputs, max_new_tokens, attention_mask, do_sample, temperature, top_k, top_p,
                           seed, cut_gen_len, stop):
        """generate()'s arguments checked and turned into (ids, mask, steps, stop ids, sampler),
        for this class and the pipeline."""
        ids = self._check_inputs(inputs, max_new_tokens)
        mask = self._prompt_mask(ids, attention_mask)
        try:
            params = SamplingParams(do_sample, temperature, top_k, top_p, seed)
        except ValueError as e:
            raise GenerationError(str(e)) from e
        # cut_gen_len (FlexGen's debugging aid) runs fewer steps; the output keeps its full width.
        steps = min(max_new_tokens, cut_gen_len) if cut_gen_len else max_new_tokens
        return ids, mask, steps, self._stop_ids(stop), Sampler(params, self.env.device)

    def score(self, inputs, attention_mask=None) -> np.ndarray:
        """Log-probability of every prompt token given the tokens before it (column 0 and
        padding are 0), as evaluation harnesses need to score given continuations."""
        ids = self._check_inputs(inputs, 1)
        mask = self._prompt_mask(ids, attention_mask)
        sampler = Sampler(SamplingParams(), self.env.device)
        results = self._run_blocks(ids, mask, 1, sampler, None, None, score=True)
        scores = np.concatenate([r.scores for r in results])
        prev_real = np.concatenate([np.zeros((len(ids), 1), bool), mask[:, :-1]], axis=1)
        return np.where(mask & prev_real, scores, 0.0)

    def score_continuation(self, inputs, continuation, attention_mask=None) -> np.ndarray:
        """Log-probabilities (num_prompts, continuation_len) of given continuation tokens, fed
        through the decode path one step at a time (teacher forcing), so a compressed or offloaded
        KV cache is exercised exactly as in generation."""
        cont = np.asarray(continuation, dtype=np.int64)
        ids = self._check_inputs(inputs, cont.shape[1])
        mask = self._prompt_mask(ids, attention_mask)
        if cont.shape[0] != ids.shape[0] or cont.min() < 0 or cont.max() >= self.info.vocab_size:
            raise GenerationError("continuation must have one row of valid token ids per prompt")
        sampler = Sampler(SamplingParams(), self.env.device)
        results = self._run_blocks(ids, mask, cont.shape[1], sampler, None, None, want_logprobs=True, forced=cont)
        return np.concatenate([r.logprobs for r in results])

    def run_rows(self, ids, mask, steps: int, params: SamplingParams, stop=None, logprobs: bool = False,
                 top_logprobs: int = 0, score: bool = False, forced=None) -> BlockResult:
        """The request layer's entry: left-padded rows with their mask, `steps` tokens each, with
        whatever the rows need recorded (generated-token logprobs, top-k alternatives, prompt
        scores); forced: (rows, steps) tokens to feed instead of sampling. One BlockResult for all
        rows (run in blocks of the policy). The last token is never fed back, so rows may fill
        the context up to its last position."""
        ids = self._check_inputs(ids, steps, positions=steps - 1)
        mask = self._prompt_mask(ids, mask)
        sampler = Sampler(params, self.env.device)
        results = self._run_blocks(ids, mask, steps, sampler, self._stop_ids(stop), None,
                                   forced=None if forced is None else np.asarray(forced, dtype=np.int64),
                                   want_logprobs=logprobs, top_logprobs=top_logprobs, score=score)
        return BlockResult(**{name: np.concatenate([getattr(r, name) for r in results])
                              for name in BlockResult.FIELDS if getattr(results[0], name) is not None})

    def resize_batch(self, gpu_batch_size: int, num_gpu_batches: int) -> None:
        """Run later blocks with another block shape (weights are placed per layer, not per batch,
        so nothing is reloaded): the request layer's retry after running out of memory."""
        self.policy = self.policy.replace(gpu_batch_size=gpu_batch_size, num_gpu_batches=num_gpu_batches)
        self.runner.policy = self.policy

    def _run_blocks(self, ids, mask, steps, sampler, stop_ids, on_step, forced=None, **kw):
        """Run the prompts in blocks of gpu_batch_size x num_gpu_batches."""
        self.runner.timings = new_timings()
        block = self.policy.block_size
        results = []
        for b in range(0, len(ids), block):
            part, part_mask = fill_block(ids[b:b + block], block), fill_block(mask[b:b + block], block)
            part_forced = None if forced is None else fill_block(forced[b:b + block], block)
            n = min(block, len(ids) - b)
            r = self.runner.run(part, part_mask, steps, sampler, stop_ids, self.info.pad_token_id, on_step,
                                forced=part_forced, **kw)
            for name in BlockResult.FIELDS:
                if getattr(r, name) is not None:
                    setattr(r, name, getattr(r, name)[:n])
            results.append(r)
        return results

    @property
    def timings(self):
        return self.runner.timings

    def _prompt_mask(self, ids, attention_mask) -> np.ndarray:
        """The caller's attention mask, or FlexGen's rule: every non-pad token is real."""
        if attention_mask is None:
            return ids != self.info.pad_token_id
        return np.asarray(attention_mask, dtype=bool).reshape(ids.shape)

    def _check_inputs(self, inputs, max_new_tokens, positions=None) -> np.ndarray:
        """positions: how many positions past the prompt are fed (default: max_new_tokens)."""
        try:
            ids = np.asarray(inputs, dtype=np.int64)
        except (ValueError, TypeError) as e:
            raise GenerationError("input_ids must be equally long rows of token ids (left-pad them)") from e
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise GenerationError(f"input_ids must be a non-empty 2-D array, got shape {ids.shape}")
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
        if ids.min() < 0 or ids.max() >= self.info.vocab_size:
            raise GenerationError(f"token ids must be in [0, {self.info.vocab_size})")
        total = ids.shape[1] + (max_new_tokens if positions is None else positions)
        if total > self.info.max_seq_len:
            raise GenerationError(f"prompt length {ids.shape[1]} + {max_new_tokens} new tokens = {total} exceeds "
                                  f"the model's context of {self.info.max_seq_len} positions")
        return ids

    def _stop_ids(self, stop) -> set[int] | None:
        if stop is None:
            return None
        items = stop if isinstance(stop, (list, tuple, set)) else [stop]
        out = set()
        for s in items:
            if isinstance(s, str):
                tok = self.tokenizer
                if tok is None:
                    raise GenerationError(f"stop string {s!r} needs a tokenizer, and this model has none")
                enc = tok.encode(s, add_special_tokens=False)
                if len(enc) != 1:
                    raise GenerationError(f"stop string {s!r} is {len(enc)} tokens; give a single-token string "
                                          "or token ids")
                out.add(enc[0])
            else:
                out.add(int(s))
        return out

    def close(self):
        self.runner.close()   # its graphs read the weights: free them first
        self.weights.close()
        self.env.release_spares()


def fill_block(rows: np.ndarray, block: int) -> np.ndarray:
    """A short last block filled up to the block's size with copies of its first row (the
    engine's block shape is fixed by the policy; the copies' results are dropped)."""
    n = len(rows)
    return rows if n >= block else np.concatenate([rows, np.repeat(rows[:1], block - n, axis=0)])


def widen(out: np.ndarray, missing: int, value) -> np.ndarray:
    """`missing` more columns (the steps cut_gen_len did not run), filled with value."""
    return out if missing <= 0 else np.pad(out, ((0, 0), (0, missing)), constant_values=value)


def _cached_hub_snapshot(name):
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, local_files_only=True)
    except Exception:
        return None
