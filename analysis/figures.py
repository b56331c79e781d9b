"""Paper-style figures: one look for every vlsafe plot, and the weight-space plots themselves.

Public style API (reused by probes and experiments):

>>> from vlsafe.analysis.figures import paper_style, new_figure, save_figure, checkpoint_colors
>>> colors = checkpoint_colors(["llm", "lvlm", "lvlm-safe"])       # stable label -> colour mapping
>>> fig, ax = new_figure("column")                                  # 3.3 in wide (or "page": 6.8 in)
>>> ax.plot(x, y, color=colors["lvlm"])
>>> save_figure(fig, "run/figures", "my_plot")                       # run/figures/my_plot.{png,pdf}

Figures are built on `matplotlib.figure.Figure` directly (no pyplot, no global backend switch), so they
work headless (Agg canvas on save) and in notebooks alike, and never leak open figures.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vlsafe.analysis.runinfo import atomic_path

COLUMN_WIDTH = 3.3  # inches, one column of a two-column paper
PAGE_WIDTH = 6.8  # inches, full text width
DPI = 200
# Okabe–Ito: distinguishable for colour-blind readers and in greyscale print.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")  # yellow last:
# faint on white, used only by the eighth series
PAPER_RC: dict[str, Any] = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "legend.frameon": False, "axes.spines.top": False, "axes.spines.right": False,
    "axes.linewidth": 0.6, "lines.linewidth": 1.2, "lines.markersize": 3, "xtick.major.width": 0.6,
    "ytick.major.width": 0.6, "grid.linewidth": 0.4, "grid.alpha": 0.4, "savefig.dpi": DPI,
    "savefig.bbox": "tight", "savefig.pad_inches": 0.02, "pdf.fonttype": 42, "ps.fonttype": 42,
    "image.cmap": "magma", "axes.prop_cycle": matplotlib.cycler(color=list(PALETTE)),
}
MODULE_COLORS = {"q_proj": PALETTE[0], "k_proj": PALETTE[5], "v_proj": PALETTE[2], "o_proj": PALETTE[3],
                 "mlp.gate_proj": PALETTE[4], "mlp.up_proj": PALETTE[1], "mlp.down_proj": PALETTE[6]}


@contextlib.contextmanager
def paper_style() -> Iterator[dict[str, Any]]:
    """Context in which matplotlib uses the vlsafe paper rc (small fonts, thin lines, Okabe–Ito colours)."""
    with matplotlib.rc_context(PAPER_RC):
        yield PAPER_RC


def _width(width: str | float) -> float:
    return {"column": COLUMN_WIDTH, "page": PAGE_WIDTH}.get(width, width) if isinstance(width, str) else width


def new_figure(width: str | float = "column", *, height: float | None = None, nrows: int = 1, ncols: int = 1,
               **subplot_kw: Any) -> tuple[Figure, Any]:
    """A constrained-layout Figure in paper style; `width` is "column" (3.3 in), "page" (6.8 in) or inches."""
    w = _width(width)
    with paper_style():
        fig = Figure(figsize=(w, height or w * 0.68), layout="constrained")
        axes = fig.subplots(nrows, ncols, **subplot_kw)
    return fig, axes


def agg_figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1,
               **subplot_kw: Any) -> tuple[Figure, Any]:
    """`plt.subplots` without pyplot: a constrained-layout Figure on its own Agg canvas (drawable, measurable and
    savable in any format), never registered with pyplot and without switching the process's backend, so a notebook
    keeps its own and nothing is left open."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **subplot_kw)


def legend_outside(ax: Any, n: int, **kw: Any) -> Any:
    """A legend to the right of the axes, out of the data (two columns past 12 entries); `n` is the entry count."""
    return ax.legend(ncol=2 if n > 12 else 1, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, **kw)


