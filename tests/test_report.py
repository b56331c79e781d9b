"""The HTML report: built from contract-shaped tables, self-contained, every section filled."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.runinfo import write_run_json
from vlsafe.experiments.cli import main
from vlsafe.experiments.report.plots import pareto_front


def _make_run(root: Path) -> None:
    L = 6
    rng = np.random.default_rng(0)
    diff = pd.DataFrame([{"layer": i, "module": m, "rel_frobenius": 0.01 * (i + 1), "cosine": 0.99}
                         for i in range(L) for m in ("q_proj", "mlp.down_proj", "all")])
    (root / "diff").mkdir(parents=True)
    diff.to_csv(root / "diff" / "layers.csv", index=False)
    pd.DataFrame({"layer": range(L), "module": "all", "cos": rng.uniform(-0.2, 0.3, L),
                  "norm_a": 1.0, "norm_b": 2.0}).to_csv(root / "diff" / "taskvectors.csv", index=False)
    pd.DataFrame([{"layer": i, "step": s, "rel_frobenius": 0.001 * s} for i in range(L) for s in (10, 20, 30)]
                 ).to_csv(root / "diff" / "dynamics.csv", index=False)
    (root / "probe").mkdir()
    pd.DataFrame([{"checkpoint": c, "layer": i, "position": -1, "probe_accuracy": 0.5 + 0.08 * i,
                   "probe_auroc": 0.6, "control_accuracy": 0.5, "direction_norm": 1.0}
                  for c in ("llm", "lvlm") for i in range(L)]).to_csv(root / "probe" / "layers.csv", index=False)
    pd.DataFrame({"layer": range(L), "checkpoint_a": "llm", "checkpoint_b": "lvlm",
                  "direction_cosine": np.linspace(0.99, 0.9, L)}).to_csv(root / "probe" / "similarity.csv", index=False)
    pd.DataFrame([{"layer": i, "pair": p, "cosine_mean": v} for i in range(L)
                  for p, v in (("N-N", 0.95), ("M-M", 0.94), ("N-M", 0.9 - 0.05 * i))]
                 ).to_csv(root / "probe" / "safety_layers.csv", index=False)
    (root / "eval").mkdir()
    pd.DataFrame([{"checkpoint": c, "prompt_set": s, "n": 60, "refusal_rate": r, "ci_low": r - 0.1,
                   "ci_high": r + 0.05, "judge": "vlsafe", "category": ""}
                  for c, r in (("llm-aligned", 0.95), ("lvlm", 0.6)) for s in ("harmful-test", "borderline-test")]
                 ).to_csv(root / "eval" / "summary.csv", index=False)
    pd.DataFrame([{"checkpoint": f"lvlm-step-{s}", "metric": "refusal_harmful", "value": 0.9 - s / 100,
                   "ci_low": 0.8 - s / 100, "ci_high": 0.95 - s / 100} for s in (10, 20, 30)]
                 ).to_csv(root / "metrics.csv", index=False)
    (root / "sweep").mkdir()
    pd.DataFrame({"point": ["a", "b", "c"], "safety": [0.9, 0.7, 0.6], "helpfulness": [0.5, 0.8, 0.7]}
                 ).to_csv(root / "sweep" / "pareto.csv", index=False)
    write_run_json(root / "diff", command="vlsafe diff", config={"x": 1}, seed=0)


def test_report_is_self_contained_and_complete(tmp_path: Path) -> None:
    _make_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert 'class="missing"' not in page  # every section found its data
    imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert set(imgs) == {f"report_{s}" for s in ("dynamics", "weight_heatmap", "taskvec", "probe", "direction_cos",
                                                  "safety_layers", "pareto", "linked")}
    assert not re.search(r'(src|href)="https?://', page)
    assert "0.95 [0.85, 1.00] (n=60)" in page
    for stem in imgs:
        assert (tmp_path / "figures" / f"{stem}.png").stat().st_size > 1000
        assert (tmp_path / "figures" / f"{stem}.pdf").is_file()
    assert "vlsafe diff" in page  # reproducibility block


def test_report_on_partial_run_marks_missing_sections(tmp_path: Path) -> None:
    _make_run(tmp_path)
    from vlsafe.experiments.report import build_report

    page = build_report(tmp_path / "probe").read_text()
    assert "No diff layers.csv" in page and "report_probe" in page


def test_report_errors(tmp_path: Path) -> None:
    from vlsafe.experiments.report import build_report

    with pytest.raises(VlsafeError, match="no vlsafe outputs"):
        build_report(tmp_path)
    with pytest.raises(VlsafeError, match="not a run directory"):
        build_report(tmp_path / "nope")


def test_pareto_front_drops_dominated_points() -> None:
    p = pd.DataFrame({"safety": [0.9, 0.7, 0.6, 0.9], "helpfulness": [0.5, 0.8, 0.7, 0.4]})
    front = pareto_front(p)
    assert list(front.index) == [0, 1]

