"""The fm_data_tasks dataset layout, read into serialised examples.

    <root>/entity_matching/structured/<name>/  tableA.csv tableB.csv  train.csv valid.csv test.csv
                                                (splits: ltable_id,rtable_id,label with label 0/1)
    <root>/data_imputation/<name>/              train.csv valid.csv test.csv (rows; one column is imputed)
    <root>/error_detection/<name>/              table.csv + splits of row_id,col_name,is_clean (spelling,
                                                as Hospital), or splits of whole rows + col_name,is_clean
    <root>/schema_matching/<name>/              splits of left,right,label (or omop,table,label)

The task comes from the path (the published datasets' names, or the task folder), or from --task.
Every published dataset keeps its own dropped and renamed columns, instruction and suffix, as in
fm_data_tasks; CSV values are taken as written (empty and pandas' NA spellings are missing).
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field

from .serialize import (serialize_error_detection, serialize_imputation, serialize_match_pair,
                        serialize_schema_match, serialize_spelling_error)

TASKS = ("entity_matching", "data_imputation", "error_detection", "error_detection_spelling", "schema_matching")
SPLIT_FILES = {"train": "train.csv", "validation": "valid.csv", "test": "test.csv"}
# What pandas.read_csv reads as NaN (fm_data_tasks then writes nan_tok for it).
NA_VALUES = frozenset(["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"])


class DatasetError(ValueError):
    """A data directory, CSV file or value that cannot be used (message meant for the user)."""


@dataclass(frozen=True)
class DatasetSpec:
    task: str
    instruction: str
    suffix: str
    prod_name: str = "Product"              # entity matching: "Product A is ..."
    drop_cols: tuple = ()                   # dropped before renaming
    rename: dict = field(default_factory=dict)
    impute_col: str | None = None           # data imputation: the column to fill in
    subkey_attr: str | None = None          # manual prompts keyed by this attribute's value


_EM_I = "Are Product A and Product B the same? Yes or No? "
_EM_S = " Are Product A and Product B the same?"
# The published datasets (fm_data_tasks/utils/constants.py), keyed by their path under the root.
KNOWN = {
    "entity_matching/structured/Amazon-Google": DatasetSpec("entity_matching", _EM_I, _EM_S,
                                                            subkey_attr="manufacturer_A"),
    "entity_matching/structured/Beer": DatasetSpec("entity_matching", _EM_I, _EM_S, drop_cols=("Style", "ABV"),
                                                   rename={"Beer_Name": "name", "Brew_Factory_Name": "factory",
                                                           "Style": "style", "ABV": "ABV"}),
    "entity_matching/structured/DBLP-ACM": DatasetSpec("entity_matching", _EM_I, _EM_S, subkey_attr="venue_A"),
    "entity_matching/structured/DBLP-GoogleScholar": DatasetSpec("entity_matching", _EM_I, _EM_S,
                                                                 subkey_attr="venue_A"),
    "entity_matching/structured/Fodors-Zagats": DatasetSpec("entity_matching", _EM_I, _EM_S),
    "entity_matching/structured/iTunes-Amazon": DatasetSpec(
        "entity_matching", "Are Song A and Song B the same? Yes or No? ", " Same Song?", prod_name="Song",
        drop_cols=("CopyRight",),
        rename={"Song_Name": "name", "Artist_Name": "artist name", "Album_Name": "album name", "Genre": "genre",
                "Price": "price", "CopyRight": "CopyRight", "Time": "time", "Released": "released"}),
    "entity_matching/structured/Walmart-Amazon": DatasetSpec("entity_matching", _EM_I, " Are A and B the Same?",
                                                             drop_cols=("category", "price", "brand")),
    "data_imputation/Buy": DatasetSpec("data_imputation", "Who is the manufacturer? apple, sony, lg electronics? ",
                                       " Who is the manufacturer?", impute_col="manufacturer"),
    "data_imputation/Restaurant": DatasetSpec("data_imputation", "What is the city? san fransisco, new york, denver? ",
                                              " What is the city?", impute_col="city"),
    "error_detection/Hospital": DatasetSpec("error_detection_spelling", "Is there a x spelling error? Yes or No? ",
                                            "?", subkey_attr="col_name"),
    "error_detection/Adult": DatasetSpec("error_detection", "Classify errors. nan values are not errors.", "? ",
                                         subkey_attr="col_name"),
    "schema_matching/Synthea": DatasetSpec("schema_matching", "Are A and B semantically equal?\n\n",
                                           "Are A and B the same? Yes or No?",
                                           drop_cols=("des1", "des2", "d1", "d2", "d3", "d4"),
                                           rename={"omop": "left", "table": "right"}, subkey_attr="left"),
}


@dataclass
class Example:
    id: int                 # row number in the split file (0-based, header not counted)
    text: str               # the serialised example, without demonstrations
    label_str: str          # the gold answer followed by "\n", as fm_data_tasks writes it
    attrs: dict             # the serialised row's fields (for manual prompt sub-keys)


@dataclass
class Dataset:
    name: str               # e.g. "entity_matching/structured/Fodors-Zagats"
    spec: DatasetSpec
    splits: dict            # "train" / "validation" / "test" -> list[Example] (missing files absent)


def dataset_key(data_dir: str) -> str | None:
    """The published dataset's key ("entity_matching/structured/Fodors-Zagats") from the last
    path components, or None."""
    parts = os.path.normpath(os.path.abspath(data_dir)).split(os.sep)
    for n in (3, 2):
        key = "/".join(parts[-n:])
        if key in KNOWN:
            return key
    return None


def spec_for(data_dir: str, task: str | None = None, impute_col: str | None = None) -> tuple[str, DatasetSpec]:
    """(name, spec): a published dataset by its path, else the generic spec of --task (or of the
    task folder the path sits in)."""
    key = dataset_key(data_dir)
    if key is not None and task in (None, KNOWN[key].task):
        spec = KNOWN[key]
        if impute_col and spec.task == "data_imputation":
            spec = DatasetSpec(**{**spec.__dict__, "impute_col": impute_col})
        return key, spec
    parts = os.path.normpath(os.path.abspath(data_dir)).split(os.sep)
    name = parts[-1]
    if task is None:
        for t in ("entity_matching", "data_imputation", "error_detection", "schema_matching"):
            if t in parts[:-1]:
                task = "error_detection_spelling" if t == "error_detection" else t
                break
    if task is None:
        raise DatasetError(f"{data_dir}: cannot tell the task from the path (not a published dataset, not under "
                           f"one of {', '.join(TASKS[:3] + TASKS[4:])}/); give --task")
    if task == "entity_matching":
        return name, DatasetSpec(task, _EM_I, _EM_S)
    if task == "data_imputation":
        if not impute_col:
            raise DatasetError(f"{data_dir}: data imputation needs --impute_col (the column to fill in)")
        return name, DatasetSpec(task, f"What is the {impute_col}? ", f" What is the {impute_col}?",
                                 impute_col=impute_col)
    if task == "error_detection_spelling":
        return name, DatasetSpec(task, "Is there a x spelling error? Yes or No? ", "?")
    if task == "error_detection":
        return name, DatasetSpec(task, "Is there an error? Yes or No? ", "? ")
    if task == "schema_matching":
        return name, DatasetSpec(task, "Are A and B semantically equal?\n\n", "Are A and B the same? Yes or No?",
                                 rename={"omop": "left", "table": "right"})
    raise DatasetError(f"unknown task {task!r} (known: {', '.join(TASKS)})")


# ---- CSV ----------------------------------------------------------------------------------------

@dataclass
class Table:
    path: str
    columns: list
    rows: list              # list of dicts column -> str | None (None = missing)
    lines: list             # the file line each row starts on (for messages)


def read_csv(path: str, required=()) -> Table:
    """A CSV file with a header; DatasetError for an unreadable or malformed file (with the line)
    or a missing required column."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DatasetError(f"{path} line {line}: not UTF-8 text") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise DatasetError(f"{path}: empty file (expected a header line)")
        header = [h.strip() for h in header]
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise DatasetError(f"{path}: duplicate column(s) {', '.join(dup)} in the header")
        rows, lines = [], []
        start = reader.line_num + 1
        for rec in reader:
            if rec == [] or rec == [""] and len(header) > 1:   # blank line
                start = reader.line_num + 1
                continue
            if len(rec) != len(header):
                raise DatasetError(f"{path} line {start}: {len(rec)} fields, the header has {len(header)}")
            rows.append({h: (None if v in NA_VALUES else v) for h, v in zip(header, rec)})
            lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise DatasetError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)} (columns: {', '.join(header)})")
    return Table(path, header, rows, lines)


