"""One rank of a pipeline test (tests/test_dist.py starts N of these with the original FlexGen's
launch flags): joins the ranks, then runs every case of a JSON list through flexgen.dist's
PipelineLM; rank 0 saves each case's token ids as <out>/<case>.npy."""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import tiny_models as T  # noqa: E402
from flexgen.dist.comm import Comm, Guard, Launch  # noqa: E402
from flexgen.dist.pipeline import PipelineLM  # noqa: E402
from flexgen.env import ExecutionEnv  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    launch = Launch(a.rank, a.world_size, a.rank, f"tcp://127.0.0.1:{a.port}")
    guard = Guard(a.rank, a.world_size, 20.0)
    guard.install_signals()
    guard.start()
    comm = Comm(launch, "cpu", "cpu", guard, 20.0)
    comm.connect(60)
    with open(a.cases) as f:
        cases = json.load(f)
    for case in cases:
        offload = os.path.join(a.out, f"offload-{case['id']}-rank{a.rank}")
        os.makedirs(offload, exist_ok=True)
        env = ExecutionEnv.create(offload, device="cpu", cpu_threads=1)
        torch.set_num_threads(1)
        policy = T.make_policy(case["placement"], case.get("gbs", 2), **case.get("overrides", {}))
        from conftest import lm_class
        model = PipelineLM(lm_class(case["family"]), case["model"], env, case["cache_root"], policy, comm,
                           num_inner_iterations=case.get("M"), async_comm=case.get("async", False), progress=False)
        prompts = np.load(case["prompts"])
        t0 = time.time()
        out = model.generate(prompts, max_new_tokens=case["gen_len"], stop=case.get("stop"))
        print(f"case {case['id']}: {time.time() - t0:.2f} s", file=sys.stderr)
        model.close()
        env.close_copy_threads()
        if a.rank == 0:
            np.save(os.path.join(a.out, f"{case['id']}.npy"), out)
    comm.close()


if __name__ == "__main__":
    main()
