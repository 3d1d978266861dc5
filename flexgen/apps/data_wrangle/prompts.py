"""Few-shot prompts: k demonstrations chosen by the sample method, then the example.

    prompt = (demonstrations + "\\n" + example text).strip()      [fm_data_tasks' query]
    with --add_task_instruction: instruction + " " + prompt

Demonstrations are `text + gold answer` (stripped), joined by a blank line, ending in "\\n":
- manual: the paper's hand-written prompt for the dataset (manual_prompts.json), keyed by an
  attribute's value for some datasets (DBLP-ACM by venue_A, Hospital by col_name);
- random: k training examples drawn with --seed (+ trial), the same for every example;
- validation_clusters: from an earlier run's validation predictions, the k examples nearest each
  other in sentence-embedding space whose labels differ and where one was answered wrongly
  (sentence-transformers, as in the paper).
"""
from __future__ import annotations

import json
import os
import random
import re
from functools import lru_cache

from .datasets import DatasetError

MANUAL_PROMPTS = os.path.join(os.path.dirname(__file__), "manual_prompts.json")
VALIDATION_MODEL = "sentence-transformers/sentence-t5-base"


@lru_cache(maxsize=1)
def manual_prompts() -> dict:
    with open(MANUAL_PROMPTS, encoding="utf-8") as f:
        return json.load(f)["prompts"]


def _norm_key(s) -> str:
    # The published tables are lowercased and tokenised ("acm trans . database syst ."): compare
    # keys without case and spaces so that untokenised values ("ACM Trans. Database Syst.") match.
    return re.sub(r"\s+", "", str(s).lower())


def manual_prompt(name: str, spec, example) -> str:
    """The paper's manual prompt for this example. An example whose sub-key value has no prompt
    (e.g. an empty venue) gets the dataset's first one; see manual_prompt_key."""
    prompts = manual_prompts()
    if name not in prompts:
        have = ", ".join(sorted(prompts))
        raise DatasetError(f"--sample_method manual: the paper has no manual prompt for {name} (it has: {have}); "
                           "use --sample_method random")
    p = prompts[name]
    if isinstance(p, str):
        return p
    return p[manual_prompt_key(name, spec, example)]


def manual_prompt_key(name: str, spec, example) -> str | None:
    p = manual_prompts().get(name)
    if not isinstance(p, dict):
        return None
    value = example.attrs.get(spec.subkey_attr)
    value = "nan" if value is None else value.strip()
    by_norm = {_norm_key(k): k for k in p}
    return by_norm.get(_norm_key(value), next(iter(p)))


def demonstrations(examples) -> str:
    return "\n\n".join((e.text + e.label_str).strip() for e in examples) + "\n"


def random_demonstrations(train, k: int, seed: int, class_balanced: bool = False) -> str:
    """k training examples drawn with this seed. class_balanced (Yes/No tasks): first cut the
    training set to the same number of examples per label, as fm_data_tasks does."""
    pool = list(train)
    if class_balanced:
        by_label = {}
        for e in pool:
            by_label.setdefault(e.label_str, []).append(e)
        if len(by_label) > 1:
            n = min(len(v) for v in by_label.values())
            rng = random.Random(42)
            pool = sorted((x for v in by_label.values() for x in rng.sample(v, n)), key=lambda e: e.id)
    if k > len(pool):
        raise DatasetError(f"--k {k}: the training split has only {len(pool)} examples to draw from")
    return demonstrations(random.Random(seed).sample(pool, k))


def hard_pairs(embeddings, labels, wrong, k: int) -> list:
    """Indices of up to k examples, taken from the most similar pairs (cosine similarity, each
    row's k nearest others) whose labels differ and of which at least one was answered wrongly:
    the selection of fm_data_tasks' get_hard_samples."""
    import numpy as np
    e = np.asarray(embeddings, dtype=np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    sim = np.triu(e @ e.T)
    cands = []
    for i in range(len(e)):
        order = np.argsort(sim[i], kind="stable")[::-1]
        for j in order[:k + 1]:
            if j != i:
                cands.append((float(sim[i, j]), i, int(j)))
    cands.sort(key=lambda c: -c[0])   # stable: ties keep row order
    picked = []
    for _, i, j in cands:
        if (i in wrong or j in wrong) and labels[i] != labels[j]:
            for x in (i, j):
                if x not in picked:
                    picked.append(x)
    return picked[:k]


def sentence_embedder(model_name: str = VALIDATION_MODEL):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise DatasetError("--sample_method validation_clusters needs sentence-transformers "
                           "(pip install sentence-transformers)") from None
    try:
        model = SentenceTransformer(model_name)
    except Exception as e:
        raise DatasetError(f"cannot load the sentence-transformers model {model_name}: {e}") from None
    return lambda texts: model.encode(list(texts))


def validation_demonstrations(validation, predictions_path: str, k: int, task: str, seed: int,
                              embed=None) -> str:
    """Demonstrations from an earlier run on the validation split (its predictions JSONL)."""
    if not predictions_path:
        raise DatasetError("--sample_method validation_clusters needs --validation_path: the predictions "
                           "JSONL of an earlier run on the validation split (without --do_test)")
    try:
        with open(predictions_path, encoding="utf-8") as f:
            preds = {}
            for n, line in enumerate(f, start=1):
                if line.strip():
                    obj = json.loads(line)
                    preds[obj["id"]] = obj
    except OSError as e:
        raise DatasetError(f"cannot read --validation_path {predictions_path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError):
        raise DatasetError(f"--validation_path {predictions_path} line {n}: not a predictions line") from None
    rows = [e for e in validation if e.id in preds]
    if not rows:
        raise DatasetError(f"--validation_path {predictions_path}: no prediction for any validation example")
    embed = embed or sentence_embedder()
    labels = [e.label_str.strip().lower() for e in rows]
    wrong = {i for i, e in enumerate(rows) if not preds[e.id].get("correct", False)}
    picked = [rows[i] for i in hard_pairs(embed([e.text for e in rows]), labels, wrong, k)]
    if task != "data_imputation" and picked and len({e.label_str for e in picked}) == 1:
        # All of one Yes/No class: swap one for a random example of the other class.
        rng = random.Random(seed)
        others = [e for e in rows if e.label_str != picked[0].label_str]
        if others:
            picked[rng.randrange(len(picked))] = rng.choice(others)
    return demonstrations(picked)


def build_prompt(demos: str, example, instruction: str | None = None) -> str:
    query = (demos + "\n" + example.text).strip()
    return f"{instruction} {query}" if instruction is not None else query
