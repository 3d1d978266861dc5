"""`prepare`: real data-wrangling datasets with gold labels, offline, in the fm_data_tasks layout.

    python3 -m flexgen.apps.data_wrangle prepare --out data/datasets [--sdist py-entitymatching-0.4.2.tar.gz]

The fm_data_tasks archive is not on a package registry, but the source distribution of
py-entitymatching 0.4.2 (BSD-3-Clause, UW-Madison) ships labelled candidate pairs of two of its
entity-matching benchmarks (py_entitymatching/datasets/). Without --sdist it is fetched with
`pip download --no-deps --no-binary :all: --no-build-isolation py-entitymatching==0.4.2`.

- entity_matching/structured/Fodors-Zagats: tableA = end-to-end/restaurants/fodors.csv, tableB =
  zagats.csv (id,name,addr,city,phone,type), pairs from lbl_restnt_wf1.csv (450 pairs, 112 gold).
- entity_matching/structured/DBLP-ACM: tableA = DBLP.csv, tableB = ACM.csv (id,title,authors,venue,
  year; DBLP's years "1999.0" written as "1999"), pairs from dblp_acm_demo_labels.csv (415 pairs).
- data_imputation/Restaurant: every row of fodors.csv and zagats.csv (ids "fodors-534",
  "zagats-1"), city to impute. Matching restaurants are in both tables, so a test row's twin can
  be in train, as with the published Restaurant set, which is built from the same tables.

Split: 60 / 20 / 20 % into train / valid / test with random.Random(--seed, default 0); the pair
sets are split per label (stratified) so each split keeps the label ratio; within a split rows
keep their source order. Each directory gets a SOURCE.md saying where its files came from.
"""
from __future__ import annotations

import csv
import io
import os
import random
import subprocess
import sys
import tarfile
import tempfile

from .datasets import DatasetError

SDIST = "py-entitymatching==0.4.2"
BASE = "py_entitymatching/datasets/"
FRACTIONS = (0.6, 0.2, 0.2)


def _download(dest: str, log) -> str:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
           SDIST, "-d", dest]
    log("running: " + " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    files = [f for f in os.listdir(dest) if f.endswith(".tar.gz")]
    if r.returncode != 0 or not files:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        raise DatasetError(f"pip download {SDIST} failed ({tail[0]}); download the sdist yourself and pass --sdist")
    return os.path.join(dest, files[0])


class _Source:
    """Files of the sdist, from the .tar.gz or an unpacked directory."""

    def __init__(self, path: str):
        self.path = path
        self.tar = None
        if os.path.isdir(path):
            return
        try:
            self.tar = tarfile.open(path, "r:gz")
        except (OSError, tarfile.TarError) as e:
            raise DatasetError(f"--sdist {path}: not a readable .tar.gz ({e})") from None
        self.names = {n.split("/", 1)[1]: n for n in self.tar.getnames() if "/" in n}

    def read(self, rel: str) -> list:
        rel = BASE + rel
        if self.tar is None:
            cands = [os.path.join(self.path, rel), os.path.join(self.path, rel.split("/", 1)[1])]
            for p in cands:
                if os.path.isfile(p):
                    with open(p, "rb") as f:
                        data = f.read()
                    break
            else:
                raise DatasetError(f"--sdist {self.path}: no {rel} (is this py-entitymatching 0.4.2?)")
        else:
            if rel not in self.names:
                raise DatasetError(f"--sdist {self.path}: no {rel} (is this py-entitymatching 0.4.2?)")
            data = self.tar.extractfile(self.names[rel]).read()
        return list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))


