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
