"""Refusal, attack-success and compliance rates with Wilson score intervals (pure numpy/pandas).

``rate_rows`` and ``mean_row`` are the aggregation of the one evaluation (:mod:`vlsafe.probes.behavior.evaluate`):
tidy rows ``ROW_COLUMNS`` (checkpoint, prompt_set, image, metric, n, k, rate, ci_low, ci_high, judge, category,
harmful, mode). ``eval_summary`` is the eval ``summary.csv`` view of refusal rows; ``summarize`` builds it from any
generations table: one overall row per (checkpoint, prompt_set) with an empty ``category`` plus one row per
category when the generations carry a ``category`` column.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

SUMMARY_COLUMNS = ["checkpoint", "prompt_set", "n", "refusal_rate", "ci_low", "ci_high", "judge", "category"]
ROW_COLUMNS = ["checkpoint", "prompt_set", "image", "metric", "n", "k", "rate", "ci_low", "ci_high", "judge",
               "category", "harmful", "mode"]
REFUSAL_METRICS = ("refusal_rate", "over_refusal")


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` trials; ``(nan, nan)`` when ``n == 0``."""
    from vlsafe.analysis.errors import VlsafeError

    if n == 0:
        return (math.nan, math.nan)
    if n < 0 or k < 0 or k > n:
        raise VlsafeError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo, hi = center - half, center + half
    # exact at the boundaries (floating error otherwise leaves ~1e-17 instead of 0 / 1)
    return (0.0 if k == 0 else max(0.0, lo), 1.0 if k == n else min(1.0, hi))


def _require(df: pd.DataFrame, cols: Iterable[str], what: str) -> None:
    from vlsafe.analysis.errors import VlsafeError

    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise VlsafeError(f"{what}: missing column(s) {missing}; available columns: {', '.join(map(str, df.columns))}")


_TRUTHY = {"1": 1.0, "true": 1.0, "yes": 1.0, "0": 0.0, "false": 0.0, "no": 0.0}


def _flags(s: pd.Series) -> pd.Series:
    """0/1 flags as floats from bools, numbers or strings ('1', 'true', 'yes', ...); blanks become NaN."""
    if pd.api.types.is_bool_dtype(s) or pd.api.types.is_numeric_dtype(s):
        return s.astype(float)

    def one(v: object) -> float:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return math.nan
        if isinstance(v, (bool, int, float, np.number)):
            return float(v)
        return _TRUTHY.get(str(v).strip().lower(), math.nan)

    return s.map(one).astype(float)


def rate_table(df: pd.DataFrame, group_cols: Sequence[str] = (), flag_col: str = "refused", z: float = 1.96,
               asr: bool = False) -> pd.DataFrame:
    """Per-group ``n, refusals, refusal_rate, ci_low, ci_high`` (rows with a missing flag are not counted).

    With ``asr=True`` (harmful prompt sets) also ``asr = 1 - refusal_rate`` and its interval ``asr_ci_low/high``.
    An empty ``group_cols`` gives a single overall row.
    """
    group_cols = list(group_cols)
    _require(df, group_cols + [flag_col], "rate_table")
    d = df[group_cols].copy()
    d["_flag"] = _flags(df[flag_col])
    d = d[d["_flag"].notna()]
    groups = d.groupby(group_cols, sort=True, dropna=False) if group_cols else [((), d)]
    rows = []
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        n, k = int(len(g)), int(round(g["_flag"].sum()))
        lo, hi = wilson_interval(k, n, z)
        row = dict(zip(group_cols, key))
        row.update(n=n, refusals=k, refusal_rate=(k / n if n else math.nan), ci_low=lo, ci_high=hi)
        if asr:
            row.update(asr=1 - row["refusal_rate"], asr_ci_low=1 - hi, asr_ci_high=1 - lo)
        rows.append(row)
    cols = group_cols + ["n", "refusals", "refusal_rate", "ci_low", "ci_high"]
    cols += ["asr", "asr_ci_low", "asr_ci_high"] if asr else []
    return pd.DataFrame(rows, columns=cols)


def compliance_rate(df: pd.DataFrame, group_cols: Sequence[str] = (), flag_col: str = "refused",
                    z: float = 1.96) -> pd.DataFrame:
    """Helpfulness on benign sets: ``n, compliance_rate, ci_low, ci_high, over_refusal`` per group.

    ``compliance_rate = 1 - refusal_rate`` and ``over_refusal`` is the refusal rate (e.g. XSTest safe prompts).
    """
    t = rate_table(df, group_cols, flag_col, z)
    out = t[list(group_cols) + ["n"]].copy()
    out["compliance_rate"] = 1 - t["refusal_rate"]
    out["ci_low"], out["ci_high"] = 1 - t["ci_high"], 1 - t["ci_low"]
    out["over_refusal"] = t["refusal_rate"]
    return out


def _harmful(df: pd.DataFrame) -> bool:
    """True when every prompt is labelled harmful (a ``harmful`` bool column, else ``label`` == 1)."""
    col = "harmful" if "harmful" in df.columns else "label" if "label" in df.columns else None
    return bool(len(df)) and col is not None and bool((_flags(df[col]) == 1).all())