def _write(path: str, columns, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([r[c] for c in columns])


def split_indices(n_or_labels, seed: int, stratify: bool):
    """(train, valid, test) index lists: each label group (or everything) shuffled with the seed
    and cut 60/20/20; indices sorted within each split."""
    labels = n_or_labels if stratify else [0] * n_or_labels
    rng = random.Random(seed)
    out = ([], [], [])
    for lab in sorted(set(labels)):
        idx = [i for i, x in enumerate(labels) if x == lab]
        rng.shuffle(idx)
        a = round(len(idx) * FRACTIONS[0])
        b = a + round(len(idx) * FRACTIONS[1])
        for part, sl in zip(out, (idx[:a], idx[a:b], idx[b:])):
            part.extend(sl)
    return tuple(sorted(p) for p in out)


def _pairs_dataset(out_dir, name, table_a, table_b, pairs, seed, cols, source_note, limit=None):
    d = os.path.join(out_dir, "entity_matching", "structured", name)
    os.makedirs(d, exist_ok=True)
    splits = split_indices([p["label"] for p in pairs], seed, stratify=True)
    if limit:
        splits = tuple(s[:n] for s, n in zip(splits, limit))
    used = {"A": set(), "B": set()}
    for fname, idx in zip(("train.csv", "valid.csv", "test.csv"), splits):
        rows = [pairs[i] for i in idx]
        _write(os.path.join(d, fname), ["ltable_id", "rtable_id", "label"], rows)
        used["A"].update(r["ltable_id"] for r in rows)
        used["B"].update(r["rtable_id"] for r in rows)
    for side, table in (("A", table_a), ("B", table_b)):
        rows = [r for r in table if not limit or r["id"] in used[side]]
        _write(os.path.join(d, f"table{side}.csv"), ["id"] + cols, rows)
    counts = [len(s) for s in splits]
    pos = [sum(pairs[i]["label"] == "1" for i in s) for s in splits]
    with open(os.path.join(d, "SOURCE.md"), "w") as f:
        f.write(f"# {name}\n\n{source_note}\n\nSplit (stratified by label, random.Random({seed}), 60/20/20 %): "
                f"train {counts[0]} ({pos[0]} matches), valid {counts[1]} ({pos[1]}), test {counts[2]} ({pos[2]})"
                + (f"; cut to the first {'/'.join(map(str, limit))} of train/valid/test, tables to the rows they use" if limit else "")
                + ".\nMade by `python3 -m flexgen.apps.data_wrangle prepare`.\n")
    return d, counts


def prepare(out_dir: str, sdist: str | None = None, seed: int = 0, limit=None, log=print) -> dict:
    """Write the three datasets under out_dir; returns {dataset dir: (train, valid, test) sizes}."""
    with tempfile.TemporaryDirectory(prefix="flexgen_pyem_") as tmp:
        src = _Source(sdist or _download(tmp, log))
        fodors = src.read("end-to-end/restaurants/fodors.csv")
        zagats = src.read("end-to-end/restaurants/zagats.csv")
        rest_pairs = src.read("end-to-end/restaurants/lbl_restnt_wf1.csv")
        dblp = src.read("DBLP.csv")
        acm = src.read("ACM.csv")
        dblp_pairs = src.read("dblp_acm_demo_labels.csv")
    done = {}
    rcols = ["name", "addr", "city", "phone", "type"]
    pairs = [{"ltable_id": p["ltable_id"], "rtable_id": p["rtable_id"], "label": p["gold"]} for p in rest_pairs]
    note = ("Fodors-Zagats restaurants from the py-entitymatching 0.4.2 sdist (BSD-3-Clause): tableA = "
            "py_entitymatching/datasets/end-to-end/restaurants/fodors.csv, tableB = zagats.csv, labelled pairs = "
            "lbl_restnt_wf1.csv (ltable_id, rtable_id, gold).")
    d, c = _pairs_dataset(out_dir, "Fodors-Zagats", fodors, zagats, pairs, seed, rcols, note, limit)
    done[d] = c

    for r in dblp:   # DBLP writes years as floats ("1999.0")
        y = r["year"].strip()
        r["year"] = str(int(float(y))) if y else ""
    pairs = [{"ltable_id": p["ltable.id"], "rtable_id": p["rtable.id"], "label": p["gold"]} for p in dblp_pairs]
    note = ("DBLP-ACM from the py-entitymatching 0.4.2 sdist (BSD-3-Clause): tableA = py_entitymatching/datasets/"
            "DBLP.csv (years written as integers), tableB = ACM.csv, labelled pairs = dblp_acm_demo_labels.csv "
            "(ltable.id, rtable.id, gold).")
    d, c = _pairs_dataset(out_dir, "DBLP-ACM", dblp, acm, pairs, seed, ["title", "authors", "venue", "year"], note,
                          limit)
    done[d] = c

    rows = [{**r, "id": f"fodors-{r['id']}"} for r in fodors] + [{**r, "id": f"zagats-{r['id']}"} for r in zagats]
    rows = [r for r in rows if r["city"].strip()]
    d = os.path.join(out_dir, "data_imputation", "Restaurant")
    os.makedirs(d, exist_ok=True)
    splits = split_indices(len(rows), seed, stratify=False)
    if limit:
        splits = tuple(s[:n] for s, n in zip(splits, limit))
    for fname, idx in zip(("train.csv", "valid.csv", "test.csv"), splits):
        _write(os.path.join(d, fname), ["id"] + rcols, [rows[i] for i in idx])
    counts = [len(s) for s in splits]
    with open(os.path.join(d, "SOURCE.md"), "w") as f:
        f.write("# Restaurant (city imputation)\n\nEvery row of fodors.csv and zagats.csv from py_entitymatching/"
                "datasets/end-to-end/restaurants/ in the py-entitymatching 0.4.2 sdist (BSD-3-Clause), ids prefixed "
                "with the table's name; the city is imputed. Matching restaurants are in both tables.\n\n"
                f"Split (random.Random({seed}), 60/20/20 %): train {counts[0]}, valid {counts[1]}, test {counts[2]}"
                + (f"; cut to the first {'/'.join(map(str, limit))} of train/valid/test" if limit else "")
                + ".\nMade by `python3 -m flexgen.apps.data_wrangle prepare`.\n")
    done[d] = counts
    return done
