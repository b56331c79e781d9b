"""Figures for `vlsafe probe`, in the shared paper style (`vlsafe.analysis.figures`).

Each function takes the tidy tables the probe run writes and returns a matplotlib `Figure`:
probe accuracy per layer per checkpoint, direction cosine across checkpoints, safety-layer cosine curves and
histograms of projections on the reference direction.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vlsafe.analysis.figures import checkpoint_colors, legend_outside, new_figure, panel_grid, paper_style

PAIR_STYLE = {"N-N": "-", "M-M": "--", "N-M": ":"}  # Li et al.'s prompt pairs (safety_layers.PAIR_NAMES)
MAX_PAIRS = 8   # more checkpoint pairs than this: the cosine figure keeps those with the reference checkpoint
PANEL_COLS = 4  # small multiples per row


def _legend(ax: Any, n: int) -> None:
    """Inside the axes for a few entries; to the right of them (a page-wide figure) for more."""
    if n > 3:
        legend_outside(ax, n)
    else:
        ax.legend()


def _panels(n: int, height: float, xlabel: str) -> tuple[Figure, np.ndarray]:
    """`n` panels of one quantity, at most `PANEL_COLS` per row, shared axes (`analysis.figures.panel_grid`)."""
    return panel_grid(n, cols=PANEL_COLS, row_height=height, xlabel=xlabel)


def _last_position(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of one position (the last one listed) when a table has several."""
    if "position" not in df or df["position"].nunique() <= 1:
        return df
    return df[df["position"] == df["position"].iloc[-1]]


def probe_accuracy_figure(layers: pd.DataFrame, labels: Sequence[str]) -> Figure:
    """Probe accuracy (solid) and shuffled-label control (dotted) per layer, one colour per checkpoint."""
    colors = checkpoint_colors(labels)
    groups = list(_last_position(layers).groupby("checkpoint", sort=False))
    fig, ax = new_figure("page" if len(groups) > 3 else "column", height=2.4)
    with paper_style():
        for label, g in groups:
            ax.plot(g["layer"], g["probe_accuracy"], marker="o", color=colors.get(label), label=label)
            ax.plot(g["layer"], g["control_accuracy"], ls=":", color=colors.get(label))
        ax.axhline(0.5, color="0.6", lw=0.5)
        ax.set(xlabel="layer", ylabel="probe accuracy (CV)", ylim=(0.3, 1.02),
               title="harmful vs harmless (dotted: shuffled labels)")
        _legend(ax, len(groups))
    return fig


def similarity_figure(similarity: pd.DataFrame, labels: Sequence[str]) -> Figure:
    """Direction cosine per layer, one line per checkpoint pair (coloured by the second checkpoint); with more
    than `MAX_PAIRS` pairs only those with the first checkpoint of `labels` (the reference, as in the
    projections figure) are drawn."""
    colors = checkpoint_colors(labels)
    pairs = list(_last_position(similarity).groupby(["checkpoint_a", "checkpoint_b"], sort=False))
    title, ref = "safety direction across checkpoints", None
    if len(pairs) > MAX_PAIRS:
        ref = labels[0] if labels else pairs[0][0][0]
        pairs = [(ab, g) for ab, g in pairs if ref in ab]
        title = f"safety direction against {ref}'s"
    fig, ax = new_figure("page" if len(pairs) > 3 else "column", height=2.4)
    with paper_style():
        for (a, b), g in pairs:
            other = a if b == ref else b  # the colour of the checkpoint compared (with the reference, the other one)
            ax.plot(g["layer"], g["direction_cosine"], marker="o", color=colors.get(other), label=f"{a} vs {b}")
        ax.set(xlabel="layer", ylabel="cosine of directions", ylim=(-0.05, 1.02), title=title)
        _legend(ax, len(pairs))
    return fig


def pair_label(pair: str) -> str:
    """`N-M (harmless–harmful)`: a safety-layer pair kind with what it compares."""
    from vlsafe.probes.safety_layers import PAIR_NAMES

    return f"{pair} ({PAIR_NAMES[pair]})" if pair in PAIR_NAMES else str(pair)


def safety_layers_figure(curves: pd.DataFrame, labels: Sequence[str], onsets: dict[str, int | None]) -> Figure:
    """N-N / M-M / N-M cosine curves (mean ± std band), one panel per checkpoint (shared axes, `PANEL_COLS` per
    row); the onset layer is marked."""
    colors = checkpoint_colors(labels)
    present = [lb for lb in labels if lb in set(curves["checkpoint"])]
    fig, axes = _panels(len(present), 2.0, "layer")
    with paper_style():
        for ax, label in zip(axes, present):
            sub = curves[curves["checkpoint"] == label]
            for pair, g in sub.groupby("pair", sort=False):
                ax.plot(g["layer"], g["cosine_mean"], ls=PAIR_STYLE.get(pair, "-"), color=colors[label],
                        label=pair_label(pair))
                ax.fill_between(g["layer"], g["cosine_mean"] - g["cosine_std"], g["cosine_mean"] + g["cosine_std"],
                                color=colors[label], alpha=0.12, lw=0)
            if onsets.get(label) is not None:
                ax.axvline(onsets[label], color="0.4", lw=0.6)
            ax.set_title(label)
        for ax in axes[::PANEL_COLS]:
            ax.set_ylabel("cosine (last token)")
        if len(axes):
            axes[0].legend()
    return fig


def projection_figure(projections: dict[str, tuple[np.ndarray, np.ndarray]], layer: int, reference: str,
                      labels: Sequence[str]) -> Figure:
    """Histograms of harmful (filled) and harmless (outline) projections on `reference`'s direction at `layer`,
    one panel per checkpoint (shared bins and axes, `PANEL_COLS` per row)."""
    colors = checkpoint_colors(labels)
    fig, axes = _panels(len(projections), 1.6, "")
    with paper_style():
        every = np.concatenate([np.r_[h, b] for h, b in projections.values()]) if projections else np.zeros(0)
        bins = np.linspace(float(every.min()), float(every.max()), 30) if every.size else 10
        for ax, (label, (h, b)) in zip(axes, projections.items()):
            ax.hist(h, bins=bins, color=colors.get(label), alpha=0.35, label="harmful")
            ax.hist(b, bins=bins, color=colors.get(label), histtype="step", label="harmless")
            ax.set_title(label)
        for ax in axes[::PANEL_COLS]:
            ax.set_ylabel("prompts")
        if len(axes):
            axes[0].legend()
            fig.supxlabel(f"projection on {reference}'s direction (layer {layer})", fontsize=8)
    return fig
