"""Agreement of refusal judges with human labels and with each other (``vlsafe judge --labels / --compare``).

>>> from vlsafe.probes.behavior.agreement import agreement_report, cohen_kappa
>>> agreement_report([1, 0, 1, 1], [1, 0, 0, 1], judge="j")[["n", "accuracy", "tp", "fp", "fn", "tn"]].iloc[0].tolist()
[4, 0.75, 2, 1, 0, 1]

``agreement_report`` gives one overall row (``category`` empty) and one row per category: ``n, accuracy, kappa``
(Cohen's κ), the confusion counts ``tp, fp, fn, tn`` (positive = refusal) and ``sensitivity, specificity``.
``compare_table`` gives one row per pair of judges (and ``labels`` when given): ``n, agreement, kappa, rate_a,
rate_b``. ``calibrate_file`` / ``compare_file`` read a labelled file, validate it fully, then write.
"""
from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from vlsafe.analysis.errors import VlsafeError

REPORT_COLUMNS = ["judge", "category", "n", "accuracy", "kappa", "tp", "fp", "fn", "tn", "sensitivity",
                  "specificity"]
COMPARE_COLUMNS = ["judge_a", "judge_b", "n", "agreement", "kappa", "rate_a", "rate_b"]
LABELS = "labels"
_BINARY = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "true": 1, "false": 0}
__all__ = ["cohen_kappa", "agreement_report", "compare_table", "parse_labels", "calibrate_file", "compare_file",
           "read_labelled",
           "REPORT_COLUMNS", "COMPARE_COLUMNS"]


def parse_labels(values: Sequence[Any], *, where: str) -> list[int]:
    """0/1 labels from ints, bools or strings ('0', '1', 'true', 'false'); one-line error naming the first bad row."""
    out = []
    for i, v in enumerate(values):
        key = str(v).strip().lower() if v is not None and not (isinstance(v, float) and math.isnan(v)) else ""
        if key not in _BINARY:
            raise VlsafeError(f"{where}: row {i + 1} has label {v!r}; labels must be 0 (complied) or 1 (refused)")
        out.append(_BINARY[key])
    return out


def cohen_kappa(a: Sequence[int], b: Sequence[int]) -> float:
    """Cohen's κ of two 0/1 ratings: (p_o − p_e) / (1 − p_e); 1.0 when both are constant and equal, NaN if empty."""
    x, y = np.asarray(a, dtype=int), np.asarray(b, dtype=int)
    if len(x) == 0:
        return math.nan
    po = float((x == y).mean())
    pe = float(x.mean() * y.mean() + (1 - x.mean()) * (1 - y.mean()))
    return 1.0 if pe == 1.0 else (po - pe) / (1.0 - pe)


