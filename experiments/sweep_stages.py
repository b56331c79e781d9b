"""Two-stage sweeps: screen every point with the fast logit refusal score, then evaluate in full (generate + judge)
only the points on or near the screened front, and every `checkpoint` reference.

The keep rule is ε-dominance: a screened point is dropped only when another point beats it by more than `margin`
in both safety and helpfulness (screened numbers), on the text front or, when the sweep has an image harmful set,
on the image front too (a point kept by either front is kept).

What it guarantees: if each screened coordinate is a non-decreasing function of the true rate plus an error of at
most `margin / 2` (`margin = 0`: exactly monotone), then no point on the full evaluation's Pareto front is dropped.
(If q's screened numbers beat p's by more than `margin`, q's true numbers beat p's strictly, so p is dominated.)
What it does not: the logit score is a screening score only; points it ranks far from where generation would put
them can be dropped, which is why the margin should cover the screen's error, and why every number in `pareto.csv`
says where it comes from (`stage`: `full` or `screen`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from vlsafe.experiments.sweep_eval import EvalConfig, KeepSettings

__all__ = ["keep_near_front", "screen_keep", "staged_rows", "stage_of"]

Rows = list[dict[str, Any]]


def stage_of(cfg: EvalConfig) -> str:
    """`full` for numbers from generation + judge, `screen` for logit scores."""
    return "full" if cfg.mode == "full" else "screen"


def keep_near_front(df: pd.DataFrame, *, margin: float, safety: str = "safety") -> np.ndarray:
    """One bool per row: True unless another row beats it by more than `margin` in both `safety` and helpfulness.
    Rows with a missing number are neither beaten nor beat others (kept)."""
    s, h = df[safety].to_numpy(float), df["helpfulness"].to_numpy(float)
    beaten = (s[None, :] > s[:, None] + margin) & (h[None, :] > h[:, None] + margin)  # [i, j]: j beats i
    return ~beaten.any(axis=1)


def screen_keep(df: pd.DataFrame, *, margin: float) -> np.ndarray:
    """The screened rows that get the full evaluation: near the text front, near the image front (rows with an image
    number only), or a `checkpoint` reference."""
    keep = keep_near_front(df, margin=margin)
    if "safety_image" in df.columns and df["safety_image"].notna().any():
        has = df["safety_image"].notna().to_numpy()
        image = np.zeros(len(df), bool)
        image[has] = keep_near_front(df[has], margin=margin, safety="safety_image")
        keep |= image
    if "method" in df.columns:
        keep |= (df["method"] == "checkpoint").to_numpy()
    return keep


def staged_rows(points: Sequence[Any], cfg: EvalConfig, run: Callable[[Sequence[Any], EvalConfig], Rows]) -> Rows:
    """Every point's row, each with `stage`. `run(points, single_mode_cfg)` builds (if needed) and evaluates points,
    returning their rows in order. A fast or full config runs once; a two-stage one screens all points, then runs
    the full evaluation on those `screen_keep` picks and uses its numbers for them."""
    if cfg.mode != "two-stage":
        return [{**r, "stage": stage_of(cfg)} for r in run(points, cfg)]
    screened = run(points, cfg.stage_config("screen"))
    keep = screen_keep(pd.DataFrame(screened), margin=(cfg.keep or KeepSettings()).margin)
    picked = [p for p, k in zip(points, keep) if k]
    full = iter(run(picked, cfg.stage_config("full")))
    return [{**next(full), "stage": "full"} if k else {**r, "stage": "screen"} for r, k in zip(screened, keep)]
