"""GPU check of every placement on tiny random OPT and LLaMA checkpoints against transformers.

On CUDA the engine computes in fp16; the reference is transformers in fp32 on the same
(fp16-rounded) weights, teacher-forced on our output. Reports the share of generated tokens equal
to the reference's argmax, per placement. Usage: PYTHONPATH=. python3 benchmarks/gpu_smoke.py
"""
import itertools
import sys
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from flexgen.flex_llama import LlamaLM
from flexgen.flex_opt import ExecutionEnv, OptLM, Policy

PLACEMENTS = [(100, 0, 100, 0, 100, 0), (0, 100, 100, 0, 100, 0), (0, 50, 0, 100, 100, 0), (100, 0, 0, 0, 0, 100),
              (30, 40, 50, 25, 0, 100), (0, 0, 0, 0, 0, 0)]


def build(fam, d):
    torch.manual_seed(0)
    if fam == "opt":
        cfg = OPTConfig(vocab_size=320, hidden_size=64, num_hidden_layers=3, ffn_dim=128, num_attention_heads=4,
                        max_position_embeddings=64, init_std=0.2)
        m = OPTForCausalLM(cfg)
    else:
        cfg = LlamaConfig(vocab_size=320, hidden_size=64, num_hidden_layers=3, intermediate_size=128,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                          initializer_range=0.2)
        m = LlamaForCausalLM(cfg)
    m = m.half().float().eval()
    m.save_pretrained(d)
    return m, (cfg.pad_token_id if cfg.pad_token_id is not None else 0)


def main():
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    rows, worst = [], 1.0
    for fam in ("opt", "llama"):
        d = tempfile.mkdtemp()
        ref_model, pad = build(fam, d)
        LM = OptLM if fam == "opt" else LlamaLM
        env = ExecutionEnv.create(tempfile.mkdtemp(), device=device)
        prompts = [[pad, pad, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [pad, pad, pad, 20, 21, 22], [3, 4, 5, 6, 7, 8]]
        cache = tempfile.mkdtemp()
        for pct, ngb, overlap, cpu_attn in itertools.product(PLACEMENTS, (1, 2), (True, False), (False, True)):
            pol = Policy(4 // ngb, ngb, *pct, overlap=overlap, sep_layer=overlap, cpu_cache_compute=cpu_attn)
            lm = LM(d, env, cache, pol, progress=False)
            out = torch.tensor(lm.generate(prompts, max_new_tokens=10))
            lm.close()
            mask = out != pad
            mask[:, 6:] = True
            kw = {} if fam == "opt" else {"position_ids": (mask.long().cumsum(-1) * mask - 1).clamp(min=0)}
            with torch.no_grad():
                logits = ref_model(input_ids=out, attention_mask=mask.long(), **kw).logits
            agree = (logits[:, 5:-1].argmax(-1) == out[:, 6:]).float().mean().item()
            worst = min(worst, agree)
            rows.append((fam, pct, ngb, overlap, cpu_attn, agree))
        env.close_copy_threads()
    print(f"{'family':6} {'percent':26} ngb overlap cpu_attn agree")
    for fam, pct, ngb, overlap, cpu_attn, agree in rows:
        print(f"{fam:6} {str(pct):26} {ngb:3} {str(overlap):7} {str(cpu_attn):8} {agree:.3f}")
    print(f"worst top-1 agreement: {worst:.3f}")


if __name__ == "__main__":
    main()
