"""The remedies question, answered from `pareto.csv`: does a remedy that touches few layers (≤ `MAX_LAYERS`), or
none of the weights, reach the whole-LM merge's refusal — text and with an image — at no more over-refusal and no
less compliance?

The whole-LM merge is the judged `merge` point on every layer with the highest text refusal (ties: more
compliance). A candidate is a judged point of the `activation` or `gated` family (no weight changed), or a `merge`
or `tuning` point on at most `MAX_LAYERS` layers. It *reaches* the merge when all four point estimates are at least
as good; it is *not told apart* when none of the four is worse with disjoint Wilson intervals. Only points of the
full (generated and judged) stage compete when the table has a `stage` column. One run: the sentence says so.
"""

from __future__ import annotations

import pandas as pd

from vlsafe.experiments.report.findings_layers import point_rate
from vlsafe.experiments.report.findings_text import Finding, disjoint, rate_text

MAX_LAYERS = 10
WEIGHT_FREE = ("activation", "gated")
TUNED = ("merge", "tuning")
# (column, better when higher, words)
CRITERIA = (("safety", True, "text refusal"), ("safety_image", True, "refusal with an image"),
            ("over_refusal", False, "over-refusal"), ("helpfulness", True, "compliance"))


def _n_layers(layers: object) -> int | None:
    """Number of layers in a pareto.csv `layers` cell (None for `all` or an empty cell)."""
    text = "" if pd.isna(layers) else str(layers).strip()
    return None if text in ("", "all") else len(text.split())


def candidates(p: pd.DataFrame) -> pd.DataFrame:
    """Judged points that touch no weight, or ≤ `MAX_LAYERS` layers of them (see the module docstring)."""
    few = p["layers"].map(_n_layers).map(lambda n: n is not None and n <= MAX_LAYERS)
    return p[p["family"].isin(WEIGHT_FREE) | (p["family"].isin(TUNED) & few)]


def whole_merge(p: pd.DataFrame) -> pd.Series | None:
    """The judged whole-LM merge with the highest text refusal (ties: higher compliance), or None."""
    m = p[(p["family"] == "merge") & (p["layers"].astype(str).str.strip() == "all")]
    if m.empty:
        return None
    return m.sort_values(["safety", "helpfulness"], ascending=False, kind="stable").iloc[0]


def _columns(p: pd.DataFrame) -> list[tuple[str, bool, str]]:
    return [c for c in CRITERIA if c[0] in p.columns and p[c[0]].notna().any()]


def reaches(row: pd.Series, ref: pd.Series, cols: list[tuple[str, bool, str]]) -> bool:
    """All point estimates at least as good as `ref`'s (a missing number never reaches)."""
    return all(pd.notna(row[c]) and (row[c] >= ref[c] if up else row[c] <= ref[c]) for c, up, _ in cols)


def worse_apart(row: pd.Series, ref: pd.Series, cols: list[tuple[str, bool, str]]) -> list[str]:
    """The criteria on which `row` is worse than `ref` with disjoint intervals."""
    out = []
    for c, up, words in cols:
        a, b = point_rate(row, c), point_rate(ref, c)
        if disjoint(a, b) and ((a.value < b.value) if up else (a.value > b.value)):
            out.append(words)
    return out


def remedy_answer(p: pd.DataFrame) -> list[Finding]:
    """One sentence answering the module's question from the judged points (none without a whole-LM merge or a
    candidate)."""
    if "stage" in p.columns and (p["stage"] == "full").any():
        p = p[p["stage"] == "full"]
    if not {"family", "layers", "safety", "helpfulness"} <= set(p.columns):
        return []
    ref, pool = whole_merge(p), candidates(p)
    if ref is None or pool.empty:
        return []
    cols = _columns(p)
    hit, close = [], []
    for _, r in pool.iterrows():
        if reaches(r, ref, cols):
            hit.append(r)
        elif not worse_apart(r, ref, cols):
            close.append(r)
    merge = ", ".join(f"{w} {rate_text(point_rate(ref, c))}" for c, _, w in cols)
    text = (f"Against the whole-LM merge {ref['point']} ({merge}; one run), of {len(pool)} judged remedies that "
            f"touch no weight or at most {MAX_LAYERS} layers, ")
    if hit:
        text += f"{len(hit)} reach it on all {len(cols)} by point estimate: " + "; ".join(
            f"{r['point']} ({', '.join(f'{w} {rate_text(point_rate(r, c))}' for c, _, w in cols)})" for r in hit)
    else:
        text += f"none reaches it on all {len(cols)} by point estimate"
    if close:
        names = ", ".join(str(r["point"]) for r in close)
        text += f"; {len(close)} more are worse on none with disjoint intervals ({names})."
    else:
        text += "; every other one is worse on at least one with disjoint intervals."
    values = {"n_candidates": len(pool), "n_reach": len(hit), "n_close": len(close)}
    return [Finding("remedy_vs_merge", text, "fig-pareto", values)]


__all__ = ["remedy_answer", "candidates", "whole_merge", "reaches", "worse_apart", "MAX_LAYERS"]
