"""Accuracy of 4-bit group-wise compression layouts at equal bytes moved (issue 12, item 8).

Perplexity (flexgen.apps.perplexity's windows: half context, half scored through the decode path,
so a compressed cache counts as in generation), on the CPU in float32, of:

- smollm2-135m (LLaMA shape; its weights come from a GGUF Q4_1 file: blocks of 32 along dim 1),
  on tests/data/sample.txt (the layouts that decide the default: minutes each on a small CPU);
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


def layouts(short=False):
    """All layouts; short: the ones that decide the default (smollm2 takes minutes per layout here,
    every weight being unpacked at every decode step on two shared cores)."""
    yield "none", None, None
    for label, g, d in WEIGHT_LAYOUTS:
        if not short or g != 128:
            yield label, CompressionConfig(4, g, d, False), None
    for g in CACHE_GROUPS:
        if not short or g != 16:
            yield f"cache g{g} head dim" + (" (FlexGen)" if g == 64 else ""), None, CompressionConfig(4, g, 2, False)
    for (g, d), cg in (((64, 0), 64), ((64, 1), 64), ((64, 1), 32), ((32, 1), 32)):
        if not short or (g, d, cg) in ((64, 0, 64), (64, 1, 64)):
            yield (f"w g{g} dim{d} + cache g{cg}", CompressionConfig(4, g, d, False),
                   CompressionConfig(4, cg, 2, False))


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


# ---- smollm2's weight layouts: one forward pass per window in transformers ------------------------

def hf_window_ppl(model, ids, window):
    """The perplexity app's windows (first half context, second half scored; the first context's
    own tokens scored too), each window in one teacher-forced forward pass: the same sums as the
    engine's decode path, without unpacking every weight at every step."""
    half = window // 2
    total, count = 0.0, 0
    with torch.no_grad():
        x = torch.tensor([ids[:half]])
        lp = torch.log_softmax(model(x).logits.float(), -1)[0, :-1]
        total += float(lp.gather(1, x[0, 1:, None]).sum())
        count += half - 1
        for s0 in range(0, len(ids) - half, half):
            w = ids[s0:s0 + 2 * half]
            x = torch.tensor([w])
            lp = torch.log_softmax(model(x).logits.float(), -1)[0, half - 1:-1]
            total += float(lp.gather(1, x[0, half:, None]).sum())
            count += len(w) - half
    return float(np.exp(-total / count)), count


def fake_quantized(model, cfg):
    """A copy of model whose transformer-layer matrices went through our compress/decompress (fp16
    first, as the weight cache stores them); embeddings and head stay, as in the engine."""
    import copy
    from flexgen.memory.compression import compress, decompress
    m = copy.deepcopy(model)
    for name, p in m.named_parameters():
        if ".layers." in name and p.dim() == 2:
            w = p.data.to(torch.float16)
            p.data = decompress(compress(w, cfg), torch.float32, w.shape)
    return m


def smollm2_weight_layouts(ids, window, rows):
    from transformers import AutoModelForCausalLM
    from flexgen.weights import find_smollm2_gguf
    path = find_smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    base = None
    for label, wcfg, ccfg in layouts():
        if ccfg is not None:
            continue
        m = model if wcfg is None else fake_quantized(model, wcfg)
        value, n = hf_window_ppl(m, ids, window)
        base = value if base is None else base
        rows.append(("smollm2-135m (transformers)", f"sample.txt ({n} scored)", label, bits(wcfg), "-", value,
                     100 * (value / base - 1)))
        print(f"smollm2 (hf)  {label:28s} {value:9.3f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400, help="training steps of each tiny model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["smollm2", "tiny"], default=None)
    ap.add_argument("--short", action="store_true", help="tiny models: only the layouts smollm2 gets")
    ap.add_argument("--held-out-bytes", type=int, default=2048, help="tiny models: bytes of held-out text scored")
    ap.add_argument("--work", default=None, help="folder for weight caches (kept; default: a new temp folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from flexgen.flex_llama import LlamaLM
    from flexgen.flex_opt import OptLM
    work = args.work or tempfile.mkdtemp(prefix="comp_acc_")
    offload = os.path.join(work, "off")
    rows = []   # (model, text, label, wbits, cbits, ppl)

    def measure(name, lm_cls, model, texts, window, short=False, cache_only=False):
        for text_name, ids in texts:
            base = None
            for label, wcfg, ccfg in layouts(short):
                if cache_only and wcfg is not None:
                    continue
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
        smollm2_weight_layouts(sample, 128, rows)
        measure("smollm2-135m", LlamaLM, "smollm2-135m", [("sample.txt", sample)], 128, short=True,
                cache_only=True)

    if args.only in (None, "tiny"):
        held = list(read(HELD_OUT).encode("utf-8"))[:args.held_out_bytes]
        for family, cls in (("opt", OptLM), ("llama", LlamaLM)):
            d = os.path.join(work, f"trained-{family}")
            if not os.path.isfile(os.path.join(d, "config.json")):   # a kept --work folder has it
                print(f"training the tiny {family} ({args.steps} steps)", flush=True)
                train_tiny(family, d, args.steps)
            measure(f"trained-{family}", cls, d, [(HELD_OUT, held)], 128, short=args.short)

    print()
    print("| model | text | layout | weight bits/value | cache bits/value | perplexity | change |")
    print("|---|---|---|---|---|---|---|")
    for m, t, label, wb, cb, v, ch in rows:
        print(f"| {m} | {t} | {label} | {wb} | {cb} | {v:.3f} | {ch:+.1f}% |")


if __name__ == "__main__":
    main()
