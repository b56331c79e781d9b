"""Report figures drawn from tidy tables; every function returns a matplotlib Figure or None.

Each takes the DataFrames of a run's tables and tolerates missing optional columns, so the report works for
any run directory. The paper style comes from `vlsafe.analysis.figures` when available.
"""

from __future__ import annotations

import re
from typing import Any

import matplotlib.pyplot as plt  # types and tickers only: figures come from `agg_figure`, not pyplot
import pandas as pd

from vlsafe.analysis.figures import agg_figure, legend_outside, module_columns, short_module
from vlsafe.experiments.report.plots_pareto import pareto, pareto_front  # noqa: F401  (re-exported)
from vlsafe.experiments.report.roles import Roles, checkpoint_roles, image_variant
from vlsafe.probes.figures import PAIR_STYLE, pair_label

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
    """A legend outside the data, to the right of the axes (two columns when there are many entries)."""
    legend_outside(ax, n, fontsize=6)


def _figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] = WIDE, **kw: Any) -> tuple[Any, Any]:
    """A constrained-layout figure (room is made for legends outside the axes)."""
    return agg_figure(figsize, nrows, ncols, **kw)


def _layer_rows(df: pd.DataFrame) -> pd.DataFrame:
    d = df[pd.to_numeric(df["layer"], errors="coerce").notna()].copy()
    d["layer"] = d["layer"].astype(float).astype(int)
    return d


