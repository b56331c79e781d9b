"""Findings from the layer tables (diff layers, probe layers, direction similarity) and the sweep's Pareto table.

Conditions and wording are those of `vlsafe.experiments.report.findings` (see its docstring).
"""

from __future__ import annotations

import math

import pandas as pd

from vlsafe.experiments.report.findings_text import Finding, Rate, concentrated, disjoint, layer_ranges, rate_text
from vlsafe.experiments.report.roles import Roles, image_variant


def _layers(df: pd.DataFrame) -> pd.DataFrame:
    d = df[pd.to_numeric(df["layer"], errors="coerce").notna()].copy()
    d["layer"] = d["layer"].astype(float).astype(int)
    return d


def _small(v: float) -> str:
    return f"{100 * v:.2g}%"


def weight_finding(diff: pd.DataFrame, roles: Roles) -> Finding | None:
    """Where the weight shift of the adapted model sits over depth (`module=all` rows of diff `layers.csv`)."""
    d = _layers(diff)
    d = d[d["module"] == "all"] if (d["module"] == "all").any() else d
    pair = ""
    if "checkpoint_b" in d.columns and len(d):
        post = roles.final if roles.final in set(d["checkpoint_b"].astype(str)) else str(d["checkpoint_b"].iloc[-1])
        d = d[d["checkpoint_b"].astype(str) == post]
        pair = f" {d['checkpoint_a'].iloc[0]} → {post}" if "checkpoint_a" in d.columns else f" to {post}"
    v = d.groupby("layer")["rel_frobenius"].mean()
    if v.empty:
        return None
    top = concentrated(v)
    values = {"min": float(v.min()), "max": float(v.max()), "peak_layer": int(v.idxmax())}
    if top:
        text = (f"The weight shift{pair} is concentrated in layers {layer_ranges(top)} (relative change up to "
                f"{_small(v.max())} at layer {v.idxmax()}, median {_small(v.median())}).")
    else:
        text = (f"The weight shift{pair} is spread over depth: {_small(v.min())}–{_small(v.max())} relative "
                f"change per layer over {len(v)} layers, so it does not single out layers.")
    return Finding("weight_shift", text, "fig-weight-heatmap", values)


def _peak(probe: pd.DataFrame, ckpt: str) -> tuple[int, Rate] | None:
    g = probe[probe["checkpoint"].astype(str) == ckpt]
    if g.empty:
        return None
    row = g.loc[g["probe_accuracy"].idxmax()]
    acc, n = float(row["probe_accuracy"]), row.get("n")
    if n is None or pd.isna(n):
        return int(row["layer"]), Rate(acc)
    from vlsafe.probes.behavior.metrics import wilson_interval

    lo, hi = wilson_interval(round(acc * int(n)), int(n))
    return int(row["layer"]), Rate(acc, lo, hi, int(n))


def probe_finding(probe: pd.DataFrame, roles: Roles, *, refusal_fell: bool) -> Finding | None:
    """Peak probe accuracy of the reference against the adapted model (Wilson interval from the probe's n)."""
    d = _layers(probe)
    a, b = (_peak(d, roles.ref) if roles.ref else None), (_peak(d, roles.final) if roles.final else None)
    if a is None or b is None:
        return None
    (la, ra), (lb, rb) = a, b
    both = f"{rate_text(ra, f'{roles.ref} at layer {la}')} and {rate_text(rb, f'{roles.final} at layer {lb}')}"
    if disjoint(ra, rb):
        text = f"Peak probe accuracy {'falls' if rb.value < ra.value else 'rises'}: {both}; the intervals are disjoint."
    else:
        text = (f"Peak probe accuracy stays level{' while refusal falls' if refusal_fell else ''}: {both}; the "
                "intervals overlap.")
    return Finding("probe_accuracy", text, "fig-probe", {"ref": ra.value, "final": rb.value})


def _shift(sim: pd.DataFrame, a: str, b: str) -> pd.Series | None:
    s = _layers(sim)
    pa, pb = s["checkpoint_a"].astype(str), s["checkpoint_b"].astype(str)
    g = s[((pa == a) & (pb == b)) | ((pa == b) & (pb == a))]
    v = (1 - g.groupby("layer")["direction_cosine"].mean()).dropna()
    return v if len(v) else None


def drift_finding(sim: pd.DataFrame, a: str, b: str, *, key: str, lead: str) -> Finding | None:
    """Where the safety direction of `b` departs from that of `a` (1 − cosine per layer)."""
    v = _shift(sim, a, b)
    if v is None:
        return None
    top = concentrated(v)
    values = {"max_shift": float(v.max()), "peak_layer": int(v.idxmax()), "min_shift": float(v.min())}
    if top:
        text = (f"{lead} drifts mostly in layers {layer_ranges(top)} (1 − cos up to {v.max():.2f} at layer "
                f"{v.idxmax()}).")
    else:
        text = f"{lead} drifts evenly over depth: 1 − cos between {v.min():.2f} and {v.max():.2f} per layer."
    return Finding(key, text, "fig-linked", values)


