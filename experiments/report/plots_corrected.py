"""Intervals on the remedies figure: each judged point's raw Wilson intervals and its judge-corrected safety rate.

A sweep judged by a calibrated judge has, per safety channel, `{safety}_corrected` with its interval
`{safety}_corrected_low/_high` (Rogan–Gladen; the interval carries the judge's own error, see
`vlsafe.probes.behavior.calibration`). `draw_corrected` draws the interval as a dashed grey bar with a tick at the
corrected estimate (a mark no family uses), `OFFSET_PT` points right of the raw point, so neither hides the other;
`corrected_boxes` are the places the labels must avoid, `corrected_handle` the legend entry (`CORRECTED_LABEL`).
Rows without corrected numbers (screened points, an uncalibrated judge) get nothing.

`draw_raw` draws the raw 95 % Wilson intervals of the judged points (safety vertically, helpfulness horizontally;
thin, in the point's colour, behind it; SVG ids `wilson-safety` and `wilson-helpfulness`), `raw_rows` picks the
rows that have them (generated + judged points: a screened number is a screen, not a measurement with an interval),
`raw_boxes` and `raw_span` serve label placement and axis limits as their corrected twins do.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.transforms import Bbox, offset_copy

from vlsafe.experiments.report.findings_text import Rate, rate_text

CORRECTED_LABEL = "corrected for judge error"
OFFSET_PT = 5.5  # the corrected mark's shift right of the raw point, in points
_DASH = (0, (2.0, 1.5))
_STYLE: dict[str, Any] = {"color": "0.45", "lw": 0.7}
_MARK: dict[str, Any] = {"marker": "_", "ms": 6.0, "mec": "0.25", "mew": 1.3}  # a tick: no family uses it


def corrected_cols(safety: str) -> list[str]:
    """The estimate and interval columns of the judge-corrected `safety` channel."""
    return [f"{safety}_corrected", f"{safety}_corrected_low", f"{safety}_corrected_high"]


def corrected_rows(p: pd.DataFrame, safety: str = "safety") -> pd.DataFrame:
    """The rows of `p` with a raw `safety` rate and a complete corrected one (empty without the columns)."""
    cols = corrected_cols(safety)
    if not set(cols) <= set(p.columns) or safety not in p.columns:
        return p.iloc[:0]
    return p[p[cols].notna().all(axis=1) & p[safety].notna() & p["helpfulness"].notna()]


def corrected_text(row: pd.Series, safety: str = "safety") -> str:
    """`93% [80, 99]`: a row's corrected `safety` rate and interval, or empty when it has none."""
    est, lo, hi = (row.get(c) for c in corrected_cols(safety))
    if any(v is None or pd.isna(v) for v in (est, lo, hi)):
        return ""
    return rate_text(Rate(float(est), float(lo), float(hi)))


def draw_corrected(ax: Any, rows: pd.DataFrame, safety: str = "safety") -> None:
    """The corrected rate of each row as a tick on its interval, a dashed bar, shifted right of the raw point
    (SVG ids `judge-corrected` and `judge-corrected-bars`)."""
    if rows.empty:
        return
    est, lo, hi = (rows[c].to_numpy(float) for c in corrected_cols(safety))
    x = rows["helpfulness"].to_numpy(float)
    shift = offset_copy(ax.transData, fig=ax.figure, x=OFFSET_PT, y=0.0, units="points")
    ax.vlines(x, lo, hi, transform=shift, linestyles=[_DASH], colors=_STYLE["color"], linewidths=_STYLE["lw"],
              zorder=2, gid="judge-corrected-bars")
    ax.plot(x, est, ls="", transform=shift, zorder=2.5, gid="judge-corrected", **_MARK)


def corrected_handle() -> Line2D:
    """The legend entry of the corrected marks."""
    return Line2D([], [], ls=_DASH, label=CORRECTED_LABEL, **_STYLE, **_MARK)


