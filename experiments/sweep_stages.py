"""Two-stage sweeps: screen every point with the fast logit refusal score, then evaluate in full (generate + judge)
only the points on or near the screened front, at most `keep.max_points` of them, and every `checkpoint` reference.

The keep rule is ε-dominance: a screened point is dropped only when another point beats it by more than `margin`
in both safety and helpfulness (screened numbers), on the text front or, when the sweep has an image harmful set,
on the image front too (a point kept by either front is kept).

What it guarantees: if each screened coordinate is a non-decreasing function of the true rate plus an error of at
most `margin / 2` (`margin = 0`: exactly monotone), then no point on the full evaluation's Pareto front is dropped.
(If q's screened numbers beat p's by more than `margin`, q's true numbers beat p's strictly, so p is dominated.)
What it does not: the logit score is a screening score only; points it ranks far from where generation would put
them can be dropped, which is why the margin should cover the screen's error, and why every number in `pareto.csv`
says where it comes from (`stage`: `full` or `screen`).

The cap (`keep.max_points: K`; default none). When the screen does not separate the points (e.g. compliance alike
for almost all), ε-dominance keeps nearly all of them. With a cap, of the non-reference points ε-dominance keeps,
the first K by this rank (`cap_ranks`) are evaluated in full:

1. Pareto layer of the screened numbers (non-dominated sorting over every screened row, references included):
   layer 1 is the screened front, layer 2 the front once layer 1 is removed, … With an image harmful set a point's
   layer is the smaller of its text layer (safety, helpfulness) and its image layer (safety_image, helpfulness;
   rows with an image number only). Dominance is the front's: at least as good in both, better in one. A row
   missing a number of a front is in no layer of it (ranked after every layered row).
2. ties: higher screened `safety` first, then point order (the grid's order).

`checkpoint` references are always evaluated and do not count toward K. With an exactly monotone screen (each
screened coordinate a strictly increasing function of the true rate), layer 1 is the full evaluation's front, so
K ≥ the number of non-reference points on it keeps all of them; with a noisy screen, a cap gives up the margin's
guarantee for the points ranked past K (they are marked, see below). The rank depends only on the screened
numbers, so the same screen always picks the same points; changing `keep` never invalidates a cached evaluation
(each stage is cached under its own eval key, which leaves `keep` out).

Rows (and `pareto.csv`): each has `stage`, `kept_by` — why a point was evaluated in full (`reference`, `front`:
kept by ε-dominance with no cap, `cap-rank N`: kept with rank N ≤ K) or not (`dominated`: dropped by ε-dominance,
`over cap (rank N)`) — and `screen_<column>` for every numeric column of the screen's row (`screen_safety`,
its `_ci_low/_ci_high`, `screen_over_refusal`, `screen_helpfulness`, `screen_safety_image` with an image set,
`screen_n_*`, `screen_fired_*` of gated points, …): the screened numbers of a point evaluated in full, NaN for a
point only screened (its own columns are the screen's). Single-stage sweeps carry `screen_safety`,
`screen_over_refusal`, `screen_helpfulness` (with intervals; `screen_safety_image` with an image set), all NaN,
and an empty `kept_by`.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from vlsafe.experiments.sweep_eval import CHANNELS, IMAGE_CHANNEL, EvalConfig, KeepSettings

__all__ = ["keep_near_front", "pareto_layers", "front_layers", "cap_ranks", "keep_reasons", "screen_keep",
           "staged_rows", "stage_of", "SCREEN_PREFIX"]

Rows = list[dict[str, Any]]
SCREEN_PREFIX = "screen_"
KEPT = ("reference", "front", "cap-rank")  # `kept_by` values (prefixes) of points evaluated in full


def stage_of(cfg: EvalConfig) -> str:
    """`full` for numbers from generation + judge, `screen` for logit scores."""
    return "full" if cfg.mode == "full" else "screen"


def keep_near_front(df: pd.DataFrame, *, margin: float, safety: str = "safety") -> np.ndarray:
    """One bool per row: True unless another row beats it by more than `margin` in both `safety` and helpfulness.
    Rows with a missing number are neither beaten nor beat others (kept)."""
    s, h = df[safety].to_numpy(float), df["helpfulness"].to_numpy(float)
    beaten = (s[None, :] > s[:, None] + margin) & (h[None, :] > h[:, None] + margin)  # [i, j]: j beats i
    return ~beaten.any(axis=1)


def pareto_layers(df: pd.DataFrame, *, safety: str = "safety") -> np.ndarray:
    """Non-dominated sorting on (`safety` ↑, helpfulness ↑): one float per row, 1 for the rows no row dominates
    (at least as good in both, better in one), 2 for those only layer-1 rows dominate, …; inf for rows missing
    a number."""
    s, h = df[safety].to_numpy(float), df["helpfulness"].to_numpy(float)
    ok = ~(np.isnan(s) | np.isnan(h))
    ge = (s[None, :] >= s[:, None]) & (h[None, :] >= h[:, None])
    gt = (s[None, :] > s[:, None]) | (h[None, :] > h[:, None])
    dominated_by = ge & gt & ok[:, None] & ok[None, :]  # [i, j]: j dominates i
    layer, left, k = np.full(len(df), math.inf), ok.copy(), 1
    while left.any():
        now = left & ~dominated_by[:, left].any(axis=1)
        layer[now], left, k = k, left & ~now, k + 1
    return layer


def front_layers(df: pd.DataFrame) -> np.ndarray:
    """Each row's Pareto layer: its text layer, or its image layer when smaller (with an image number)."""
    layer = pareto_layers(df)
    if "safety_image" in df.columns and df["safety_image"].notna().any():
        layer = np.minimum(layer, pareto_layers(df, safety="safety_image"))
    return layer


