"""Run a HELM scenario with FlexGen executing every request (FlexGen's HELM app, on crfm-helm 0.5.x).

    python3 -m flexgen.apps.helm_run --description mmlu:model=text,subject=abstract_algebra,data_augmentation=canonical \\
        --pad-to-seq-len 512 --model facebook/opt-30b --percent 20 80 0 100 0 100 --gpu-batch-size 48 \\
        --num-gpu-batches 3 --max-eval-instance 100

HELM builds the run specs from the description (its `model=` is replaced by this FlexGen model,
registered as the deployment flexgen/<name>), its scenario makes the instances, its adapter the
requests; all requests of a run then go to the engine in one list (flexgen.requests groups them by
decoding parameters, sorts them by length and runs them in gpu_batch_size x num_gpu_batches
blocks, padded to --pad-to-seq-len); HELM computes its metrics and writes its run directory,
<output-path>/runs/<suite>/<run>/ (run_spec.json, scenario.json, scenario_state.json, stats.json,
per_instance_stats.json), which helm-summarize and helm-server read. Prints the headline metrics,
requests, tokens, time and throughput.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HEADLINE = ("exact_match", "quasi_exact_match", "prefix_exact_match", "quasi_prefix_exact_match",
            "exact_match_indicator", "final_number_exact_match", "f1_score", "rouge_l", "bits_per_byte",
            "logprob", "ece_10_bin")


class HelmRunError(ValueError):
    """A description HELM cannot turn into a run (message meant for the user)."""


def build_parser() -> argparse.ArgumentParser:
    from ..integrations.helm_client import add_engine_arguments
    p = argparse.ArgumentParser(prog="python3 -m flexgen.apps.helm_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--description", required=True, help="HELM run entry, e.g. synthetic_reasoning:mode=pattern_match")
    p.add_argument("--max-eval-instances", type=int, default=None, help="evaluation instances per run")
    p.add_argument("--num-train-trials", type=int, default=None, help="in-context example draws (HELM's default)")
    p.add_argument("--output-path", default="benchmark_output", help="HELM's benchmark output directory")
    p.add_argument("--suite", default="flexgen", help="runs go to <output-path>/runs/<suite>/")
    p.add_argument("--run-path", default=None, help="write run directories here instead (FlexGen's old flag)")
    p.add_argument("--local-path", default="prod_env",
                   help="HELM's local path: its model_deployments.yaml etc. are read when present")
    p.add_argument("--name", default=None, help="HELM model name (default flexgen/<model's short name>)")
    add_engine_arguments(p)
    p.set_defaults(gpu_batch_size=16)    # the original app's default
    return p


def with_model(description: str, model_name: str, deployment: bool = False) -> str:
    """The description with its model= (a HELM model, a group like `text`, or absent) set to ours;
    with `deployment`, model_deployment= too (for run specs that name a deployment of their own)."""
    from helm.common.object_spec import parse_object_spec
    try:
        spec = parse_object_spec(description)
    except ValueError as e:
        raise HelmRunError(f"--description {description!r}: {e}") from None
    args = {**spec.args, "model": model_name}
    if deployment:
        args["model_deployment"] = model_name
    return f"{spec.class_name}:" + ",".join(f"{k}={v}" for k, v in args.items())


def run(args) -> list[str]:
    from helm.benchmark.config_registry import register_builtin_configs_from_helm_package, \
        register_configs_from_directory
    from helm.benchmark.executor import ExecutionSpec
    from helm.benchmark.presentation.run_entry import RunEntry
    from helm.benchmark.run import run_entries_to_run_specs
    from helm.benchmark.runner import set_benchmark_output_path
    from helm.common.authentication import Authentication
    from helm.common.hierarchical_logger import setup_default_logging

    from ..integrations import helm_config
    from ..integrations.helm_client import Engine, engine_namespace
    from ..integrations.helm_runner import FlexGenRunner

    if args.verbose >= 2:
        setup_default_logging()
    register_builtin_configs_from_helm_package()
    if os.path.isdir(args.local_path):
        register_configs_from_directory(args.local_path)
    entries = helm_config.config_entries(args.model, name=args.name, path=args.path, tokenizer=args.tokenizer)
    helm_config.register(entries)
    name = entries["model_deployments"][0]["name"]
    engine = Engine.install(name, engine_namespace(args))

    os.makedirs(args.output_path, exist_ok=True)
    set_benchmark_output_path(args.output_path)

    def specs(deployment):
        entry = RunEntry(description=with_model(args.description, name, deployment), priority=1, groups=None)
        return run_entries_to_run_specs([entry], max_eval_instances=args.max_eval_instances,
                                        num_train_trials=args.num_train_trials)
    try:
        try:
            run_specs = specs(False)
        except ValueError as e:   # a run spec with its own deployment (simple1): override that too
            if "model deployment" not in str(e):
                raise
            run_specs = specs(True)
    except Exception as e:   # unknown scenario names, bad arguments: HELM's message
        raise HelmRunError(f"--description {args.description!r}: {type(e).__name__}: {e}") from None
    if not run_specs:
        raise HelmRunError(f"--description {args.description!r} gives no HELM runs")

    spec = ExecutionSpec(url=None, auth=Authentication(""), local_path=args.local_path, parallelism=1)
    runner = FlexGenRunner(spec, args.output_path, args.suite, skip_instances=False, cache_instances=False,
                           cache_instances_only=False, skip_completed_runs=False, exit_on_error=True)
    if args.run_path:
        runner.runs_path = args.run_path
    before = dict(engine.stats)     # an engine kept from an earlier run in this process counts on
    t0 = time.time()
    runner.run_all(run_specs)
    wall = time.time() - t0
    run_dirs = [os.path.join(runner.runs_path, s.name) for s in run_specs]
    print(summary(run_dirs, {k: v - before[k] for k, v in engine.stats.items()}, wall))
    return run_dirs


def headline_stats(run_dir: str) -> dict:
    """{metric: mean} of the unperturbed evaluation-split stats HELM wrote."""
    with open(os.path.join(run_dir, "stats.json")) as f:
        stats = json.load(f)
    out = {}
    for s in stats:
        n = s["name"]
        if n["name"] in HEADLINE and n.get("split") in ("test", "valid") and "perturbation" not in n \
                and s.get("count"):
            out.setdefault(n["name"], s["sum"] / s["count"])
    return out


def summary(run_dirs, stats, wall: float) -> str:
    lines = []
    for d in run_dirs:
        metrics = headline_stats(d)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "(no headline metric)"
        lines.append(f"{os.path.basename(d)}: {shown}")
        lines.append(f"  run directory: {d}")
    tokens = stats["prompt_tokens"] + stats["completion_tokens"]
    sec = stats["seconds"]
    lines.append(f"requests: {stats['requests']}, prompt tokens: {stats['prompt_tokens']}, completion tokens: "
                 f"{stats['completion_tokens']}")
    lines.append(f"engine time: {sec:.3f} s, throughput (input + output): {tokens / max(sec, 1e-9):.3f} token/s, "
                 f"{stats['requests'] / max(sec, 1e-9):.3f} requests/s")
    helm = wall - sec - stats["load_seconds"]
    lines.append(f"total time: {wall:.3f} s (model loading {stats['load_seconds']:.3f} s); HELM's share of the "
                 f"rest (scenario, adapter, metrics, files): {100 * helm / max(wall - stats['load_seconds'], 1e-9):.1f}%")
    return "\n".join(lines)


def main(argv=None):
    from ..cli import main_errors
    from ..integrations.helm_runner import DatasetUnavailable
    args = build_parser().parse_args(argv)
    return main_errors(lambda: run(args), extra=(HelmRunError, DatasetUnavailable))


if __name__ == "__main__":
    main()
    sys.exit(0)
