"""The report in a real browser: headless Chromium renders it and every figure is visibly drawn.

Needs Debian's `chromium`, which `make test` installs. Outside `make test` it is skipped when absent; under
`make test` (VLSAFE_REQUIRE_CHROMIUM=1, as on CI) a missing browser fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vlsafe.experiments.report import build_report, plots
from vlsafe.experiments.report.discover import discover
from vlsafe.experiments.report.interactive import TIP_CSS, svg_tag
from report_check import CHROMIUM, check_page, chromium, problems
from test_report import _make_run

REQUIRED = os.environ.get("VLSAFE_REQUIRE_CHROMIUM") == "1"
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not REQUIRED,
                                    reason="chromium not installed (make test installs it)")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, np.ndarray]:
    """The planted run's report, measured by the figure check and screenshot, once for this module."""
    assert CHROMIUM is not None, "chromium is required here (VLSAFE_REQUIRE_CHROMIUM=1) but not installed"
    root = tmp_path_factory.mktemp("report")
    _make_run(root)
    page = build_report(root)
    measured = check_page(page, root / "profile")
    shot_png = root / "shot.png"
    chromium(f"--screenshot={shot_png}", page.as_uri(), profile=root / "profile")
    return root, measured, np.asarray(Image.open(shot_png).convert("RGB")).astype(int)


def region_visible(shot: np.ndarray, x: int, y: int, w: int, h: int) -> bool:
    """True when the screenshot region holds a drawn figure: enough ink and contrast, not a blank box. (Figures
    are page-wide vector drawings in paper style, thin lines on white: a drawn line plot inks 1.5-3% of its box, a
    figure that failed to render none.)"""
    crop = shot[y:y + h, x:x + w]
    if crop.size == 0:
        return False
    ink = (crop.min(axis=2) < 200).mean()
    return bool(ink > 0.01 and crop.std() > 15)


@needs_chromium
def test_report_figures_visible_in_chromium(rendered: tuple[Path, dict, np.ndarray]) -> None:
    root, measured, shot = rendered
    figs = measured["figures"]
    assert len(figs) == len(re.findall(r'<svg[^>]* class="figure"', (root / "report.html").read_text())) == 11  # two remedies fronts
    for stem, f in figs.items():
        x, y, w, h = f["rect"]
        assert w > 200 and h > 100, f"{stem} laid out too small ({w}x{h})"
        assert y + h <= shot.shape[0], f"{stem} below the screenshot"
        assert region_visible(shot, x, y, w, h), f"{stem} is blank on screen"
    assert measured["findings_top"] is not None and measured["findings_top"] < 400  # findings on the first screen


@needs_chromium
def test_report_figures_legible_in_chromium(rendered: tuple[Path, dict, np.ndarray]) -> None:
    """For each figure: no two labels overlap, none leaves its figure or (data labels) its axes, no legend lies
    on the data, and the caption names the source table, a table the run lists; hovering shows the tooltips."""
    root, measured, _ = rendered
    listed = {p.relative_to(root).as_posix() for paths in discover(root).paths.values() for p in paths}
    for stem, f in measured["figures"].items():
        assert f["n_texts"] >= 4, f"{stem}: its labels are not SVG text"
        assert problems(f) == [], f"{stem}: {problems(f)}"
        assert set(f["sources"]) <= listed, f"{stem}: caption names {f['sources']}"
    assert measured["tips"]["pareto"].startswith("#1 a\n") and "safety: 90%" in measured["tips"]["pareto"]
    layers = pd.read_csv(root / "diff" / "layers.csv")
    from vlsafe.analysis.figures import module_columns

    module = module_columns([m for m in layers["module"].unique() if m not in ("all", "embed", "norm")])[-1]
    last = layers[(layers["module"] == module) & (layers["layer"] == 5)]["rel_frobenius"].iloc[0]
    head, value = measured["tips"]["heatmap"].rsplit(": ", 1)  # the bottom-right cell: last module, last layer
    assert head.endswith(f"{module}, layer 5\nrel. Frobenius change") and float(value) == pytest.approx(last, rel=1e-3)


def _pareto_table() -> pd.DataFrame:
    """A sweep with many near points and long names and their raw intervals, as in the full demo."""
    rows = [("as-is[ckpt=lvlm]", 0.53, 0.95), ("as-is[ckpt=llm-aligned]", 0.90, 0.90)]
    for a in (0.25, 0.5, 0.75, 1.0):
        rows += [(f"restore-llm[alpha={a},layers=all]", 0.53 + 0.37 * a, 0.95 - 0.05 * a),
                 (f"restore-llm[alpha={a},layers=L10-19]", 0.55 + 0.08 * a, 0.95 - 0.01 * a),
                 (f"restore-llm[alpha={a},layers=top6]", 0.56 + 0.06 * a, 0.94),
                 (f"merge-posthoc[alpha={a},layers=all]", 0.6 + 0.2 * a, 0.93 - 0.01 * a)]
    p = pd.DataFrame(rows, columns=["point", "safety", "helpfulness"])
    return p.assign(safety_ci_low=p["safety"] - 0.11, safety_ci_high=(p["safety"] + 0.08).clip(upper=1.0),
                    helpfulness_ci_low=p["helpfulness"] - 0.09, helpfulness_ci_high=(p["helpfulness"] + 0.04)
                    .clip(upper=1.0))  # Wilson-like intervals at n = 60: the labels must keep clear of the bars


def _naive_pareto(p: pd.DataFrame) -> plt.Figure:
    """The figure as it was: every name printed beside its point."""
    fig, ax = plt.subplots(figsize=(3.3, 3.0))
    ax.scatter(p["helpfulness"], p["safety"], s=14, color="grey")
    for _, r in p.iterrows():
        ax.annotate(r["point"], (r["helpfulness"], r["safety"]), fontsize=5)
    fig.tight_layout()
    return fig


@needs_chromium
def test_overlap_check_fails_on_colliding_labels_and_passes_on_the_fixed_figure(tmp_path: Path) -> None:
    assert CHROMIUM is not None, "chromium is required here (VLSAFE_REQUIRE_CHROMIUM=1) but not installed"
    p = _pareto_table()
    figs = {"naive": _naive_pareto(p), "fixed": plots.pareto(p)}
    body = "".join(f'<figure>{svg_tag(f, stem=stem)}<figcaption>{stem}. <span class="source">Source: '
                   f"<code>sweep/pareto.csv</code>.</span></figcaption></figure>" for stem, f in figs.items())
    for f in figs.values():
        plt.close(f)
    page = tmp_path / "planted.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><style>{TIP_CSS}</style></head>"
                    f"<body style='max-width:1000px'>{body}</body></html>")
    measured = check_page(page, tmp_path / "profile")["figures"]
    assert any(m.startswith("labels overlap") for m in problems(measured["naive"]))
    assert problems(measured["fixed"]) == []
    assert sum(1 for t in range(1, len(p) + 1) if f"pareto-pt-{t}" in page.read_text()) == len(p)


def test_region_visible_tells_blank_from_drawn() -> None:
    img = np.full((200, 300, 3), 255, int)
    assert not region_visible(img, 0, 0, 300, 200)
    img[50:150, 20:280] = 30
    img[60:140, 30:270] = 250
    assert region_visible(img, 0, 0, 300, 200)
    stray = np.full((200, 300, 3), 255, int)
    stray[100, :] = 0  # one stray rule across an empty box (0.5% ink) is not a drawn figure
    assert not region_visible(stray, 0, 0, 300, 200)