def corrected_boxes(ax: Any, rows: pd.DataFrame, safety: str = "safety", *, half_pt: float = 3.0) -> list[Bbox]:
    """Display-space boxes of the drawn corrected marks (bar and tick, `half_pt` points either side), for label
    placement; call it once the layout is fixed."""
    if rows.empty:
        return []
    px = ax.figure.dpi / 72.0
    est, lo, hi = (rows[c].to_numpy(float) for c in corrected_cols(safety))
    x = rows["helpfulness"].to_numpy(float)
    out = []
    for xi, e, a, b in zip(x, est, lo, hi):
        (u, v0), (_, v1), (_, ve) = ax.transData.transform([(xi, a), (xi, b), (xi, e)])
        u += OFFSET_PT * px
        out.append(Bbox.from_extents(u - half_pt * px, min(v0, ve) - 2 * px, u + half_pt * px, max(v1, ve) + 2 * px))
    return out


def corrected_span(rows: pd.DataFrame, safety: str = "safety") -> tuple[float, float] | None:
    """(lowest, highest) corrected value drawn, for the axis limits; None without rows."""
    if rows.empty:
        return None
    vals = np.concatenate([rows[c].to_numpy(float) for c in corrected_cols(safety)])
    return float(vals.min()), float(vals.max())


RAW_LABEL = "95 % Wilson interval (judged points)"


def raw_cols(safety: str) -> list[str]:
    """The interval columns drawn for the raw rates: `safety` and helpfulness, low and high."""
    return [f"{safety}_ci_low", f"{safety}_ci_high", "helpfulness_ci_low", "helpfulness_ci_high"]


def raw_rows(p: pd.DataFrame, safety: str = "safety") -> pd.DataFrame:
    """The rows of `p` with raw `safety` and helpfulness rates and both intervals, screened-only rows left out."""
    cols = [safety, "helpfulness", *raw_cols(safety)]
    if not set(cols) <= set(p.columns):
        return p.iloc[:0]
    judged = p["stage"] != "screen" if "stage" in p.columns else pd.Series(True, index=p.index)
    return p[p[cols].notna().all(axis=1) & judged]


def draw_raw(ax: Any, rows: pd.DataFrame, colors: list[Any], safety: str = "safety") -> None:
    """Each row's Wilson intervals as thin bars through its point, in `colors` (one per row)."""
    if rows.empty:
        return
    s_lo, s_hi, h_lo, h_hi = (rows[c].to_numpy(float) for c in raw_cols(safety))
    x, y = rows["helpfulness"].to_numpy(float), rows[safety].to_numpy(float)
    style = {"colors": colors, "linewidths": 0.6, "alpha": 0.55, "zorder": 1.5}
    ax.vlines(x, s_lo, s_hi, gid="wilson-safety", **style)
    ax.hlines(y, h_lo, h_hi, gid="wilson-helpfulness", **style)


def raw_handle() -> Line2D:
    """The legend entry of the raw interval bars."""
    return Line2D([], [], color="0.35", lw=0.6, alpha=0.55, label=RAW_LABEL)


def raw_boxes(ax: Any, rows: pd.DataFrame, safety: str = "safety", *, half_pt: float = 1.0) -> list[Bbox]:
    """Display-space boxes of the drawn interval bars (`half_pt` points either side), for label placement."""
    if rows.empty:
        return []
    px = ax.figure.dpi / 72.0
    s_lo, s_hi, h_lo, h_hi = (rows[c].to_numpy(float) for c in raw_cols(safety))
    out = []
    for xi, yi, a, b, c, d in zip(rows["helpfulness"].to_numpy(float), rows[safety].to_numpy(float), s_lo, s_hi,
                                  h_lo, h_hi):
        (u, v0), (_, v1) = ax.transData.transform([(xi, a), (xi, b)])
        (u0, v), (u1, _) = ax.transData.transform([(c, yi), (d, yi)])
        out += [Bbox.from_extents(u - half_pt * px, v0, u + half_pt * px, v1),
                Bbox.from_extents(u0, v - half_pt * px, u1, v + half_pt * px)]
    return out


def raw_span(rows: pd.DataFrame, safety: str = "safety") -> dict[str, tuple[float, float]]:
    """{column: (lowest, highest)} of the drawn intervals, for the axis limits; empty without rows."""
    if rows.empty:
        return {}
    s_lo, s_hi, h_lo, h_hi = (rows[c].to_numpy(float) for c in raw_cols(safety))
    return {safety: (float(s_lo.min()), float(s_hi.max())), "helpfulness": (float(h_lo.min()), float(h_hi.max()))}
