"""Replicate figures: refusal along the adaptation steps (one line per seed, the across-seed min–max band and
mean), and the drop llm-aligned → lvlm against each varied key (one point per seed, mean ± sd)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vlsafe.analysis.figures import PALETTE, new_figure, paper_style, save_figure
from vlsafe.experiments.replicate.tables import drops, varied_keys

PANELS = (("refusal_harmful_text", "text"), ("refusal_harmful_image", "with image"))


def steps_figure(rep: pd.DataFrame) -> Figure | None:
    """Refusal vs stage-2 step per recipe (columns) and input (rows); None without stage-2 checkpoints."""
    traj = rep[rep.stage2_step.notna() & rep.metric.isin([m for m, _ in PANELS])]
    if traj.empty:
        return None
    recipes = list(dict.fromkeys(traj.recipe))
    fig, axes = new_figure(min(2.4 * len(recipes), 10.0), height=3.6, nrows=2, ncols=len(recipes), squeeze=False,
                           sharey=True)
    with paper_style():
        for j, recipe in enumerate(recipes):
            for i, (metric, label) in enumerate(PANELS):
                ax, color = axes[i][j], PALETTE[i]
                g = traj[(traj.recipe == recipe) & (traj.metric == metric)].astype({"stage2_step": float})
                for seed, s in g.groupby("seed"):
                    s = s.sort_values("stage2_step")
                    ax.plot(s.stage2_step, s.rate, color=color, lw=0.6, alpha=0.45)
                band = g.groupby("stage2_step")["rate"].agg(["min", "max", "mean"])
                ax.fill_between(band.index, band["min"], band["max"], color=color, alpha=0.18, lw=0)
                ax.plot(band.index, band["mean"], color=color, lw=1.4, label=f"mean of {g.seed.nunique()} seeds")
                ax.set(ylim=(-0.03, 1.03), xlabel="stage-2 step" if i else "",
                       title=f"{recipe}\n{label}" if i == 0 else label)
                if j == 0:
                    ax.set_ylabel("refusal (harmful)")
                    ax.legend(loc="lower left")
    return fig


def drop_figure(rep: pd.DataFrame, key: str, *, checkpoint: str = "lvlm", table: pd.DataFrame | None = None
                ) -> Figure | None:
    """Drop llm-aligned → `checkpoint` (text and with image) against the values of `key`; the other varied keys'
    combinations are separate series (`table`: `drops(rep)` when already computed). None without such drops."""
    d = drops(rep) if table is None else table
    d = d[d.checkpoint == checkpoint]
    if d.empty:
        return None
    values = list(dict.fromkeys(rep[key]))
    xpos = {v: i for i, v in enumerate(values)}
    others = [k for k in varied_keys(rep) if k != key]
    fig, axes = new_figure("page", height=2.4, ncols=2, sharey=True)
    with paper_style():
        for ax, (metric, label) in zip(axes, (("drop_refusal_text", "text"), ("drop_refusal_image", "with image"))):
            m = d[d.metric == metric]
            groups = m.groupby(others, sort=False) if others else [("", m)]
            for n, (name, g) in enumerate(groups):
                off = (n - (len(groups) - 1) / 2) * 0.12
                x = g[key].map(xpos).to_numpy(dtype=float) + off
                ax.scatter(x + np.linspace(-0.03, 0.03, len(x)), g.rate, s=8, color=PALETTE[n % len(PALETTE)],
                           alpha=0.6, label=", ".join(f"{k}={v}" for k, v in zip(others, np.atleast_1d(name)))
                           or None)
                stat = g.groupby(key, sort=False)["rate"].agg(["mean", "std"])
                ax.errorbar(stat.index.map(xpos).to_numpy(dtype=float) + off, stat["mean"], yerr=stat["std"].fillna(0),
                            fmt="_", ms=10, color=PALETTE[n % len(PALETTE)], capsize=2)
            ax.axhline(0, color="0.6", lw=0.5)
            ax.set_xticks(range(len(values)), [str(v) for v in values])
            ax.set(xlabel=key, title=f"refusal drop llm-aligned → {checkpoint}, {label}")
        axes[0].set_ylabel("drop (fraction of harmful prompts)")
        if others:
            axes[0].legend()
    return fig


def write_figures(rep: pd.DataFrame, out_dir: str | os.PathLike) -> list[Path]:
    """`refusal_steps` and one `drop_<key>` per varied key under `out_dir` (PNG + PDF); returns the paths."""
    written: list[Path] = []
    fig = steps_figure(rep)
    if fig is not None:
        written += save_figure(fig, out_dir, "refusal_steps")
    d = drops(rep)
    for key in varied_keys(rep):
        fig = drop_figure(rep, key, table=d)
        if fig is not None:
            written += save_figure(fig, out_dir, f"drop_{key.replace('.', '_')}")
    return written
