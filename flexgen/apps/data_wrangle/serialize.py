"""Rows as text, the way "Can Foundation Models Wrangle Your Data?" writes them:
`attr: value. attr: value`, missing values as --nan_tok, each task's frame around it.

A row is a list of (attribute name, value) pairs in column order; value None is missing. Every
serialised example ends with the task's suffix and one space (stripped again when the prompt is
built), as in fm_data_tasks.
"""
from __future__ import annotations


def _value(v, nan_tok: str) -> str:
    return nan_tok if v is None else v.strip()


def _joiner(sep_tok: str) -> str:
    # "." joins as ". "; any other separator gets a space on both sides; "" joins with one space.
    return (sep_tok if sep_tok in ("", ".") else f" {sep_tok}") + " "


def serialize_row(fields, sep_tok: str = ".", nan_tok: str = "nan") -> str:
    return _joiner(sep_tok).join(f"{name}: {_value(v, nan_tok)}".lstrip() for name, v in fields)


def serialize_match_pair(fields_a, fields_b, suffix: str, prod_name: str = "Product", sep_tok: str = ".",
                         nan_tok: str = "nan") -> str:
    return (f"{prod_name} A is {serialize_row(fields_a, sep_tok, nan_tok)}."
            f" {prod_name} B is {serialize_row(fields_b, sep_tok, nan_tok)}.{suffix} ")


def serialize_imputation(fields, suffix: str, sep_tok: str = ".", nan_tok: str = "nan") -> str:
    tail = sep_tok if sep_tok in ("", ".") else f" {sep_tok}"
    return f"{serialize_row(fields, sep_tok, nan_tok)}{tail}{suffix} "


def serialize_spelling_error(col: str, value, suffix: str, sep_tok: str = ".", nan_tok: str = "nan") -> str:
    return f"Is there a x spelling error in {serialize_row([(col, value)], sep_tok, nan_tok)}{suffix} "


def serialize_error_detection(fields, col: str, value, suffix: str, sep_tok: str = ".", nan_tok: str = "nan") -> str:
    return (f"{serialize_row(fields, sep_tok, nan_tok)}\n\n"
            f"Is there an error in {serialize_row([(col, value)], sep_tok, nan_tok)}{suffix} ")


def serialize_schema_match(left: str, right: str, suffix: str) -> str:
    return f"A is {left}. B is {right}. {suffix} "
