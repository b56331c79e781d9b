"""Figures of `vlsafe locate`: the patching heat-map (layer × component) and the signals on one layer axis."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vlsafe.analysis.figures import new_figure, panel_grid, paper_style
from vlsafe.probes.patching import COMPONENTS



def recovered_scale(values: pd.Series) -> float:
    """The colour limit of the patching heat-map: ±max(1, |recovered|) over the finite values, so no site is drawn
    at a clipped end colour (recoveries overshoot 1 and go below 0)."""
    finite = values.to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    return max(1.0, float(np.abs(finite).max())) if finite.size else 1.0


def patching_heatmap(patching: pd.DataFrame) -> Figure:
    """One panel per (direction, image): recovered fraction, layers down, components across. A diverging scale
    centred at 0 (no recovery; red above, blue below), symmetric and wide enough for every value
    (`recovered_scale`); undefined sites (NaN) grey."""
    import matplotlib

    panels = list(dict.fromkeys(zip(patching["direction"], patching["image"].astype(str))))
    comps = [c for c in COMPONENTS if c in set(patching["component"])]
    layers = sorted(patching["layer"].astype(int).unique())
    fig, axes = new_figure("page" if len(panels) > 1 else "column", height=min(8.0, 1.4 + 0.12 * len(layers)),
                           ncols=len(panels))
    axes = np.atleast_1d(axes)
    lim = recovered_scale(patching["recovered"])
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.8")
    with paper_style():
        for ax, (direction, image) in zip(axes, panels):
            g = patching[(patching["direction"] == direction) & (patching["image"].astype(str) == image)]
            m = g.pivot_table(index="layer", columns="component", values="recovered", dropna=False)
            m = m.reindex(index=layers, columns=comps)
            im = ax.imshow(np.ma.masked_invalid(m.to_numpy(dtype=float)), aspect="auto", vmin=-lim, vmax=lim,
                           cmap=cmap, interpolation="nearest")
            ax.set_xticks(range(len(comps)), comps, rotation=45)
            step = max(1, len(layers) // 12)
            ax.set_yticks(range(len(layers))[::step], layers[::step])
            est = " (attribution estimate)" if "method" in g and (g["method"] == "attribution").any() else ""
            ax.set_title(f"{direction}, {image}{est}")
            ax.set_ylabel("layer")
        undefined = " (grey: undefined)" if patching["recovered"].isna().any() else ""
        fig.colorbar(im, ax=list(axes), label=f"recovered fraction (0 = none, 1 = all){undefined}", shrink=0.9)
    return fig


def signals_figure(signals: pd.DataFrame) -> Figure:
    """Small multiples: every signal column against the layer, one shared x axis; each panel named and its y axis
    in the signal's unit (`vlsafe.probes.signals.signal_label`), tick labels without an offset note."""
    from matplotlib.ticker import FuncFormatter

    from vlsafe.probes.signals import signal_label

    cols = [c for c in signals.columns if c != "layer"]
    fig, axes = panel_grid(max(1, len(cols)), cols=3, row_height=1.35, xlabel="layer", sharey=False)
    with paper_style():
        for ax, col in zip(axes, cols):
            ax.plot(signals["layer"], signals[col], marker="o", markersize=2)
            title, unit = signal_label(col)
            ax.set_title(title)
            ax.set_ylabel(unit)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    return fig