def layer_findings(*, diff: pd.DataFrame | None, probe: pd.DataFrame | None, sim: pd.DataFrame | None,
                   roles: Roles, refusal_fell: bool = False) -> list[Finding]:
    """Weight-shift, probe-accuracy and direction-drift sentences for the tables present."""
    out = [weight_finding(diff, roles) if diff is not None else None,
           probe_finding(probe, roles, refusal_fell=refusal_fell) if probe is not None else None]
    if sim is not None and roles.ref and roles.final:
        names = list(dict.fromkeys([*sim["checkpoint_a"].astype(str), *sim["checkpoint_b"].astype(str)]))
        out.append(drift_finding(sim, roles.ref, roles.final, key="direction_drift",
                                 lead=f"{roles.final}'s safety direction, against {roles.ref}'s,"))
        if (img := image_variant(roles.final, names)) is not None:
            out.append(drift_finding(sim, roles.final, img, key="direction_image",
                                     lead=f"With an image ({img}), {roles.final}'s safety direction"))
    return [f for f in out if f is not None]


def point_rate(row: pd.Series, col: str) -> Rate:
    """The `col` rate of a sweep point with its `col_ci_low/high` interval when the table has it."""
    lo, hi = row.get(f"{col}_ci_low", math.nan), row.get(f"{col}_ci_high", math.nan)
    return Rate(float(row[col]), float(lo) if pd.notna(lo) else math.nan, float(hi) if pd.notna(hi) else math.nan)


def point_names(p: pd.DataFrame) -> list[str]:
    """The sweep points' names (`point`, `name` or `label` column), else their row numbers."""
    col = next((c for c in ("point", "name", "label") if c in p.columns), None)
    return [str(x) for x in p[col]] if col else [f"point {i + 1}" for i in range(len(p))]


def pareto_findings(p: pd.DataFrame) -> list[Finding]:
    """The fronts of the remedies sweep (text, and with an image when `safety_image` has numbers): how many points
    lie on each, its two ends, and whether the safety of its ends is told apart by the intervals. Points are numbered
    as in the figure's key (row order, from 1); with a `stage` column only full-stage points compete."""
    if p.empty:
        return []
    p = p.reset_index(drop=True)
    out = [_front_finding(p, "safety", "pareto_front", "fig-pareto", "")]
    if "safety_image" in p.columns and p["safety_image"].notna().any():
        out.append(_front_finding(p, "safety_image", "pareto_front_image", "fig-pareto-image", "With an image, "))
    return out


def _front_finding(p: pd.DataFrame, safety: str, key: str, anchor: str, lead: str) -> Finding:
    from vlsafe.experiments.report.plots_pareto import front_of

    names, front = point_names(p), front_of(p, safety)
    pool = int(((p["stage"] == "full") & p[safety].notna()).sum()) if "stage" in p.columns and (
        p["stage"] == "full").any() else int(p[safety].notna().sum())
    lo_i, hi_i = int(front["helpfulness"].idxmax()), int(front["safety"].idxmax())  # most helpful, safest end

    def end(i: int) -> str:
        return (f"#{i + 1} {names[i]} (safety {rate_text(point_rate(p.loc[i], safety))}, helpfulness "
                f"{rate_text(point_rate(p.loc[i], 'helpfulness'))})")
    values = {"n_points": pool, "n_front": len(front), "safest": float(p.loc[hi_i, safety]),
              "most_helpful": float(p.loc[lo_i, "helpfulness"])}
    more = int(p[safety].notna().sum()) - pool
    of = (f"{lead}of {pool} remedy points" if lead else f"Of {pool} remedy points") + (
        f" generated and judged ({more} more screened only)" if more else "")
    if lo_i == hi_i:  # one point is both the safest and the most helpful: the rest of the front ties with it
        text = (f"{of}, one dominates all others: {end(hi_i)}." if len(front) == 1 else
                f"{of}, {len(front)} lie on the Pareto front, all tied with {end(hi_i)}.")
        return Finding(key, text, anchor, values)
    a, b = point_rate(p.loc[lo_i], safety), point_rate(p.loc[hi_i], safety)
    state = ("the safety intervals of its two ends are disjoint, so the extra safety costs helpfulness"
             if disjoint(a, b) else "the safety intervals of its two ends overlap")
    text = f"{of}, {len(front)} lie on the Pareto front, from {end(lo_i)} to {end(hi_i)}; {state}."
    return Finding(key, text, anchor, values)


__all__ = ["layer_findings", "pareto_findings", "point_names", "point_rate"]
