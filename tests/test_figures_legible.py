"""Figures stay legible with many checkpoints. `vlsafe probe`'s (the demo passes 8 views: 5 checkpoints, 3 with
an image): every checkpoint gets its own panel, the cosine figure keeps the pairs with the reference, and
constrained layout never collapses an axis (matplotlib warns when it does; here that warning is an error).
The weight-shift heatmap names PRE once and says which POSTs it leaves out."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vlsafe.analysis.figures import save_figure
from vlsafe.probes import figures as F

LABELS = ["llm-base", "llm-aligned", "lvlm", "lvlm+blank", "lvlm-safety-posthoc", "lvlm-safety-posthoc+blank",
          "lvlm-safety-mixed", "lvlm-safety-mixed+blank"]
LAYERS = range(30)


def _save(fig, tmp_path: Path, stem: str) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="constrained_layout not applied")
        save_figure(fig, tmp_path, stem)


@pytest.mark.parametrize("n", [1, 3, 6, 8])
def test_figures_with_n_checkpoints(n: int, tmp_path: Path) -> None:
    labels = LABELS[:n]
    rng = np.random.default_rng(n)
    layers = pd.DataFrame([{"checkpoint": lb, "layer": i, "probe_accuracy": 0.9, "control_accuracy": 0.5}
                           for lb in labels for i in LAYERS])
    curves = pd.DataFrame([{"checkpoint": lb, "layer": i, "pair": p, "cosine_mean": 1 - i / 60, "cosine_std": 0.02}
                           for lb in labels for p in ("N-N", "M-M", "N-M") for i in LAYERS])
    pairs = list(itertools.combinations(labels, 2))
    sim = pd.DataFrame([{"checkpoint_a": a, "checkpoint_b": b, "layer": i, "direction_cosine": 0.9}
                        for a, b in pairs for i in LAYERS])
    proj = {lb: (rng.normal(5, 2, 40), rng.normal(-5, 2, 40)) for lb in labels}

    fig = F.safety_layers_figure(curves, labels, {lb: 12 for lb in labels})
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == labels
    # every column's lowest panel says what its x axis is (6 panels: the first row's last two included)
    cols = min(n, F.PANEL_COLS)
    assert [bool(ax.get_xlabel()) for ax in shown] == [i + cols >= n for i in range(n)]
    _save(fig, tmp_path, "sl")
    fig = F.projection_figure(proj, 17, labels[0], labels)
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == labels
    _save(fig, tmp_path, "proj")
    _save(F.probe_accuracy_figure(layers, labels), tmp_path, "acc")
    if pairs:
        fig = F.similarity_figure(sim, labels)
        drawn = [line.get_label() for line in fig.axes[0].get_lines()]
        if len(pairs) > F.MAX_PAIRS:  # 28 pairs: the 7 with the reference (the first checkpoint)
            assert drawn == [f"{labels[0]} vs {b}" for b in labels[1:]]
        else:
            assert drawn == [f"{a} vs {b}" for a, b in pairs]
        _save(fig, tmp_path, "sim")


def test_weight_heatmap_names_pre_once_and_says_what_it_leaves_out(tmp_path: Path) -> None:
    from vlsafe.analysis.figures import layer_module_heatmap

    posts = [f"step-{i}" for i in range(5)]
    layers = pd.DataFrame([{"checkpoint_a": "llm-aligned-long-name", "checkpoint_b": p, "layer": i, "module": m,
                            "rel_frobenius": 0.001 * (i + 1)} for p in posts for i in LAYERS
                           for m in ("self_attn.q_proj", "mlp.down_proj", "all")])
    fig = layer_module_heatmap(layers)
    assert [ax.get_title() for ax in fig.axes[:4]] == posts[-4:]
    assert fig.get_suptitle() == "change from llm-aligned-long-name (the last 4 of 5)"
    _save(fig, tmp_path, "hm")


def test_patching_heatmap_scale_holds_every_value(tmp_path: Path) -> None:
    """Recovered fractions overshoot 1 and go below 0: the colour scale covers them (a clipped scale drew 1.57
    and 1.0 alike), is centred at 0, and undefined sites are not drawn in a data colour."""
    from vlsafe.experiments.locate_figures import patching_heatmap

    rows = [{"direction": d, "image": "none", "layer": i, "component": c, "recovered": v}
            for d in ("restore", "break") for i in range(6) for c, v in
            (("resid", 0.3 * i), ("attn_out", -0.12 * i), ("mlp_out", np.nan if i == 2 else 0.05))]
    table = pd.DataFrame(rows)                               # resid reaches 1.5, attn_out −0.6
    fig = patching_heatmap(table)
    im = fig.axes[0].get_images()[0]
    lo, hi = im.get_clim()
    assert lo <= -0.6 and hi >= 1.5 and lo == -hi
    assert im.cmap.get_bad()[3] > 0 and tuple(im.cmap.get_bad()[:3]) != tuple(im.cmap(0.5)[:3])
    assert "grey: undefined" in fig.axes[-1].get_ylabel()
    _save(fig, tmp_path, "patching")


def test_signals_panels_say_what_and_in_which_unit(tmp_path: Path) -> None:
    from vlsafe.experiments.locate_figures import signals_figure
    from vlsafe.probes.signals import signal_label

    assert signal_label("patching_attn_out_scene") == ("patching attn_out (scene)", "recovered fraction")
    assert signal_label("image_shift_refusal_noise0") == ("image shift on r̂ (noise0)", "shift · r̂")
    assert signal_label("direction_drift_image")[0] == "refusal-direction drift, image"
    assert signal_label("my_signal") == ("my signal", "")
    cols = ["weight_shift", "weight_cosine_drop", "direction_drift", "patching_resid", "patching_mlp_out_scene",
            "image_shift_refusal_blank", "image_shift_refusal_scene"]
    table = pd.DataFrame({"layer": list(LAYERS), **{c: np.linspace(1e-6, 2e-6, 30) for c in cols}})
    fig = signals_figure(table)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == [signal_label(c)[0] for c in cols]
    assert all(ax.get_ylabel() for ax in shown)
    # 7 panels, 3 a row: the lowest panel of every column has its x tick labels (the 5th and 6th included)
    assert [ax.xaxis.get_tick_params()["labelbottom"] for ax in shown] == [False] * 4 + [True] * 3
    fig.canvas.draw()
    assert all(not ax.yaxis.get_offset_text().get_text() for ax in shown)   # no "1e−6" note over the titles
    _save(fig, tmp_path, "signals")


def _overlaps(a, b, tol: float = 1.0) -> bool:
    return min(a.x1, b.x1) - max(a.x0, b.x0) > tol and min(a.y1, b.y1) - max(a.y0, b.y0) > tol


@pytest.mark.parametrize("which", ["layer_curves", "taskvector"])
def test_two_panel_figures_keep_their_key_off_the_data(which: str, tmp_path: Path) -> None:
    """The checkpoint key of `vlsafe diff`'s two-panel figures sits under the panels (an in-axes legend covered a
    bar of the task-vector cosine and the curves of the layer figure)."""
    from vlsafe.analysis.figures import layer_curves, taskvector_figure

    posts = [f"lvlm-step-{s}" for s in (24, 48, 72, 96)] + ["lvlm"]
    if which == "layer_curves":
        table = pd.DataFrame([{"checkpoint_a": "llm-aligned", "checkpoint_b": p, "layer": i, "module": m,
                               "rel_frobenius": 0.001 * (k + 1) + 1e-5 * i} for k, p in enumerate(posts)
                              for i in LAYERS for m in ("all", "q_proj", "mlp.down_proj")])
        fig, names = layer_curves(table), posts
    else:
        table = pd.DataFrame([{"base": "llm-aligned", "checkpoint_a": "lvlm", "checkpoint_b": "lvlm-safety-posthoc",
                               "mode": "chain", "layer": i, "module": "all", "cosine": -0.01 * (i % 7),
                               "norm_a": 0.6, "norm_b": 0.4} for i in LAYERS])
        fig, names = taskvector_figure(table), ["τ_B: lvlm-safety-posthoc", "τ_A: lvlm − llm-aligned"]
    assert all(ax.get_legend() is None for ax in fig.axes[:1])
    key = fig.legends[0]
    assert [t.get_text() for t in key.get_texts()] == names
    _save(fig, tmp_path, which)
    box = key.get_window_extent()
    assert not any(_overlaps(box, ax.get_window_extent()) for ax in fig.axes)


def test_pareto_front_is_not_drawn_like_the_corrected_intervals() -> None:
    """The front was a grey dashed line like the judge-corrected intervals beside each point; it is solid now."""
    from vlsafe.experiments.report.plots_pareto import pareto

    rows = [{"point": f"p[{i}]", "family": "merge", "stage": "full", "helpfulness": h, "safety": s, "n_harmful": 60,
             "safety_corrected": s - 0.02, "safety_corrected_low": s - 0.1, "safety_corrected_high": s + 0.05}
            for i, (h, s) in enumerate([(0.9, 0.8), (0.95, 0.6), (0.7, 0.9)])]
    fig = pareto(pd.DataFrame(rows))
    front = fig.axes[0].get_lines()[0]
    assert list(front.get_xdata()) == [0.7, 0.9, 0.95] and front.get_linestyle() == "-"
    key = {t.get_text(): h for t, h in zip(fig.axes[0].get_legend().get_texts(),
                                          fig.axes[0].get_legend().legend_handles)}
    assert key["Pareto front"].get_linestyle() == "-"
    assert key["Pareto front"].get_linestyle() != key[next(k for k in key if "corrected" in k)].get_linestyle()


def test_organism_checkpoints_keep_their_colour_in_every_figure() -> None:
    """`vlsafe eval` of all five checkpoints and of the three LVLMs drew lvlm in two colours (by position)."""
    from vlsafe.analysis.figures import checkpoint_colors

    every = checkpoint_colors(["llm-base", "llm-aligned", "lvlm", "lvlm-safety-posthoc", "lvlm-safety-mixed"])
    lvlms = checkpoint_colors(["lvlm", "lvlm-safety-posthoc", "lvlm-safety-mixed"])
    assert all(lvlms[k] == every[k] for k in lvlms) and len(set(every.values())) == 5
    steps = checkpoint_colors(["llm-aligned", *(f"lvlm-step-{s}" for s in (24, 48, 72, 96)), "lvlm"])
    assert steps["lvlm"] == every["lvlm"] and steps["llm-aligned"] == every["llm-aligned"]
    assert len(set(steps.values())) == 6                       # the other labels take colours no one else has
    pairs = checkpoint_colors(["llm-aligned vs lvlm", "lvlm vs lvlm+blank"])  # not organism names: not their colours
    assert not set(pairs.values()) & set(every.values())
    many = checkpoint_colors(["lvlm", *(f"x{i}" for i in range(12))])
    assert many["lvlm"] == every["lvlm"] and len(set(many.values())) == 13


def test_report_figures_leave_the_backend_and_pyplot_alone(tmp_path: Path) -> None:
    """Importing the report switched the process to Agg (`matplotlib.use` at import): a notebook lost its backend.
    Its figures now come from their own Agg canvas, never registered with pyplot."""
    import subprocess
    import sys

    code = ("import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot as plt, pandas as pd\n"
            "from vlsafe.experiments.report import build_report\n"
            "from vlsafe.experiments.report import plots\n"
            "fig = plots.taskvector_cosine(pd.DataFrame({'layer': [0, 1], 'cosine': [0.1, -0.2]}))\n"
            "fig.canvas.draw(); fig.savefig(r'" + str(tmp_path / "tv.png") + "')\n"
            "print(matplotlib.get_backend(), plt.get_fignums())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["svg", "[]"]
    assert (tmp_path / "tv.png").stat().st_size > 1000
