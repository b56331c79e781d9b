"""Report figures drawn from tidy tables; every function returns a matplotlib Figure or None.

Each takes the DataFrames of a run's tables and tolerates missing optional columns, so the report works for
any run directory. The paper style comes from `vlsafe.analysis.figures` when available.
"""

from __future__ import annotations

import re
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

_STEP = re.compile(r"step[-_]?(\d+)")
WIDE = (6.8, 2.8)


def _colors(labels: list[str]) -> dict[str, Any]:
    try:
        from vlsafe.analysis.figures import checkpoint_colors

        return dict(checkpoint_colors(labels))
    except (ImportError, AttributeError, TypeError):
        cmap = plt.get_cmap("tab10")
        return {lab: cmap(i % 10) for i, lab in enumerate(labels)}


def _step(name: str) -> int | None:
    m = _STEP.search(str(name))
    return int(m.group(1)) if m else None


def _metric_values(m: pd.DataFrame) -> pd.DataFrame:
    """Organism metrics with the rate in a `value` column (files may call it `rate`)."""
    return m if "value" in m.columns else m.rename(columns={"rate": "value"})


def _int_axis(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(ax: Any, n: int) -> None:
    """A legend that stays readable: outside the axes and in columns when there are many entries."""
    if n > 8:
        ax.legend(fontsize=5, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        ax.legend(fontsize=6)


def _layer_rows(df: pd.DataFrame) -> pd.DataFrame:
    d = df[pd.to_numeric(df["layer"], errors="coerce").notna()].copy()
    d["layer"] = d["layer"].astype(float).astype(int)
    return d


def weight_heatmap(layers: pd.DataFrame) -> plt.Figure | None:
    """Layer × module heatmap of relative Frobenius change (diff `layers.csv`)."""
    d = _layer_rows(layers)
    d = d[d["module"] != "all"]
    if d.empty:
        return None
    if "checkpoint_b" in d.columns:
        d = d[d["checkpoint_b"] == d["checkpoint_b"].iloc[-1]]
    pivot = d.pivot_table(index="module", columns="layer", values="rel_frobenius", aggfunc="mean")
    fig, ax = plt.subplots(figsize=(6.8, 0.25 * len(pivot) + 1.2))
    im = ax.imshow(pivot.values, aspect="auto", cmap="magma")
    ax.set_yticks(range(len(pivot)), pivot.index, fontsize=7)
    ax.set_xticks(range(len(pivot.columns)), pivot.columns, fontsize=6)
    ax.set_xlabel("layer")
    fig.colorbar(im, ax=ax, label=r"$\|\Delta W\|_F / \|W_0\|_F$")
    fig.tight_layout()
    return fig


def dynamics(metrics: pd.DataFrame | None, dyn: pd.DataFrame | None) -> plt.Figure | None:
    """Figure-2 style: safety metrics and weight shift as a function of adaptation step."""
    panels = []
    if metrics is not None and {"checkpoint", "metric"} <= set(metrics.columns):
        m = _metric_values(metrics)
        steps = m["stage2_step"] if "stage2_step" in m.columns else m["checkpoint"].map(_step)
        m = m.assign(step=pd.to_numeric(steps, errors="coerce")).dropna(subset=["step"])
        if not m.empty:
            panels.append(("metric", m))
    if dyn is not None and {"layer", "step"} <= set(dyn.columns):
        val = next((c for c in ("rel_frobenius", "shift", "value") if c in dyn.columns), None)
        d = dyn.assign(step=pd.to_numeric(dyn["step"], errors="coerce"))
        if d["step"].isna().all() and "index" in d.columns:  # names without step numbers: checkpoint order
            d = d.assign(step=d["index"])
        d = d[pd.to_numeric(d["layer"], errors="coerce").notna()]  # transformer layers only
        if val and not d.dropna(subset=["step"]).empty:
            panels.append(("dyn", d.groupby("step", as_index=False)[val].mean().rename(columns={val: "shift"})))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=WIDE, squeeze=False)
    for ax, (kind, d) in zip(axes[0], panels):
        if kind == "metric":
            for name, g in d.sort_values("step").groupby("metric"):
                ax.plot(g["step"], g["value"], marker="o", label=name)
                if {"ci_low", "ci_high"} <= set(g.columns):
                    ax.fill_between(g["step"], g["ci_low"], g["ci_high"], alpha=0.15)
            ax.set_ylabel("rate")
            _legend(ax, len(ax.lines))
        else:
            ax.plot(d["step"], d["shift"], marker="o", color="k")
            ax.set_ylabel("mean rel. weight shift")
        ax.set_xlabel("adaptation step")
    fig.tight_layout()
    return fig


def taskvector_cosine(tv: pd.DataFrame) -> plt.Figure | None:
    """cos(τ_VL, τ_safety) per layer (the `cosine` column of `taskvectors.csv`): near zero or negative =
    divergent objectives."""
    d = _layer_rows(tv)
    if d.empty:
        return None
    if "module" in d.columns and (d["module"] == "all").any():
        d = d[d["module"] == "all"]
    d = d.groupby("layer", as_index=False)["cosine"].mean()
    fig, ax = plt.subplots(figsize=WIDE)
    ax.bar(d["layer"], d["cosine"], color=np.where(d["cosine"] < 0, "tab:red", "tab:blue"))
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("layer")
    _int_axis(ax)
    ax.set_ylabel(r"cos($\tau_A$, $\tau_B$)")
    fig.tight_layout()
    return fig


def probe_accuracy(probe: pd.DataFrame) -> plt.Figure | None:
    """Linear-probe accuracy per layer per checkpoint, with the shuffled-label control dashed."""
    d = _layer_rows(probe)
    if d.empty:
        return None
    labels = list(dict.fromkeys(d["checkpoint"].astype(str)))
    colors = _colors(labels)
    fig, ax = plt.subplots(figsize=WIDE)
    for lab in labels:
        g = d[d["checkpoint"].astype(str) == lab].groupby("layer", as_index=False).mean(numeric_only=True)
        ax.plot(g["layer"], g["probe_accuracy"], color=colors[lab], label=lab)
        if "control_accuracy" in g.columns:
            ax.plot(g["layer"], g["control_accuracy"], color=colors[lab], ls="--", lw=0.8)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_xlabel("layer")
    _int_axis(ax)
    ax.set_ylabel("probe accuracy")
    _legend(ax, len(labels))
    fig.tight_layout()
    return fig


def direction_similarity(sim: pd.DataFrame) -> plt.Figure | None:
    """Cosine of the harmful−harmless direction between checkpoints, per layer."""
    d = _layer_rows(sim)
    if d.empty:
        return None
    names = list(dict.fromkeys(d["checkpoint_a"].astype(str)))  # many pairs: keep those against one reference,
    ref = next((n for n in names if "aligned" in n), names[0])   # the aligned LLM when there is one
    pairs = d.groupby(["checkpoint_a", "checkpoint_b"])
    if pairs.ngroups > 8:
        d = d[(d["checkpoint_a"] == ref) | (d["checkpoint_b"] == ref)]
    fig, ax = plt.subplots(figsize=WIDE)
    groups = list(d.groupby(["checkpoint_a", "checkpoint_b"]))
    for (a, b), g in groups:
        g = g.groupby("layer", as_index=False)["direction_cosine"].mean()
        ax.plot(g["layer"], g["direction_cosine"], marker=".", label=f"{a} vs {b}")
    ax.set_xlabel("layer")
    _int_axis(ax)
    ax.set_ylabel("direction cosine")
    _legend(ax, len(groups))
    fig.tight_layout()
    return fig


def safety_layer_curves(sl: pd.DataFrame) -> plt.Figure | None:
    """Li et al. cosine curves: N–N, M–M and N–M last-token cosine per layer."""
    d = _layer_rows(sl)
    val = next((c for c in ("cosine_mean", "mean", "cosine") if c in d.columns), None)
    if val is None or d.empty:
        return None
    groups = ["checkpoint", "pair"] if "checkpoint" in d.columns else ["pair"]
    fig, ax = plt.subplots(figsize=WIDE)
    for key, g in d.groupby(groups):
        g = g.groupby("layer", as_index=False)[val].mean()
        ax.plot(g["layer"], g[val], label=" ".join(map(str, np.atleast_1d(key))))
    ax.set_xlabel("layer")
    _int_axis(ax)
    ax.set_ylabel("cosine of last-token states")
    _legend(ax, len(ax.lines))
    fig.tight_layout()
    return fig


def pareto(p: pd.DataFrame) -> plt.Figure | None:
    """Safety vs helpfulness of every remedy point, Pareto-optimal points joined."""
    if p.empty:
        return None
    fig, ax = plt.subplots(figsize=(3.3, 3.0))
    ax.scatter(p["helpfulness"], p["safety"], s=14, color="grey")
    front = pareto_front(p)
    ax.plot(front["helpfulness"], front["safety"], color="tab:red", marker="o", ms=4)
    lab = next((c for c in ("point", "name", "label") if c in p.columns), None)
    if lab:
        for _, r in front.iterrows():
            ax.annotate(str(r[lab]), (r["helpfulness"], r["safety"]), fontsize=5)
    ax.set_xlabel("helpfulness")
    ax.set_ylabel("safety")
    fig.tight_layout()
    return fig


def pareto_front(p: pd.DataFrame) -> pd.DataFrame:
    """Rows not dominated in (safety, helpfulness), both higher-is-better, sorted by helpfulness."""
    pts = p[["safety", "helpfulness"]].to_numpy(dtype=float)
    keep = [not any((q >= x).all() and (q > x).any() for q in pts) for x in pts]
    return p[keep].sort_values("helpfulness")


def linked_layer_view(diff: pd.DataFrame | None, sim: pd.DataFrame | None,
                      probe: pd.DataFrame | None) -> plt.Figure | None:
    """Weight shift, direction shift (1 − cos) and probe accuracy stacked on one shared layer axis."""
    panels: list[tuple[str, pd.DataFrame, str]] = []
    if diff is not None:
        d = _layer_rows(diff)
        d = d[d["module"] == "all"] if (d["module"] == "all").any() else d
        panels.append(("weight shift\n(rel. Frobenius)", d.groupby("layer", as_index=False)["rel_frobenius"].mean(),
                       "rel_frobenius"))
    if sim is not None:
        s = _layer_rows(sim).groupby("layer", as_index=False)["direction_cosine"].mean()
        panels.append(("direction shift\n(1 − cos)", s.assign(shift=1 - s["direction_cosine"]), "shift"))
    if probe is not None:
        panels.append(("probe accuracy", _layer_rows(probe), "probe_accuracy"))
    if len(panels) < 2:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.8, 1.6 * len(panels)), sharex=True)
    for ax, (label, d, col) in zip(axes, panels):
        if "checkpoint" in d.columns:
            colors = _colors(list(dict.fromkeys(d["checkpoint"].astype(str))))
            for lab, g in d.groupby(d["checkpoint"].astype(str)):
                g = g.groupby("layer", as_index=False)[col].mean()
                ax.plot(g["layer"], g[col], color=colors[lab], label=lab)
            ax.legend(fontsize=5, ncol=3)
        else:
            ax.plot(d["layer"], d[col], color="k", marker=".")
        ax.set_ylabel(label, fontsize=7)
    axes[-1].set_xlabel("layer (language model)")
    _int_axis(axes[-1])
    fig.tight_layout()
    return fig