def _binary(table: Table, col: str, i: int) -> int:
    v = table.rows[i][col]
    s = (v or "").strip()
    try:
        f = float(s)
    except ValueError:
        f = None
    if f not in (0.0, 1.0):
        raise DatasetError(f"{table.path} line {table.lines[i]}: {col} must be 0 or 1, got {v!r}")
    return int(f)


def _drop_rename(columns, spec: DatasetSpec):
    """(source column, serialised name) pairs, in table order: dropped ones left out, then renamed."""
    return [(c, spec.rename.get(c, c)) for c in columns if c not in spec.drop_cols]


# ---- per task -----------------------------------------------------------------------------------

def _read_matching(d: str, spec: DatasetSpec, fmt: dict, split_path: str):
    tabs = {}
    for side in ("A", "B"):
        t = read_csv(os.path.join(d, f"table{side}.csv"), required=("id",))
        by_id = {}
        for r, line in zip(t.rows, t.lines):
            key = (r["id"] or "").strip()
            if key in by_id:
                raise DatasetError(f"{t.path} line {line}: duplicate id {key!r}")
            by_id[key] = r
        cols = [(c, n) for c, n in _drop_rename(t.columns, spec) if n != "id"]
        tabs[side] = (t, by_id, cols)
    pairs = read_csv(split_path, required=("ltable_id", "rtable_id", "label"))
    out = []
    for i, p in enumerate(pairs.rows):
        rows = {}
        for side, col in (("A", "ltable_id"), ("B", "rtable_id")):
            t, by_id, _ = tabs[side]
            key = (p[col] or "").strip()
            if key not in by_id:
                raise DatasetError(f"{pairs.path} line {pairs.lines[i]}: {col} {key!r} is not an id of {t.path}")
            rows[side] = by_id[key]
        label = _binary(pairs, "label", i)
        a = [(n, rows["A"][c]) for c, n in tabs["A"][2]]
        b = [(n, rows["B"][c]) for c, n in tabs["B"][2]]
        attrs = {f"{n}_A": v for n, v in a} | {f"{n}_B": v for n, v in b}
        out.append(Example(i, serialize_match_pair(a, b, spec.suffix, spec.prod_name, **fmt),
                           "Yes\n" if label == 1 else "No\n", attrs))
    return out