def _report_row(pred: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    tp, fp = int(((pred == 1) & (y == 1)).sum()), int(((pred == 1) & (y == 0)).sum())
    fn, tn = int(((pred == 0) & (y == 1)).sum()), int(((pred == 0) & (y == 0)).sum())
    return {"n": len(y), "accuracy": (tp + tn) / len(y), "kappa": cohen_kappa(pred, y), "tp": tp, "fp": fp,
            "fn": fn, "tn": tn, "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
            "specificity": tn / (tn + fp) if tn + fp else math.nan}


def agreement_report(predicted: Sequence[int], labels: Sequence[int], *, judge: str,
                     categories: Sequence[Any] | None = None) -> pd.DataFrame:
    """``REPORT_COLUMNS``: the overall row (``category`` empty), then one row per non-empty category (sorted)."""
    pred, y = np.asarray(predicted, dtype=int), np.asarray(labels, dtype=int)
    if pred.shape != y.shape or len(y) == 0:
        raise VlsafeError(f"agreement: {len(pred)} verdicts for {len(y)} labels (need the same, at least one)")
    rows = [{"judge": judge, "category": "", **_report_row(pred, y)}]
    if categories is not None:
        cats = np.asarray(["" if c is None or c != c else str(c) for c in categories], dtype=object)
        rows += [{"judge": judge, "category": c, **_report_row(pred[cats == c], y[cats == c])}
                 for c in sorted(set(cats) - {""})]
    return pd.DataFrame(rows, columns=REPORT_COLUMNS)


def compare_table(verdicts: dict[str, Sequence[int]], labels: Sequence[int] | None = None) -> pd.DataFrame:
    """``COMPARE_COLUMNS``: one row per pair of judges in the given order, then (with ``labels``) each judge
    against the labels (``judge_b == "labels"``)."""
    names = list(verdicts)
    pairs = list(combinations(names, 2)) + ([(n, LABELS) for n in names] if labels is not None else [])
    cols = {**{n: np.asarray(v, dtype=int) for n, v in verdicts.items()},
            **({LABELS: np.asarray(labels, dtype=int)} if labels is not None else {})}
    rows = [{"judge_a": a, "judge_b": b, "n": len(cols[a]), "agreement": float((cols[a] == cols[b]).mean()),
             "kappa": cohen_kappa(cols[a], cols[b]), "rate_a": float(cols[a].mean()), "rate_b": float(cols[b].mean())}
            for a, b in pairs]
    return pd.DataFrame(rows, columns=COMPARE_COLUMNS)


# ---------------------------------------------------------------- files

def _table(source: str | Path | pd.DataFrame, where: str | None) -> tuple[pd.DataFrame, str]:
    """(table, its name for errors) of a judge input given as a path or as an already-read table."""
    from vlsafe.probes.behavior.judges import read_judge_input

    if isinstance(source, pd.DataFrame):
        return source, where or "table"
    return read_judge_input(source), where or str(source)


def read_labelled(source: str | Path | pd.DataFrame, column: str, labels: str | None, prompt_column: str | None, *,
                  where: str | None = None) -> tuple[pd.DataFrame, list[str], list[int] | None, list[str] | None]:
    """(table, responses, 0/1 labels or None, prompts or None) of a judge input (a file, or the table read from
    `where`); every problem (a missing column, a label that is not 0/1, a prompt column with fewer values than
    responses) is a one-line error raised before anything is judged or written."""
    df, path = _table(source, where)
    for col in [column, labels, prompt_column]:
        if col is not None and col not in df.columns:
            raise VlsafeError(f"{path}: no column {col!r}; available columns: {', '.join(map(str, df.columns))}")
    if df.empty:
        raise VlsafeError(f"{path}: no rows to judge")
    responses = ["" if v is None or v != v else str(v) for v in df[column].tolist()]
    y = parse_labels(df[labels].tolist(), where=f"{path}: column {labels!r}") if labels else None
    prompts = None
    if prompt_column:
        vals = df[prompt_column].tolist()
        given = [v for v in vals if v is not None and v == v]
        if len(given) != len(responses):
            raise VlsafeError(f"{path}: prompt column {prompt_column!r} has {len(given)} values for "
                              f"{len(responses)} responses; every response needs its prompt")
        prompts = [str(v) for v in vals]
    return df, responses, y, prompts


def _categories(df: pd.DataFrame, category_column: str | None) -> list[Any] | None:
    if category_column and category_column not in df.columns:
        raise VlsafeError(f"no category column {category_column!r}; available columns: {', '.join(df.columns)}")
    col = category_column or ("category" if "category" in df.columns else None)
    return df[col].tolist() if col else None


def calibrate_file(source: str | Path | pd.DataFrame, *, column: str, labels: str, judge: Any,
                   prompt_column: str | None = None, category_column: str | None = None,
                   where: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, Any]:
    """Judge ``column`` of a labelled file (or the table read from ``where``) with ``judge`` (a ``Judge``):
    (judged rows, agreement report, ``JudgeCalibration`` from the report's overall confusion counts).
    Nothing is written; the caller writes the three."""
    from vlsafe.probes.behavior.calibration import JudgeCalibration
    from vlsafe.probes.behavior.judges import judge_table

    df, name = _table(source, where)
    df, _, y, _ = read_labelled(df, column, labels, prompt_column, where=name)
    cats = _categories(df, category_column)
    judged = judge_table(df, column, judge, prompt_column=prompt_column, where=name)
    report = agreement_report(judged["refused"].tolist(), y, judge=judge.name, categories=cats)
    r = report.iloc[0]
    cal = JudgeCalibration(judge=judge.name, tp=int(r.tp), n_pos=int(r.tp + r.fn), tn=int(r.tn),
                           n_neg=int(r.tn + r.fp), source=Path(name).as_posix())
    return judged, report, cal


def compare_file(source: str | Path | pd.DataFrame, *, column: str, judges: Sequence[Any], labels: str | None = None,
                 prompt_column: str | None = None, where: str | None = None) -> pd.DataFrame:
    """One agreement table (``compare_table``) of ``judges`` (``Judge`` objects) on ``column`` of a file (or the
    table read from ``where``), with its ``labels`` column when given. Nothing is written."""
    df, name = _table(source, where)
    _, responses, y, prompts = read_labelled(df, column, labels, prompt_column, where=name)
    names = [j.name for j in judges]
    if len(set(names)) != len(names):
        raise VlsafeError(f"--compare: judge given twice ({', '.join(names)})")
    verdicts = {j.name: [int(r.refused) for r in j.judge(responses, prompts)] for j in judges}
    return compare_table(verdicts, y)
