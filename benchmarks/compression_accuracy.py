"""Accuracy of 4-bit group-wise compression layouts at equal bytes moved (issue 12, item 8).

Perplexity (flexgen.apps.perplexity's windows: half context, half scored through the decode path,
so a compressed cache counts as in generation), on the CPU in float32, of:

- smollm2-135m (LLaMA shape; its weights come from a GGUF Q4_1 file: blocks of 32 along dim 1),
  on tests/data/sample.txt and on a held-out English text;
- an OPT-shaped and a LLaMA-shaped model (3 layers, hidden 128, head dim 64, byte vocabulary)
  trained here from a fixed seed on English text (licence texts of this machine), in float32, so
  their weights never passed through any quantiser; scored on a held-out licence.

Bytes moved per value: 4 bits + an fp16 scale and an fp16 minimum per group = 4 + 32 / group bits
(64: 4.5, 32: 5.0, 128: 4.25); layouts of the same group size move the same bytes.

    PYTHONPATH=. python benchmarks/compression_accuracy.py [--steps 400] [--threads 2]

Prints a table (perplexity and the change against uncompressed, per model and layout) last.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from flexgen.apps.perplexity import perplexity  # noqa: E402
from flexgen.env import ExecutionEnv  # noqa: E402
from flexgen.policy import CompressionConfig, Policy  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LICENCES = "/usr/share/common-licenses"
TRAIN_TEXTS = ["GPL-3", "GFDL-1.3", "LGPL-2.1", "MPL-1.1", "Apache-2.0", "GPL-1"]
HELD_OUT = "MPL-2.0"     # not in the training texts

# (label, weight config or None, cache group or None)
WEIGHT_LAYOUTS = [("w g128 dim0", 128, 0), ("w g128 dim1", 128, 1), ("w g64 dim0 (FlexGen)", 64, 0),
                  ("w g64 dim1", 64, 1), ("w g32 dim0", 32, 0), ("w g32 dim1 (GGUF blocks)", 32, 1)]
CACHE_GROUPS = [64, 32, 16]


def layouts():
    yield "none", None, None
    for label, g, d in WEIGHT_LAYOUTS:
        yield label, CompressionConfig(4, g, d, False), None
    for g in CACHE_GROUPS:
        yield f"cache g{g} head dim" + (" (FlexGen)" if g == 64 else ""), None, CompressionConfig(4, g, 2, False)
    for (g, d), cg in (((64, 0), 64), ((64, 1), 64), ((64, 1), 32), ((32, 1), 32)):
        yield (f"w g{g} dim{d} + cache g{cg}", CompressionConfig(4, g, d, False), CompressionConfig(4, cg, 2, False))


def bits(cfg):
    return "-" if cfg is None else f"{4 + 32 / cfg.group_size:.2f}"


def read(name):
    with open(os.path.join(LICENCES, name), encoding="utf-8") as f:
        return f.read()


# ---- tiny models trained here ---------------------------------------------------------------------

def train_tiny(family: str, out_dir: str, steps: int, seed: int = 0) -> str:
    """A 4-layer byte-level model trained on the licence texts; saved as an HF checkpoint."""
    if family == "opt":
        from transformers import OPTConfig as C, OPTForCausalLM as M
        cfg = C(vocab_size=256, hidden_size=128, num_hidden_layers=3, num_attention_heads=2, ffn_dim=512,
                max_position_embeddings=256, word_embed_proj_dim=128, pad_token_id=1, bos_token_id=2,
                eos_token_id=2, dropout=0.0, attention_dropout=0.0)
    else:
        from transformers import LlamaConfig as C, LlamaForCausalLM as M
        cfg = C(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = M(cfg)
    data = torch.tensor(list("\n".join(read(n) for n in TRAIN_TEXTS).encode("utf-8")), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    seq, batch = 64, 8
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[i:i + seq] for i in idx])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  {family} step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.save_pretrained(out_dir)
    return out_dir


# ---- perplexity through the engine ----------------------------------------------------------------

def ppl(lm_cls, model, cache_root, ids, window, wcfg, ccfg, offload):
    policy = Policy(16, 1, 100, 0, 100, 0, 100, 0, compress_weight=wcfg is not None,
                    comp_weight_config=wcfg or CompressionConfig(), compress_cache=ccfg is not None,
                    comp_cache_config=ccfg or CompressionConfig(group_dim=2))
    env = ExecutionEnv.create(offload, device="cpu")
    try:
        lm = lm_cls(model, env, cache_root, policy, progress=False)
        try:
            return perplexity(lm, ids, window)[0]
        finally:
            lm.close()
    finally:
        env.close_copy_threads()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400, help="training steps of each tiny model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["smollm2", "tiny"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from flexgen.flex_llama import LlamaLM
    from flexgen.flex_opt import OptLM
    work = tempfile.mkdtemp(prefix="comp_acc_")
    offload = os.path.join(work, "off")
    rows = []   # (model, text, label, wbits, cbits, ppl)

    def measure(name, lm_cls, model, texts, window):
        for text_name, ids in texts:
            base = None
            for label, wcfg, ccfg in layouts():
                t0 = time.time()
                value = ppl(lm_cls, model, os.path.join(work, "cache"), ids, window, wcfg, ccfg, offload)
                base = value if base is None else base
                rows.append((name, f"{text_name} ({len(ids)} tok)", label, bits(wcfg), bits(ccfg), value,
                             100 * (value / base - 1)))
                print(f"{name:14s} {text_name:10s} {label:28s} {value:9.3f} ({time.time() - t0:.0f} s)", flush=True)

    if args.only in (None, "smollm2"):
        from transformers import AutoTokenizer  # noqa: F401 (the GGUF tokenizer comes through the LM)
        probe_env = ExecutionEnv.create(offload, device="cpu")
        lm = LlamaLM("smollm2-135m", probe_env, os.path.join(work, "cache"),
                     Policy(1, 1, 100, 0, 100, 0, 100, 0), progress=False)
        tok = lm.tokenizer
        lm.close()
        probe_env.close_copy_threads()
        with open(os.path.join(REPO, "tests", "data", "sample.txt"), encoding="utf-8") as f:
            sample = tok.encode(f.read())
        held = tok.encode(read(HELD_OUT))[:1024]
        measure("smollm2-135m", LlamaLM, "smollm2-135m", [("sample.txt", sample), (HELD_OUT, held)], 128)

    if args.only in (None, "tiny"):
        held = list(read(HELD_OUT).encode("utf-8"))[:2048]
        for family, cls in (("opt", OptLM), ("llama", LlamaLM)):
            print(f"training the tiny {family} ({args.steps} steps)", flush=True)
            d = train_tiny(family, os.path.join(work, f"trained-{family}"), args.steps)
            measure(f"trained-{family}", cls, d, [(HELD_OUT, held)], 128)

    print()
    print("| model | text | layout | weight bits/value | cache bits/value | perplexity | change |")
    print("|---|---|---|---|---|---|---|")
    for m, t, label, wb, cb, v, ch in rows:
        print(f"| {m} | {t} | {label} | {wb} | {cb} | {v:.3f} | {ch:+.1f}% |")


if __name__ == "__main__":
    main()