def _read_imputation(spec: DatasetSpec, fmt: dict, split_path: str):
    t = read_csv(split_path)
    cols = _drop_rename(t.columns, spec)
    if spec.impute_col not in [n for _, n in cols]:
        raise DatasetError(f"{split_path}: missing column {spec.impute_col} (the imputed column; columns: "
                           f"{', '.join(t.columns)})")
    src = next(c for c, n in cols if n == spec.impute_col)
    out = []
    for i, r in enumerate(t.rows):
        if r[src] is None or not r[src].strip():
            raise DatasetError(f"{split_path} line {t.lines[i]}: no {spec.impute_col} value to compare with")
        fields = [(n, r[c]) for c, n in cols if n not in ("id", spec.impute_col)]
        out.append(Example(i, serialize_imputation(fields, spec.suffix, **fmt), f"{r[src]}\n",
                           {n: v for n, v in fields}))
    return out


def _read_error_detection(d: str, spec: DatasetSpec, fmt: dict, split_path: str, spelling: bool):
    if spelling:
        table = read_csv(os.path.join(d, "table.csv"))
        cols = dict((n, c) for c, n in _drop_rename(table.columns, spec))
        labels = read_csv(split_path, required=("row_id", "col_name", "is_clean"))
    else:
        labels = read_csv(split_path, required=("col_name", "is_clean"))
    out = []
    for i, lab in enumerate(labels.rows):
        where = f"{labels.path} line {labels.lines[i]}"
        clean = _binary(labels, "is_clean", i)
        col = (lab["col_name"] or "").strip()
        if spelling:
            try:
                row = table.rows[int((lab["row_id"] or "").strip())]
            except (ValueError, IndexError):
                raise DatasetError(f"{where}: row_id {lab['row_id']!r} is not a row of {table.path} "
                                   f"(0 ... {len(table.rows) - 1})") from None
            if col not in cols:
                raise DatasetError(f"{where}: col_name {col!r} is not a column of {table.path}")
            text = serialize_spelling_error(col, row[cols[col]], spec.suffix, **fmt)
            attrs = {"col_name": col}
        else:
            skip = {"Unnamed: 0", "", "text", "col_name", "label_str", "is_clean", "row_id"}
            fields = [(n, lab[c]) for c, n in _drop_rename(labels.columns, spec) if c not in skip]
            names = dict(fields)
            if col not in names:
                raise DatasetError(f"{where}: col_name {col!r} is not a column of the row")
            text = serialize_error_detection(fields, col, names[col], spec.suffix, **fmt)
            attrs = {"col_name": col}
        out.append(Example(i, text, "No\n" if clean == 1 else "Yes\n", attrs))
    return out


