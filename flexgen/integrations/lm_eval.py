"""lm-evaluation-harness (0.4.x) backend: `--model flexgen`.

    import flexgen.integrations.lm_eval  # registers the backend
    import lm_eval
    lm_eval.simple_evaluate(model="flexgen", model_args="model=smollm2-135m,percent=0:100:100:0:100:0",
                            tasks=["hellaswag"])

or from the shell: `python3 -m flexgen.apps.lm_eval --model_args model=smollm2-135m --tasks ...`.

A thin adapter: lm-eval hands over every request of a kind at once; they are tokenized exactly
as lm-eval's own `hf` backend tokenizes them (same special tokens, same left truncation, same
rolling windows), and the whole list goes to the request layer, which groups, sorts and batches
them through the engine. So a task's numbers are those of `--model hf` on the same weights.

model_args are FlexGen's command-line flags with underscores (model, path, offload_dir, percent,
gpu_batch_size, num_gpu_batches, compress_weight, compress_cache, cpu_cache_compute, device, ...).
`percent` takes six numbers separated by ':' or spaces (model_args are comma-separated), or auto;
prompt_len / gen_len are the workload shape --percent auto optimises for. Backend options as in
`hf`: max_length, add_bos_token, prefix_token_id, max_gen_toks.
"""
from __future__ import annotations

import argparse
import re
import weakref

import torch

import lm_eval.models  # noqa: F401  (lm-eval registers its own backends only into an empty registry)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string

from ..cli import add_arguments, str2bool
from ..engine.generate import GenerationError
from ..models.registry import EMBEDDED_DEFAULT
from ..requests import GenerationRequest, RequestRunner, ScoreRequest, open_model_for_requests

class ModelArgsError(ValueError):
    """A model_arg that is unknown or out of range (message meant for the user)."""


# lm-eval's own backend options (everything else is a FlexGen flag)
BACKEND_OPTIONS = ("max_length", "add_bos_token", "prefix_token_id", "max_gen_toks", "progress")