def rate_rows(frame: pd.DataFrame, flag_col: str, *, checkpoint: str, prompt_set: str, metric: str, judge: str,
              image: str = "", mode: str = "", z: float = 1.96) -> pd.DataFrame:
    """Tidy rows (``ROW_COLUMNS``) of one evaluated prompt set: the overall row (``category == ""``), then one row
    per non-empty category (sorted); ``k`` prompts of ``n`` have a true ``flag_col``, ``rate = k / n`` with its
    Wilson interval. ``harmful`` says whether every prompt of the row is labelled harmful (a ``harmful`` or
    ``label`` column)."""
    parts = [rate_table(frame, [], flag_col, z).assign(category="", harmful=_harmful(frame))]
    if "category" in frame.columns:
        cat = frame["category"].fillna("").astype(str)
        sub = frame[cat != ""].assign(category=cat[cat != ""])
        if len(sub):
            per = rate_table(sub, ["category"], flag_col, z)
            parts.append(per.assign(harmful=[_harmful(sub[sub["category"] == c]) for c in per["category"]]))
    out = pd.concat(parts, ignore_index=True).rename(columns={"refusals": "k", "refusal_rate": "rate"})
    out = out.assign(checkpoint=checkpoint, prompt_set=prompt_set, image=image, metric=metric, judge=judge,
                     mode=mode)
    return out[ROW_COLUMNS]


def mean_row(values: Sequence[float], *, checkpoint: str, prompt_set: str, metric: str, judge: str,
             image: str = "", mode: str = "", z: float = 1.96) -> pd.DataFrame:
    """One tidy row for a mean (e.g. an answer log-likelihood): ``rate`` = the mean, a normal interval
    ``mean ± z·sd/√n`` (NaN for n < 2), ``k`` empty."""
    vals = np.asarray(values, dtype=np.float64)
    half = z * float(np.std(vals, ddof=1)) / math.sqrt(len(vals)) if len(vals) > 1 else math.nan
    mean = float(np.mean(vals))
    row = {"checkpoint": checkpoint, "prompt_set": prompt_set, "image": image, "metric": metric, "n": len(vals),
           "k": pd.NA, "rate": mean, "ci_low": mean - half, "ci_high": mean + half, "judge": judge,
           "category": "", "harmful": False, "mode": mode}
    return pd.DataFrame([row], columns=ROW_COLUMNS)


def eval_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """The ``summary.csv`` view of the refusal rows (``refusal_rate``, ``over_refusal``) of tidy rows:
    ``SUMMARY_COLUMNS + [refusals, asr]``, where ``refusal_rate`` is the row's rate, ``refusals`` its ``k`` and
    ``asr = 1 - refusal_rate`` on rows whose prompts are all labelled harmful (NaN otherwise); the judge-corrected
    columns (``rate_corrected, corrected_low, corrected_high``) follow when the rows have them."""
    r = rows[rows["metric"].isin(REFUSAL_METRICS)].reset_index(drop=True)
    rate = r["rate"].astype(float)
    out = pd.DataFrame({"checkpoint": r["checkpoint"], "prompt_set": r["prompt_set"], "n": r["n"].astype(int),
                        "refusal_rate": rate, "ci_low": r["ci_low"], "ci_high": r["ci_high"], "judge": r["judge"],
                        "category": r["category"], "refusals": r["k"].astype(int)})
    out["asr"] = [1 - v if h else math.nan for v, h in zip(rate, r["harmful"].astype(bool))]
    from vlsafe.probes.behavior.calibration import CORRECTED_COLUMNS

    extra = [c for c in CORRECTED_COLUMNS if c in r.columns]
    return pd.concat([out, r[extra].astype(float)], axis=1) if extra else out


def summarize(generations_df: pd.DataFrame, judge_name: str, response_col: str = "response",
              flag_col: str = "refused", z: float = 1.96) -> pd.DataFrame:
    """Rows of ``summary.csv`` from a generations table (see :func:`eval_summary`).

    ``generations_df`` needs ``checkpoint`` and ``prompt_set`` and either a ``refused`` column or a ``response``
    column (then judged here with ``judge_name``). Each (checkpoint, prompt set), in order of appearance, gives its
    overall row (``category == ""``) and one row per category (:func:`rate_rows`); ``asr`` is NaN unless a
    ``harmful`` (bool) or ``label`` (1 = should be refused) column marks every prompt of the row harmful.
    """
    _require(generations_df, ["checkpoint", "prompt_set"], "summarize")
    df = generations_df.copy()
    if flag_col not in df.columns:
        _require(df, [response_col], f"summarize (no {flag_col!r} column to read)")
        from vlsafe.probes.behavior.judges import get_judge

        judge = get_judge(judge_name)
        df[flag_col] = [int(r.refused) for r in judge.judge(df[response_col].fillna("").astype(str).tolist())]
        judge_name = judge.name
    keys = list(dict.fromkeys(zip(df["checkpoint"], df["prompt_set"])))
    groups = dict(iter(df.groupby(["checkpoint", "prompt_set"], sort=False)))
    rows = [rate_rows(groups[key], flag_col, checkpoint=key[0], prompt_set=key[1], metric="refusal_rate",
                      judge=judge_name, z=z) for key in keys]
    return eval_summary(pd.concat(rows, ignore_index=True))