def heatmap_pivot(layers: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Module × layer matrix of relative Frobenius change for the last POST of diff `layers.csv`, and the pair
    it shows (`A → B`, empty when the table does not name checkpoints)."""
    d = _layer_rows(layers)
    d = d[d["module"] != "all"]
    pair = ""
    if "checkpoint_b" in d.columns and len(d):
        d = d[d["checkpoint_b"] == d["checkpoint_b"].iloc[-1]]
        pair = f"{d['checkpoint_a'].iloc[0]} → " * ("checkpoint_a" in d.columns) + str(d["checkpoint_b"].iloc[0])
    pivot = d.pivot_table(index="module", columns="layer", values="rel_frobenius", aggfunc="mean")
    return pivot.reindex(module_columns(list(pivot.index))), pair


def weight_heatmap(layers: pd.DataFrame) -> plt.Figure | None:
    """Module × layer heatmap of relative Frobenius change (diff `layers.csv`): modules in model order with the
    short names of `vlsafe diff`'s heatmap, the colour scale from 0; the image has SVG id `heatmap-weight` for the
    per-cell tooltips."""
    pivot, pair = heatmap_pivot(layers)
    if pivot.empty:
        return None
    fig, ax = _figure(figsize=(6.8, 0.25 * len(pivot) + 1.4))
    im = ax.imshow(pivot.values, aspect="auto", cmap="magma", vmin=0.0, gid="heatmap-weight")
    ax.set_yticks(range(len(pivot)), [short_module(m) for m in pivot.index], fontsize=7)
    step = max(1, len(pivot.columns) // 16)
    ax.set_xticks(range(0, len(pivot.columns), step), pivot.columns[::step], fontsize=7)
    ax.set_xlabel("layer")
    if pair:
        ax.set_title(f"weight shift {pair}", fontsize=8)
    fig.colorbar(im, ax=ax, label="‖ΔW‖ / ‖W₀‖ (Frobenius)")
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
    fig, axes = _figure(1, len(panels), figsize=WIDE, squeeze=False)
    for ax, (kind, d) in zip(axes[0], panels):
        if kind == "metric":
            for name, g in d.sort_values("step").groupby("metric"):
                ax.plot(g["step"], g["value"], marker="o", label=str(name).replace("_", " "))
                if {"ci_low", "ci_high"} <= set(g.columns):
                    ax.fill_between(g["step"], g["ci_low"], g["ci_high"], alpha=0.15)
            ax.set_ylabel("rate")
            _legend(ax, len(ax.lines))
        else:
            ax.plot(d["step"], d["shift"], marker="o", color="k")
            ax.set_ylabel("mean rel. weight shift")
            ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.3g}"))
        steps = sorted(d["step"].dropna().unique())
        if len(steps) <= 12:  # ticks at the checkpoints
            ax.set_xticks(steps, [f"{s:g}" for s in steps])
        ax.set_xlabel("adaptation step")
    return fig


def taskvector_cosine(tv: pd.DataFrame) -> plt.Figure | None:
    """cos(τ_VL, τ_safety) per layer (the `cosine` column of `taskvectors.csv`): near zero or negative =
    divergent objectives."""
    d = _layer_rows(tv)
    if d.empty:
        return None
    if "module" in d.columns and (d["module"] == "all").any():
        d = d[d["module"] == "all"]
    pair = ""
    if {"checkpoint_a", "checkpoint_b", "base"} <= set(d.columns) and len(d):
        a, b, base = (str(d.iloc[0][c]) for c in ("checkpoint_a", "checkpoint_b", "base"))
        chain = "mode" in d.columns and d.iloc[0]["mode"] == "chain"   # τ_B from A (chain) or from the base
        pair = f": τ_A = {a} − {base}, τ_B = {b} − {a if chain else base}"
    d = d.groupby("layer", as_index=False)["cosine"].mean()
    fig, ax = _figure(figsize=WIDE)
    ax.bar(d["layer"], d["cosine"], color="0.4")  # one series, not a checkpoint: no checkpoint colour
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(f"task-vector cosine per layer{pair}", fontsize=8, loc="left")
    ax.set_xlabel("layer")
    _int_axis(ax)
    ax.set_ylabel("cos(τ_A, τ_B)")
    return fig


def probe_accuracy(probe: pd.DataFrame) -> plt.Figure | None:
    """Linear-probe accuracy per layer per checkpoint, with the shuffled-label control dashed."""
    d = _layer_rows(probe)
    if d.empty:
        return None
    labels = list(dict.fromkeys(d["checkpoint"].astype(str)))
    colors = _colors(labels)
    fig, ax = _figure(figsize=WIDE)
    for lab in labels:
        g = d[d["checkpoint"].astype(str) == lab].groupby("layer", as_index=False).mean(numeric_only=True)
        ax.plot(g["layer"], g["probe_accuracy"], color=colors[lab], label=lab)
        if "control_accuracy" in g.columns:
            ax.plot(g["layer"], g["control_accuracy"], color=colors[lab], ls="--", lw=0.8)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_title("harmful vs harmless linear probe (dashed: shuffled-label control; grey: chance)", fontsize=8,
                 loc="left")
    ax.set_xlabel("layer")
    _int_axis(ax)
    ax.set_ylabel("probe accuracy")
    _legend(ax, len(labels))
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
    fig, ax = _figure(figsize=WIDE)
    groups = list(d.groupby(["checkpoint_a", "checkpoint_b"]))
    for (a, b), g in groups:
        g = g.groupby("layer", as_index=False)["direction_cosine"].mean()
        ax.plot(g["layer"], g["direction_cosine"], marker=".", label=f"{a} vs {b}")
    ax.set_xlabel("layer")
    _int_axis(ax)
    ax.set_ylabel("cosine of directions")
    _legend(ax, len(groups))
    return fig


PAIR_COLORS = {"N-N": "#0072B2", "M-M": "#009E73", "N-M": "#D55E00"}


def safety_layer_curves(sl: pd.DataFrame) -> plt.Figure | None:
    """Li et al. cosine curves as small multiples: one panel per checkpoint (titled with it), N–N, M–M and N–M
    last-token cosine per layer in each, shared axes, one legend above the panels."""
    d = _layer_rows(sl)
    val = next((c for c in ("cosine_mean", "mean", "cosine") if c in d.columns), None)
    if val is None or d.empty:
        return None
    if "checkpoint" not in d.columns:
        d = d.assign(checkpoint="")
    ckpts = list(dict.fromkeys(d["checkpoint"].astype(str)))
    ncols = min(4, len(ckpts))
    nrows = -(-len(ckpts) // ncols)
    fig, axes = _figure(nrows, ncols, figsize=(6.8, 0.4 + 1.45 * nrows), sharex=True, sharey=True, squeeze=False)
    for ax, ck in zip(axes.flat, ckpts):
        g = d[d["checkpoint"].astype(str) == ck]
        for pair, gp in g.groupby("pair", sort=False):
            gp = gp.groupby("layer", as_index=False)[val].mean()
            ax.plot(gp["layer"], gp[val], color=PAIR_COLORS.get(str(pair)), lw=1.0, ls=PAIR_STYLE.get(str(pair), "-"),
                    label=pair_label(str(pair)))
        ax.set_title(ck, fontsize=7)
        ax.tick_params(labelsize=6)
        _int_axis(ax)
    for ax in list(axes.flat)[len(ckpts):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("layer", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("cosine", fontsize=7)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncol=len(labels), fontsize=7, frameon=False)
    return fig


def _pick(d: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    keep = [n for n in names if n in set(d["checkpoint"].astype(str))]
    return d[d["checkpoint"].astype(str).isin(keep)] if keep else d


def _sim_pairs(sim: pd.DataFrame, roles: Roles) -> list[tuple[str, str]]:
    """The direction-shift pairs the linked view shows: reference vs adapted model, and the adapted model
    without vs with an image; all pairs when the roles are unknown."""
    s = _layer_rows(sim)
    have = set(zip(s["checkpoint_a"].astype(str), s["checkpoint_b"].astype(str)))
    names = list(dict.fromkeys([*s["checkpoint_a"].astype(str), *s["checkpoint_b"].astype(str)]))
    want = [(roles.ref, roles.final)]
    if roles.final and (img := image_variant(roles.final, names)):
        want.append((roles.final, img))
    pairs = [p if p in have else (p[1], p[0]) for p in want if p in have or (p[1], p[0]) in have]
    return pairs or sorted(have)


def linked_layer_view(diff: pd.DataFrame | None, sim: pd.DataFrame | None, probe: pd.DataFrame | None, *,
                      roles: Roles | None = None) -> plt.Figure | None:
    """Weight shift, direction shift (1 − cos) and probe accuracy stacked on one shared layer axis; each panel
    is titled with the checkpoints it compares (`roles`: reference and adapted model, and its image variant)."""
    roles = roles or checkpoint_roles(diff=diff, probe=probe, sim=sim)
    panels: list[tuple[str, str, pd.DataFrame, str]] = []
    if diff is not None:
        d = _layer_rows(diff)
        d = d[d["module"] == "all"] if (d["module"] == "all").any() else d
        title = "weight shift"
        if "checkpoint_b" in d.columns and len(d):
            post = roles.final if roles.final in set(d["checkpoint_b"].astype(str)) else d["checkpoint_b"].iloc[-1]
            d = d[d["checkpoint_b"].astype(str) == str(post)]
            title += f": {d['checkpoint_a'].iloc[0]} → {post}" if "checkpoint_a" in d.columns else f": {post}"
        panels.append((title, "rel. Frobenius", d.groupby("layer", as_index=False)["rel_frobenius"].mean(),
                       "rel_frobenius"))
    if sim is not None:
        s, pairs = _layer_rows(sim), _sim_pairs(sim, roles)
        rows = [g.groupby("layer", as_index=False)["direction_cosine"].mean().assign(checkpoint=f"{a} vs {b}")
                for a, b in pairs if not (g := s[(s["checkpoint_a"].astype(str) == a)
                                                    & (s["checkpoint_b"].astype(str) == b)]).empty]
        shift = pd.concat(rows, ignore_index=True)
        panels.append(("direction shift: " + "; ".join(f"{a} vs {b}" for a, b in pairs), "1 − cos",
                       shift.assign(shift=1 - shift["direction_cosine"]), "shift"))
    if probe is not None:
        names = list(dict.fromkeys(_layer_rows(probe)["checkpoint"].astype(str)))
        want = [n for n in (roles.ref, roles.final) if n] + ([v] if roles.final and (
            v := image_variant(roles.final, names)) else [])
        p = _pick(_layer_rows(probe), want)
        panels.append(("probe accuracy: " + ", ".join(dict.fromkeys(p["checkpoint"].astype(str))), "accuracy", p,
                       "probe_accuracy"))
    if len(panels) < 2:
        return None
    fig, axes = _figure(len(panels), 1, figsize=(6.8, 1.75 * len(panels)), sharex=True)
    for ax, (title, label, d, col) in zip(axes, panels):
        if "checkpoint" in d.columns:
            colors = _colors(list(dict.fromkeys(d["checkpoint"].astype(str))))
            for lab, g in d.groupby(d["checkpoint"].astype(str), sort=False):
                g = g.groupby("layer", as_index=False)[col].mean()
                ax.plot(g["layer"], g[col], color=colors[lab], label=lab, marker=".")
            _legend(ax, len(colors))
        else:
            ax.plot(d["layer"], d[col], color="k", marker=".")
        ax.set_title(title, fontsize=7, loc="left")
        ax.set_ylabel(label, fontsize=7)
    axes[-1].set_xlabel("layer (language model)")
    _int_axis(axes[-1])
    return fig
