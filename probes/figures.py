"""Figures for `vlsafe probe`, in the shared paper style (`vlsafe.analysis.figures`).

Each function takes the tidy tables the probe run writes and returns a matplotlib `Figure`:
probe accuracy per layer per checkpoint, direction cosine across checkpoints, safety-layer cosine curves and
histograms of projections on the reference direction.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vlsafe.analysis.figures import checkpoint_colors, new_figure, paper_style

_PAIR_STYLE = {"N-N": "-", "M-M": "--", "N-M": ":"}


def _last_position(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of one position (the last one listed) when a table has several."""
    if "position" not in df or df["position"].nunique() <= 1:
        return df
    return df[df["position"] == df["position"].iloc[-1]]


def probe_accuracy_figure(layers: pd.DataFrame, labels: Sequence[str]) -> Figure:
    """Probe accuracy (solid) and shuffled-label control (dotted) per layer, one colour per checkpoint."""
    colors = checkpoint_colors(labels)
    fig, ax = new_figure("column")
    with paper_style():
        for label, g in _last_position(layers).groupby("checkpoint", sort=False):
            ax.plot(g["layer"], g["probe_accuracy"], marker="o", color=colors.get(label), label=label)
            ax.plot(g["layer"], g["control_accuracy"], ls=":", color=colors.get(label))
        ax.axhline(0.5, color="0.6", lw=0.5)
        ax.set(xlabel="layer", ylabel="probe accuracy (CV)", ylim=(0.3, 1.02),
               title="harmful vs harmless (dotted: shuffled labels)")
        ax.legend()
    return fig


def similarity_figure(similarity: pd.DataFrame, labels: Sequence[str]) -> Figure:
    """Direction cosine per layer, one line per checkpoint pair (coloured by the second checkpoint)."""
    colors = checkpoint_colors(labels)
    fig, ax = new_figure("column")
    with paper_style():
        for (a, b), g in _last_position(similarity).groupby(["checkpoint_a", "checkpoint_b"], sort=False):
            ax.plot(g["layer"], g["direction_cosine"], marker="o", color=colors.get(b), label=f"{a} vs {b}")
        ax.set(xlabel="layer", ylabel="cosine of directions", ylim=(-0.05, 1.02),
               title="safety direction across checkpoints")
        ax.legend()
    return fig


def safety_layers_figure(curves: pd.DataFrame, labels: Sequence[str], onsets: dict[str, int | None]) -> Figure:
    """N-N / M-M / N-M cosine curves (mean ± std band) per checkpoint; the onset layer is marked."""
    colors = checkpoint_colors(labels)
    present = [lb for lb in labels if lb in set(curves["checkpoint"])]
    fig, axes = new_figure("page" if len(present) > 1 else "column", height=2.3, ncols=max(1, min(len(present), 4)))
    axes = np.atleast_1d(axes)
    with paper_style():
        for ax, label in zip(axes, present[:4]):
            sub = curves[curves["checkpoint"] == label]
            for pair, g in sub.groupby("pair", sort=False):
                ax.plot(g["layer"], g["cosine_mean"], ls=_PAIR_STYLE.get(pair, "-"), color=colors[label], label=pair)
                ax.fill_between(g["layer"], g["cosine_mean"] - g["cosine_std"], g["cosine_mean"] + g["cosine_std"],
                                color=colors[label], alpha=0.12, lw=0)
            if onsets.get(label) is not None:
                ax.axvline(onsets[label], color="0.4", lw=0.6)
            ax.set(xlabel="layer", title=label)
        axes[0].set_ylabel("cosine (last token)")
        axes[0].legend()
    return fig


def projection_figure(projections: dict[str, tuple[np.ndarray, np.ndarray]], layer: int, reference: str,
                      labels: Sequence[str]) -> Figure:
    """Histograms of harmful (filled) and harmless (outline) projections on `reference`'s direction at `layer`."""
    colors = checkpoint_colors(labels)
    fig, ax = new_figure("column")
    with paper_style():
        every = np.concatenate([np.r_[h, b] for h, b in projections.values()])
        bins = np.linspace(float(every.min()), float(every.max()), 30) if every.size else 10
        for label, (h, b) in projections.items():
            ax.hist(h, bins=bins, color=colors.get(label), alpha=0.35, label=f"{label} harmful")
            ax.hist(b, bins=bins, color=colors.get(label), histtype="step", label=f"{label} harmless")
        ax.set(xlabel=f"projection on {reference}'s direction (layer {layer})", ylabel="prompts")
        ax.legend()
    return fig
