"""Figures of `vlsafe locate`: the patching heat-map (layer × component) and the signals on one layer axis."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vlsafe.analysis.figures import new_figure, paper_style
from vlsafe.probes.patching import COMPONENTS



def patching_heatmap(patching: pd.DataFrame) -> Figure:
    """One panel per (direction, image): recovered fraction, layers down, components across (NaN = undefined)."""
    panels = list(dict.fromkeys(zip(patching["direction"], patching["image"].astype(str))))
    comps = [c for c in COMPONENTS if c in set(patching["component"])]
    layers = sorted(patching["layer"].astype(int).unique())
    fig, axes = new_figure("page" if len(panels) > 1 else "column", height=min(8.0, 1.4 + 0.12 * len(layers)),
                           ncols=len(panels))
    axes = np.atleast_1d(axes)
    with paper_style():
        for ax, (direction, image) in zip(axes, panels):
            g = patching[(patching["direction"] == direction) & (patching["image"].astype(str) == image)]
            m = g.pivot_table(index="layer", columns="component", values="recovered", dropna=False)
            m = m.reindex(index=layers, columns=comps)
            im = ax.imshow(np.ma.masked_invalid(m.to_numpy(dtype=float)), aspect="auto", vmin=-0.2, vmax=1.0,
                           cmap="magma", interpolation="nearest")
            ax.set_xticks(range(len(comps)), comps, rotation=45)
            step = max(1, len(layers) // 12)
            ax.set_yticks(range(len(layers))[::step], layers[::step])
            est = " (attribution estimate)" if "method" in g and (g["method"] == "attribution").any() else ""
            ax.set_title(f"{direction}, {image}{est}")
            ax.set_ylabel("layer")
        fig.colorbar(im, ax=list(axes), label="recovered fraction", shrink=0.9)
    return fig


def signals_figure(signals: pd.DataFrame) -> Figure:
    """Small multiples: every signal column against the layer, one shared x axis."""
    cols = [c for c in signals.columns if c != "layer"]
    ncols = min(3, max(1, len(cols)))
    nrows = -(-len(cols) // ncols)
    fig, axes = new_figure("page", height=1.3 * nrows + 0.4, nrows=nrows, ncols=ncols, sharex=True, squeeze=False)
    with paper_style():
        for ax, col in zip(axes.flat, cols):
            ax.plot(signals["layer"], signals[col], marker="o", markersize=2)
            ax.set_title(col.replace("_", " "))
        for ax in list(axes.flat)[len(cols):]:
            ax.set_visible(False)
        for ax in axes[-1]:
            ax.set_xlabel("layer")
    return fig