def panel_grid(n: int, *, cols: int, row_height: float, xlabel: str,
               sharey: bool = True) -> tuple[Figure, np.ndarray]:
    """`n` small multiples, at most `cols` per row, a shared x axis (and y axis with `sharey`), unused panels hidden;
    the lowest visible panel of each column carries the x tick labels and `xlabel`. Returns the `n` axes."""
    cols, rows = max(1, min(n, cols)), max(1, -(-n // cols))
    fig, axes = new_figure("page" if cols > 1 else "column", height=row_height * rows, nrows=rows, ncols=cols,
                           sharex=True, sharey=sharey, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_visible(False)
        elif i + cols >= n:  # nothing visible below it
            ax.tick_params(labelbottom=True)
            ax.set_xlabel(xlabel)
    return fig, axes.flat[:n]


def legend_below(fig: Figure, ax: Any) -> Any:
    """`ax`'s legend under the figure's panels (constrained layout makes room), out of every panel's data; up to
    three entries a row."""
    handles, labels = ax.get_legend_handles_labels()
    return fig.legend(handles, labels, loc="outside lower center", ncols=min(3, max(1, len(labels))),
                      frameon=False) if handles else None


# The model organism's checkpoints keep one colour in every figure, whichever others a figure shows (`vlsafe eval`
# of the LVLMs alone colours them as the eval of all five does).
ORGANISM_COLORS = {"llm-aligned": PALETTE[0], "lvlm": PALETTE[1], "lvlm-safety-posthoc": PALETTE[2],
                   "lvlm-safety-mixed": PALETTE[3], "llm-base": PALETTE[6]}


def checkpoint_colors(labels: Sequence[str]) -> dict[str, str]:
    """A colour per checkpoint label: the organism's checkpoints their fixed `ORGANISM_COLORS`, the other labels
    the remaining palette colours by position (the same list gives the same colours everywhere; see below for the
    order), then viridis shades when there are more of them than colours left."""
    labels = list(dict.fromkeys(labels))
    fixed = {lb: ORGANISM_COLORS[lb] for lb in labels if lb in ORGANISM_COLORS}
    rest = [lb for lb in labels if lb not in fixed]
    # other labels: the colours no organism checkpoint owns first (so blue never means llm-aligned in one panel
    # and a pair in the next), then the organism's unused ones, the faint yellow last
    reserved = set(ORGANISM_COLORS.values())
    free = sorted((c for c in PALETTE if c not in fixed.values()), key=lambda c: (c == PALETTE[7], c in reserved))
    if len(rest) <= len(free):
        return {lb: fixed.get(lb) or free[rest.index(lb)] for lb in labels}
    cmap = matplotlib.colormaps["viridis"]
    shades = {lb: matplotlib.colors.to_hex(cmap(i / max(1, len(rest) - 1))) for i, lb in enumerate(rest)}
    return {lb: fixed.get(lb) or shades[lb] for lb in labels}


def save_figure(fig: Figure, out_dir: str | os.PathLike, stem: str, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write `out_dir/stem.{png,pdf}` atomically (PNG at 200 dpi, vector PDF); returns the paths."""
    out = []
    with paper_style():
        for fmt in formats:
            path = Path(out_dir) / f"{stem}.{fmt}"
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=DPI)
            out.append(path)
    return out


def module_columns(modules: Sequence[str]) -> list[str]:
    """Modules in model order (`layergroups.MODULE_ORDER`), others sorted after them, `all` last."""
    from vlsafe.analysis.layergroups import MODULE_ORDER

    present = [m for m in MODULE_ORDER if m in modules]
    rest = sorted(m for m in modules if m not in MODULE_ORDER and m != "all")
    return present + rest + (["all"] if "all" in modules else [])


def _matrix(layers: pd.DataFrame, value: str) -> tuple[np.ndarray, list[int], list[str]]:
    sub = layers.dropna(subset=["layer"])
    cols = module_columns(sub["module"].unique().tolist())
    rows = sorted(int(x) for x in sub["layer"].unique())
    grid = sub.pivot_table(index="layer", columns="module", values=value, aggfunc="first")
    grid = grid.reindex(index=rows, columns=cols).astype(float)
    return np.ma.masked_invalid(grid.to_numpy()), rows, cols


def short_module(module: str) -> str:
    """The short name figures show: `mlp.gate_proj` → `gate`, `input_layernorm` → `ln1`."""
    return module.removeprefix("mlp.").replace("_proj", "").replace("input_layernorm", "ln1") \
        .replace("post_attention_layernorm", "ln2")


def layer_module_heatmap(layers: pd.DataFrame, value: str = "rel_frobenius", max_panels: int = 4) -> Figure:
    """Layer × module heatmap of `value`, one panel per POST (the last `max_panels`, said in the title when some
    are left out), shared colour scale; PRE in the figure title, POST over each panel."""
    every = list(dict.fromkeys(layers["checkpoint_b"]))
    posts = every[-max_panels:]
    mats = [_matrix(layers[layers["checkpoint_b"] == p], value) for p in posts]
    vmax = max((float(m.max()) for m, _, _ in mats if m.count()), default=1.0) or 1.0
    n_layers = max(len(r) for _, r, _ in mats)
    fig, axes = new_figure("page" if len(posts) > 1 else "column", height=min(8.0, 1.2 + 0.12 * n_layers),
                           ncols=len(posts))
    axes = np.atleast_1d(axes)
    with paper_style():
        for ax, post, (m, rows, cols) in zip(axes, posts, mats):
            im = ax.imshow(m, aspect="auto", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_xticks(range(len(cols)), [short_module(c) for c in cols], rotation=90)
            ax.set_yticks(range(len(rows))[:: max(1, len(rows) // 12)], rows[:: max(1, len(rows) // 12)])
            ax.set_title(post)
            ax.set_ylabel("layer")
        fig.colorbar(im, ax=list(axes), label=value.replace("_", " "), shrink=0.9)
        more = f" (the last {len(posts)} of {len(every)})" if len(posts) < len(every) else ""
        fig.suptitle(f"change from {layers['checkpoint_a'].iloc[0]}{more}", fontsize=8)
    return fig


def layer_curves(layers: pd.DataFrame, value: str = "rel_frobenius", labels: Sequence[str] | None = None) -> Figure:
    """Left: `value` per layer (module=all), one line per POST. Right: per module, for the last POST."""
    labels = list(labels) if labels else [layers["checkpoint_a"].iloc[0], *dict.fromkeys(layers["checkpoint_b"])]
    colors = checkpoint_colors(labels)
    fig, (ax1, ax2) = new_figure("page", height=2.3, ncols=2)
    with paper_style():
        allrows = layers[layers["module"] == "all"]
        for post, g in allrows.groupby("checkpoint_b", sort=False):
            ax1.plot(g["layer"].astype(int), g[value], marker="o", color=colors.get(post), label=post)
        ax1.set(xlabel="layer", ylabel=value.replace("_", " "), title="all modules")
        legend_below(fig, ax1)
        last = layers[(layers["checkpoint_b"] == layers["checkpoint_b"].iloc[-1]) & layers["layer"].notna()]
        for module, g in last[last["module"].isin(MODULE_COLORS)].groupby("module", sort=False):
            ax2.plot(g["layer"].astype(int), g[value], color=MODULE_COLORS[module], label=short_module(module))
        ax2.set(xlabel="layer", title=f"per module ({layers['checkpoint_b'].iloc[-1]})")
        ax2.legend(ncols=2)
    return fig


def taskvector_figure(tv_layers: pd.DataFrame, labels: Sequence[str] | None = None) -> Figure:
    """Left: cos(τ_A, τ_B) per layer (bars; one series per POST). Right: ‖τ_A‖ and ‖τ_B‖ per layer.

    `labels` (PRE first, then the POSTs) fixes the colours so they match `layer_curves`.
    """
    allrows = tv_layers[tv_layers["module"] == "all"]
    groups = list(allrows.groupby(["checkpoint_a", "checkpoint_b"], sort=False))
    default = [groups[0][0][0], *(k[1] for k, _ in groups)] if groups else []
    colors = checkpoint_colors(labels or default)
    fig, (ax1, ax2) = new_figure("page", height=2.3, ncols=2)
    with paper_style():
        width = 0.8 / max(1, len(groups))
        for i, ((ca, cb), g) in enumerate(groups):
            x = g["layer"].astype(int).to_numpy() + (i - (len(groups) - 1) / 2) * width
            ax1.bar(x, g["cosine"], width=width, color=colors.get(cb))
            ax2.plot(g["layer"].astype(int), g["norm_b"], marker="o", color=colors.get(cb), label=f"τ_B: {cb}")
        if groups:
            (ca, _), g0 = groups[0]
            ax2.plot(g0["layer"].astype(int), g0["norm_a"], marker="s", color="0.4", ls="--",
                     label=f"τ_A: {ca} − {g0['base'].iloc[0]}")
        ax1.axhline(0.0, color="0.3", lw=0.6)
        mode = tv_layers["mode"].iloc[0] if len(tv_layers) else ""
        ax1.set(xlabel="layer", ylabel="cos(τ_A, τ_B)", title=f"task-vector cosine ({mode})")
        ax2.set(xlabel="layer", ylabel="norm", title="task-vector norms")
        legend_below(fig, ax2)  # one key for both panels: a POST's bars (left) and line (right) share its colour
    return fig


def dynamics_figure(dyn: pd.DataFrame, value: str = "rel_frobenius") -> Figure:
    """`value` vs step (or checkpoint index) per layer, coloured by depth; embed/head dashed grey."""
    use_step = dyn["step"].notna().all() and len(dyn)
    xcol = "step" if use_step else "index"
    fig, ax = new_figure("column", height=2.4)
    with paper_style():
        layers = dyn.dropna(subset=["layer"])
        n = max(1, int(layers["layer"].max()) + 1) if len(layers) else 1
        cmap = matplotlib.colormaps["viridis"]
        for layer, g in layers.groupby("layer"):
            ax.plot(g[xcol].astype(float), g[value], color=cmap(int(layer) / max(1, n - 1)), lw=0.9, marker=".")
        for (module, g), ls in zip(dyn[dyn["layer"].isna()].groupby("module"), ("--", ":", "-.", (0, (5, 1)))):
            ax.plot(g[xcol].astype(float), g[value], color="0.45", ls=ls, lw=0.9, label=module)
        sm = matplotlib.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(0, max(1, n - 1)))
        fig.colorbar(sm, ax=ax, label="layer")
        ax.set(xlabel=xcol, ylabel=value.replace("_", " "), title="shift from the first checkpoint")
        if dyn["layer"].isna().any():
            ax.legend()
        ticks = dyn.drop_duplicates("index")
        if len(ticks) <= 12:
            ax.set_xticks(ticks[xcol].astype(float).tolist())
    return fig

