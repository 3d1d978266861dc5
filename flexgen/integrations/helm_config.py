"""HELM configuration entries for a FlexGen model: a model deployment whose client is
FlexGenClient, its model metadata, and a tokenizer config on the model's own tokenizer.

    python3 -m flexgen.integrations.helm_config --model smollm2-135m --flags "--percent 100 0 100 0 100 0" \\
        --out prod_env
    helm-run --run-entries "synthetic_reasoning:mode=pattern_match,model=flexgen/smollm2-135m" \\
        --max-eval-instances 10 --suite demo

writes (or updates) model_deployments.yaml, model_metadata.yaml and tokenizer_configs.yaml in --out,
HELM's --local-path (default prod_env), keeping the other entries there. helm_run registers the
same entries in its own process, so both ways run the same deployment.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import yaml

FILES = {"model_deployments": "model_deployments.yaml", "model_metadata": "model_metadata.yaml",
         "tokenizer_configs": "tokenizer_configs.yaml"}


def deployment_name(model: str) -> str:
    """flexgen/<short name>: facebook/opt-30b -> flexgen/opt-30b, a .gguf file -> its stem."""
    base = os.path.basename(os.path.normpath(os.path.expanduser(model)))
    if base.lower().endswith(".gguf"):
        base = base[:-len(".gguf")]
    return f"flexgen/{base}"


def config_entries(model: str, flags: str = "", name: str | None = None, path: str | None = None,
                   tokenizer: str | None = None) -> dict:
    """{section: [entry]} for the three HELM config files. Reads the model's config and tokenizer
    (offline) for its context length and special tokens."""
    from ..models.registry import resolve_model
    from .helm_client import model_tokenizer, parse_engine_flags
    name = name or deployment_name(model)
    if path is None:
        path = parse_engine_flags(model, flags).path
    info = resolve_model(model).family.info()
    tok = model_tokenizer(model, path, tokenizer)
    tok_args = {"model": model}
    if path:
        tok_args["path"] = path
    if tokenizer:
        tok_args["tokenizer"] = tokenizer
    client_args = {"model": model, "flags": flags}
    if path and "--path" not in flags.split():
        client_args["flags"] = f"{flags} --path {path}".strip()
    # HELM's window service adds the prefix token to what it counts; the tokenizer adds it itself.
    adds_bos = tok.bos_token_id is not None and tok.encode("a")[:1] == [tok.bos_token_id]
    prefix = tok.bos_token if adds_bos else ""
    return {
        "model_deployments": [{
            "name": name, "model_name": name, "tokenizer_name": name,
            # HELM counts a prompt without the BOS token the engine's tokenizer adds: keep it room
            "max_sequence_length": int(info.max_seq_len) - int(adds_bos),
            "client_spec": {"class_name": "flexgen.integrations.helm_client.FlexGenClient", "args": client_args},
        }],
        "model_metadata": [{
            "name": name, "display_name": f"{info.name} (FlexGen)",
            "description": f"{info.name} run by FlexGen (offloading engine)", "creator_organization_name": "FlexGen",
            "access": "open", "release_date": datetime.date(2023, 3, 13),
            "tags": ["TEXT_MODEL_TAG", "FULL_FUNCTIONALITY_TEXT_MODEL_TAG"],
        }],
        "tokenizer_configs": [{
            "name": name, "end_of_text_token": tok.eos_token or "", "prefix_token": prefix or "",
            "tokenizer_spec": {"class_name": "flexgen.integrations.helm_client.FlexGenTokenizer", "args": tok_args},
        }],
    }


def register(entries: dict):
    """Register the entries with HELM in this process, through the very files and reader that
    helm-run's --local-path uses."""
    import tempfile
    from helm.benchmark.config_registry import register_configs_from_directory
    with tempfile.TemporaryDirectory(prefix="flexgen-helm-") as d:
        write(entries, d)
        register_configs_from_directory(d)


_TOP_KEY = {"model_deployments": "model_deployments", "model_metadata": "models",
            "tokenizer_configs": "tokenizer_configs"}


def write(entries: dict, out_dir: str) -> list[str]:
    """Merge the entries into out_dir's three files (an entry of the same name is replaced)."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for section, fname in FILES.items():
        p = os.path.join(out_dir, fname)
        key = _TOP_KEY[section]
        doc = {}
        if os.path.isfile(p):
            with open(p) as f:
                doc = yaml.safe_load(f) or {}
        new_names = {e["name"] for e in entries[section]}
        kept = [e for e in doc.get(key) or [] if e.get("name") not in new_names]
        doc[key] = kept + entries[section]
        with open(p, "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
        written.append(p)
    return written


def main(argv=None):
    from ..cli import main_errors
    parser = argparse.ArgumentParser(prog="python3 -m flexgen.integrations.helm_config", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model name, HF checkpoint directory or .gguf file")
    parser.add_argument("--flags", default="", help='FlexGen flags for the engine, e.g. "--percent 100 0 100 0 100 0 '
                                                    '--gpu-batch-size 8"')
    parser.add_argument("--name", default=None, help="HELM model name (default flexgen/<model's short name>)")
    parser.add_argument("--path", default=None, help="FlexGen weight cache root")
    parser.add_argument("--tokenizer", default=None, help="stand-in tokenizer source (dummy weights)")
    parser.add_argument("--out", default="prod_env", help="HELM's --local-path directory")
    args = parser.parse_args(argv)

    def run():
        from .helm_client import parse_engine_flags
        parse_engine_flags(args.model, args.flags)   # bad flags fail here, not inside helm-run
        entries = config_entries(args.model, args.flags, args.name, args.path, args.tokenizer)
        for p in write(entries, args.out):
            print(f"wrote {p}")
        name = entries["model_deployments"][0]["name"]
        print(f"run with: helm-run --local-path {args.out} --run-entries \"<scenario>,model={name}\" "
              f"--max-eval-instances N --suite S")
    main_errors(run)


if __name__ == "__main__":
    sys.exit(main())