def cap_ranks(df: pd.DataFrame, candidates: np.ndarray) -> np.ndarray:
    """The cap's rank (1 = first) of each `candidates` row, 0 for the others: by `front_layers`, then higher
    `safety`, then row order."""
    layer, s = front_layers(df), df["safety"].to_numpy(float)
    safest = np.where(np.isnan(s), math.inf, -s)
    order = sorted(np.flatnonzero(candidates), key=lambda i: (layer[i], safest[i], i))
    rank = np.zeros(len(df), int)
    rank[order] = np.arange(1, len(order) + 1)
    return rank


def keep_reasons(df: pd.DataFrame, *, margin: float, max_points: int | None = None) -> list[str]:
    """`kept_by` of each screened row: `reference` (a `checkpoint` point), `front` (kept by ε-dominance on the text
    or image front, no cap), `cap-rank N` (kept, rank N ≤ `max_points`), `dominated`, `over cap (rank N)`."""
    near = keep_near_front(df, margin=margin)
    if "safety_image" in df.columns and df["safety_image"].notna().any():
        has = df["safety_image"].notna().to_numpy()
        image = np.zeros(len(df), bool)
        image[has] = keep_near_front(df[has], margin=margin, safety="safety_image")
        near |= image
    ref = (df["method"] == "checkpoint").to_numpy() if "method" in df.columns else np.zeros(len(df), bool)
    rank = cap_ranks(df, near & ~ref) if max_points is not None else np.zeros(len(df), int)

    def why(i: int) -> str:
        if ref[i]:
            return "reference"
        if not near[i]:
            return "dominated"
        if max_points is None:
            return "front"
        return f"cap-rank {rank[i]}" if rank[i] <= max_points else f"over cap (rank {rank[i]})"
    return [why(i) for i in range(len(df))]


def screen_keep(df: pd.DataFrame, *, margin: float, max_points: int | None = None) -> np.ndarray:
    """The screened rows that get the full evaluation: near the text front, near the image front (rows with an image
    number only), the first `max_points` of those by `cap_ranks` when capped, and every `checkpoint` reference."""
    return np.array([r.startswith(KEPT) for r in keep_reasons(df, margin=margin, max_points=max_points)], bool)


def _numeric(v: Any) -> bool:
    return isinstance(v, (Real, np.number)) and not isinstance(v, (bool, np.bool_))


def _screen_columns(cfg: EvalConfig, screened: Sequence[dict[str, Any]] = ()) -> list[str]:
    """The screen's numeric columns: the rate channels with their intervals, then every other numeric column the
    screened rows have, in order of appearance."""
    channels = list(CHANNELS) + ([IMAGE_CHANNEL[0]] if cfg.harmful_image else [])
    cols = [f"{c}{x}" for c in channels for x in ("", "_ci_low", "_ci_high")]
    for r in screened:
        cols += [k for k, v in r.items() if _numeric(v) and k not in cols]
    return cols


def staged_rows(points: Sequence[Any], cfg: EvalConfig, run: Callable[[Sequence[Any], EvalConfig], Rows]) -> Rows:
    """Every point's row, each with `stage`, `kept_by` and the `screen_*` columns (see the module docstring).
    `run(points, single_mode_cfg)` builds (if needed) and evaluates points, returning their rows in order. A fast or
    full config runs once; a two-stage one screens all points, then runs the full evaluation on those `screen_keep`
    picks and uses its numbers for them."""
    if cfg.mode != "two-stage":
        blank = {SCREEN_PREFIX + c: math.nan for c in _screen_columns(cfg)}
        return [{**r, "stage": stage_of(cfg), "kept_by": None, **blank} for r in run(points, cfg)]
    screened = run(points, cfg.stage_config("screen"))
    keep = cfg.keep or KeepSettings()
    why = keep_reasons(pd.DataFrame(screened), margin=keep.margin, max_points=keep.max_points)
    kept = [w.startswith(KEPT) for w in why]
    full = iter(run([p for p, k in zip(points, kept) if k], cfg.stage_config("full")))
    cols = _screen_columns(cfg, screened)
    out = []
    for r, k, w in zip(screened, kept, why):
        numbers = {SCREEN_PREFIX + c: r.get(c, math.nan) if k else math.nan for c in cols}
        out.append({**next(full), "stage": "full", "kept_by": w, **numbers} if k else
                   {**r, "stage": "screen", "kept_by": w, **numbers})
    return out