def flexgen_args(**model_args) -> argparse.Namespace:
    """The shared CLI namespace with model_args applied, each converted as its flag would be
    (ModelArgsError names an unknown or malformed one)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser, EMBEDDED_DEFAULT, None)
    actions = {a.dest: a for a in parser._actions}
    args = parser.parse_args([])
    if "pretrained" in model_args:          # the name lm-eval's hf backend uses
        model_args.setdefault("model", model_args.pop("pretrained"))
    for key, value in model_args.items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None:
            known = ", ".join(sorted(list(actions) + list(BACKEND_OPTIONS)))
            raise ModelArgsError(f"unknown flexgen model_arg {key!r}; known: {known}")
        try:
            if isinstance(action, argparse._StoreTrueAction):
                value = value if isinstance(value, bool) else str2bool(str(value))
            elif action.nargs == "+":        # percent: six numbers (':' or spaces between them), or auto
                value = re.split(r"[:\s/]+", str(value).strip())
            elif action.type is not None:
                value = value if isinstance(value, bool) and action.type is str2bool else action.type(str(value))
            else:
                value = str(value)
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise ModelArgsError(f"model_arg {key}={value!r}: {e}") from None
        setattr(args, dest, value)
    return args


@register_model("flexgen")
class FlexGenLM(TemplateLM):
    """lm-eval's LM interface over FlexGen's request layer (any model, policy and offloading)."""

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """model_args first; lm-eval's --batch_size / --device only where they say nothing."""
        args = dict(arg_dict)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        batch_size, device = extra.pop("batch_size", None), extra.pop("device", None)
        extra.pop("max_batch_size", None)
        if "gpu_batch_size" not in args and batch_size not in (None, 1, "1"):
            # lm-eval's --batch_size (default 1) stands for the GPU batch when model_args do not give it
            args["gpu_batch_size"] = "auto" if str(batch_size).startswith("auto") else batch_size
        if device is not None and "device" not in args:
            # lm-eval's CLI says cuda:0 unless told: on a machine without CUDA that means "the CPU"
            if not str(device).startswith("cuda") or torch.cuda.is_available():
                args["device"] = device
        return cls(**args, **extra)

    def __init__(self, max_length=None, add_bos_token=None, prefix_token_id=None, max_gen_toks=256, progress=True,
                 **model_args):
        super().__init__()
        args = flexgen_args(**model_args)
        self.flex_args = args
        lm, env = open_model_for_requests(args, prompt_len=args.prompt_len, gen_len=args.gen_len)
        self.flex_lm, self.flex_env = lm, env
        # lm-eval never closes a model: release threads and offload files when this object goes
        self._finalizer = weakref.finalize(self, _close, lm, env)
        self.tokenizer = lm.tokenizer
        self.runner = RequestRunner(lm, progress=bool(progress))
        self._max_length = max_length
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._max_gen_toks = int(max_gen_toks)
        self._device = str(env.device) if hasattr(env, "device") else None

    def close(self):
        self._finalizer()

    # ---- what lm-eval asks of a model ------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return int(self._max_length or self.flex_lm.info.max_seq_len)

    @property
    def _score_length(self) -> int:
        """Tokens a scored row may see (hf: max_length). The request layer scores a row through
        the prefill with one position kept for the engine's generated token, so a row of
        context + continuation holds at most max_seq_len - 1 tokens: 2 fewer than hf's
        max_length + 1 at the model's full context."""
        return min(self.max_length, self.flex_lm.info.max_seq_len - 2)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
        # as lm-eval's hf backend: the tokenizer's own default unless told; no second BOS
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        import jinja2
        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                      continue_final_message=not add_generation_prompt)
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)
        except jinja2.exceptions.TemplateError:  # templates without a system role (as hf does)
            return self.tokenizer.apply_chat_template([m for m in chat_history if m["role"] != "system"], **kwargs)

    # ---- the three request kinds -----------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: [((context, continuation) or None, context ids, continuation ids)]."""
        scores, limit = [], self._score_length
        for _, ctx, cont in requests:
            if len(cont) > limit:
                raise GenerationError(f"a continuation of {len(cont)} tokens exceeds the {limit} tokens "
                                      "this model can score at once")
            # hf's left truncation: the model sees at most max_length tokens (context + continuation[:-1])
            whole = (list(ctx) + list(cont))[-(limit + 1):]
            scores.append(ScoreRequest(context=whole[:len(whole) - len(cont)], continuation=list(cont)))
        results = self.runner.score(scores)
        out = []
        for (key, _, _), r in zip(requests, results):
            answer = (float(r.logprob), bool(r.is_greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Every token of each text scored once, in lm-eval's own windows of max_length tokens, the
        windows of all texts in one request list."""
        owners, scores = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            windows = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                max_seq_len=self._score_length, context_len=1)
            for ctx, pred in map(make_disjoint_window, windows):
                owners.append(i)
                scores.append(ScoreRequest(context=list(ctx), continuation=list(pred)))
        totals = [0.0] * len(requests)
        for i, r in zip(owners, self.runner.score(scores)):
            totals[i] += float(r.logprob)
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        gens, stops = [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise GenerationError(f"max_gen_toks {max_gen} must be less than the model's context of "
                                  f"{self.max_length} positions")
            sample = bool(kwargs.get("do_sample"))
            temperature = float(kwargs.get("temperature") or 0.0)
            gens.append(GenerationRequest(
                prompt=self._encode_prompt(context, self.max_length - max_gen), max_new_tokens=max_gen,
                temperature=(temperature or 1.0) if sample else 0.0, top_p=float(kwargs.get("top_p") or 1.0),
                top_k=int(kwargs.get("top_k") or 0), stop=tuple(s for s in until if s),
                seed=int(kwargs["seed"]) if kwargs.get("seed") is not None else torch.initial_seed() & 0x7FFFFFFF))
            stops.append(until)
        out = []
        for req, until, r in zip(requests, stops, self.runner.generate(gens)):
            if r.error is not None:
                raise GenerationError(f"generate_until request {req.args[0][:60]!r}: {r.error}")
            text = postprocess_generated_text(r.completions[0].text, until, None)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    def _encode_prompt(self, text: str, max_ctx_len: int) -> list[int]:
        # as hf's tok_batch_encode: no BOS of ours before a prompt that already starts with one
        if self.tokenizer.bos_token and text.startswith(self.tokenizer.bos_token):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        return self.tokenizer(text, **special)["input_ids"][-max_ctx_len:]

    def get_model_info(self) -> dict:
        info = self.flex_lm.info
        return {"model_name": self.flex_args.model, "model_family": info.family, "flexgen_policy": str(self.flex_lm.policy)}


def _close(lm, env):
    lm.close()
    env.close_copy_threads()
