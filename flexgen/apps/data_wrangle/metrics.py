"""Answers and scores, as fm_data_tasks computes them.

The completion is cut at the stop token ("\\n") by generation. Both it and the gold answer are
stripped and lowercased. Yes/No tasks (matching, error detection, schema matching) read the
leading word, so "No, Product A class: 425 ..." (the style of the Fodors-Zagats manual prompt)
is "no"; imputation compares the whole value. Counting follows fm_data_tasks: a Yes example is a
true positive when answered correctly, else a false negative; a No example is a true negative
when answered correctly, else a false positive (also when the answer is neither Yes nor No).
F1 = 2PR / (P + R) (fm_data_tasks divides by max(1, P + R), which under-reports F1 when P + R < 1).
"""
from __future__ import annotations

import re

YES_NO_TASKS = ("entity_matching", "error_detection", "error_detection_spelling", "schema_matching")


def normalise(text: str) -> str:
    return text.strip().lower()


def parse_answer(completion: str, task: str) -> str:
    text = normalise(completion.split("\n")[0] if completion.strip() else completion)
    if task in YES_NO_TASKS:
        m = re.match(r"(yes|no)\b", text)
        return m.group(1) if m else text
    return text


def is_correct(parsed: str, gold: str) -> bool:
    return parsed == normalise(gold)


def compute_metrics(records, task: str) -> dict:
    """records: dicts with "parsed" and "gold". Returns precision, recall, F1 (Yes/No tasks) and
    accuracy, with the counts."""
    tp = tn = fp = fn = correct = 0
    for r in records:
        gold = normalise(r["gold"])
        ok = is_correct(r["parsed"], r["gold"])
        correct += ok
        if gold == "yes":
            tp, fn = tp + ok, fn + (not ok)
        elif gold == "no":
            tn, fp = tn + ok, fp + (not ok)
    n = len(records)
    out = {"examples": n, "accuracy": correct / n if n else 0.0, "correct": correct}
    if task in YES_NO_TASKS:
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        out.update(precision=p, recall=r, f1=2 * p * r / (p + r) if p + r else 0.0, tp=tp, fp=fp, tn=tn, fn=fn)
    return out