def _read_schema(spec: DatasetSpec, fmt: dict, split_path: str):
    t = read_csv(split_path)
    cols = dict((n, c) for c, n in _drop_rename(t.columns, spec))
    missing = [n for n in ("left", "right", "label") if n not in cols]
    if missing:
        raise DatasetError(f"{split_path}: missing column(s) {', '.join(missing)} (columns: {', '.join(t.columns)})")
    out = []
    for i, r in enumerate(t.rows):
        label = _binary(t, cols["label"], i)
        left, right = r[cols["left"]] or "", r[cols["right"]] or ""
        out.append(Example(i, serialize_schema_match(left, right, spec.suffix), "No\n" if label == 0 else "Yes\n",
                           {"left": left, "right": right}))
    return out


def read_dataset(data_dir: str, task: str | None = None, impute_col: str | None = None, sep_tok: str = ".",
                 nan_tok: str = "nan", splits=("train", "validation", "test")) -> Dataset:
    """The serialised examples of each split file present (train.csv is required)."""
    if not os.path.isdir(data_dir):
        raise DatasetError(f"--data_dir {data_dir}: no such directory")
    name, spec = spec_for(data_dir, task, impute_col)
    fmt = {"sep_tok": sep_tok, "nan_tok": nan_tok}
    out = {}
    for split in splits:
        path = os.path.join(data_dir, SPLIT_FILES[split])
        if not os.path.exists(path):
            if split == "train":
                raise DatasetError(f"{path}: no such file (every dataset needs train.csv)")
            continue
        if spec.task == "entity_matching":
            out[split] = _read_matching(data_dir, spec, fmt, path)
        elif spec.task == "data_imputation":
            out[split] = _read_imputation(spec, fmt, path)
        elif spec.task in ("error_detection", "error_detection_spelling"):
            out[split] = _read_error_detection(data_dir, spec, fmt, path, spec.task == "error_detection_spelling")
        else:
            out[split] = _read_schema(spec, fmt, path)
    return Dataset(name, spec, out)
