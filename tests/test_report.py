"""The HTML report: built from contract-shaped tables, self-contained, every section filled."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.runinfo import write_run_json
from vlsafe.experiments.cli import main
from vlsafe.experiments.report import build_report
from vlsafe.experiments.report.discover import discover
from vlsafe.experiments.report.plots import pareto_front
from vlsafe.probes.behavior.calibration import JudgeCalibration


def _write(run: Path, tables: dict[str, tuple[str, pd.DataFrame]], **run_json) -> None:
    """Write each table of a run directory and its run.json listing them (table kind → file)."""
    run.mkdir(parents=True, exist_ok=True)
    for name, df in tables.values():
        df.to_csv(run / name, index=False)
    write_run_json(run, tables={kind: name for kind, (name, _) in tables.items()}, **run_json)


NAN = float("nan")
# the judge calibration the planted eval and sweep record (Se 116/120 ≈ 0.97, Sp 146/154 ≈ 0.95)
CAL = JudgeCalibration(judge="vlsafe", tp=116, n_pos=120, tn=146, n_neg=154, source="labels/holdout.jsonl")


def _corrected(safety: str, est: list[float], below: float, above: float) -> dict[str, list[float]]:
    """Planted judge-corrected columns of a safety channel: estimates with an interval `below`/`above` them."""
    return {f"{safety}_corrected": est, f"{safety}_corrected_low": [e - below for e in est],
            f"{safety}_corrected_high": [min(1.0, e + above) for e in est]}


def _make_run(root: Path) -> None:
    L = 6
    rng = np.random.default_rng(0)
    diff = pd.DataFrame([{"layer": i, "module": m, "rel_frobenius": 0.01 * (i + 1), "cosine": 0.99}
                         for i in range(L) for m in ("q_proj", "mlp.down_proj", "all")])
    tv = pd.DataFrame({"layer": range(L), "module": "all", "cosine": rng.uniform(-0.2, 0.3, L),
                       "norm_a": 1.0, "norm_b": 2.0})
    dyn = pd.DataFrame([{"layer": i, "step": s, "rel_frobenius": 0.001 * s} for i in range(L) for s in (10, 20, 30)])
    _write(root / "diff", {"diff_layers": ("layers.csv", diff), "taskvectors": ("taskvectors.csv", tv),
                           "dynamics": ("dynamics.csv", dyn)}, kind="diff", command="vlsafe diff",
           config={"x": 1}, seed=0)
    probe = pd.DataFrame([{"checkpoint": c, "layer": i, "position": -1, "probe_accuracy": 0.5 + 0.08 * i,
                           "probe_auroc": 0.6, "control_accuracy": 0.5, "direction_norm": 1.0}
                          for c in ("llm", "lvlm") for i in range(L)])
    sim = pd.DataFrame({"layer": range(L), "checkpoint_a": "llm", "checkpoint_b": "lvlm",
                        "direction_cosine": np.linspace(0.99, 0.9, L)})
    curves = pd.DataFrame([{"layer": i, "pair": p, "cosine_mean": v} for i in range(L)
                           for p, v in (("N-N", 0.95), ("M-M", 0.94), ("N-M", 0.9 - 0.05 * i))])
    _write(root / "probe", {"probe_layers": ("layers.csv", probe), "similarity": ("similarity.csv", sim),
                            "safety_layers": ("safety_layers.csv", curves)}, kind="probe")
    summary = pd.DataFrame([{"checkpoint": c, "prompt_set": s, "n": 60, "refusal_rate": r, "ci_low": r - 0.1,
                             "ci_high": r + 0.05, "judge": "vlsafe", "category": "", "rate_corrected": r - 0.02,
                             "corrected_low": r - 0.15, "corrected_high": r + 0.04}
                            for c, r in (("llm-aligned", 0.95), ("lvlm", 0.6))
                            for s in ("harmful-test", "borderline-test")])
    _write(root / "eval", {"eval_summary": ("summary.csv", summary)}, kind="eval",
           config={"judge_calibration": CAL.to_dict()})
    metrics = pd.DataFrame([{"checkpoint": f"lvlm-step-{s}", "metric": "refusal_harmful", "value": 0.9 - s / 100,
                             "ci_low": 0.8 - s / 100, "ci_high": 0.95 - s / 100} for s in (10, 20, 30)])
    _write(root, {"organism_metrics": ("metrics.csv", metrics)}, kind="organism")
    pareto = pd.DataFrame({"point": ["a", "b", "c", "d", "e"], "safety": [0.9, 0.7, 0.6, 0.5, 0.95],
                           "helpfulness": [0.5, 0.8, 0.7, 0.9, 0.95],
                           "family": ["reference", "merge", "tuning", "reference", "merge"],
                           "layers": ["all", "3 4", "4", "all", "1"],
                           "layer_signal": ["all", "signals.csv:patching_resid", "signals.csv:direction_drift",
                                            "all", "signals.csv:weight_shift"],
                           "stage": ["full", "full", "full", "full", "screen"],   # e: screened only, off the front
                           "safety_image": [0.4, 0.6, 0.3, float("nan"), 0.5],   # d: a text-only model
                           "safety_image_ci_low": [0.3, 0.5, 0.2, float("nan"), 0.4],
                           "safety_image_ci_high": [0.5, 0.7, 0.4, float("nan"), 0.6],
                           **_corrected("safety", [0.86, 0.66, 0.56, 0.46, NAN], 0.11, 0.09),  # e: screened
                           **_corrected("safety_image", [0.35, 0.57, 0.25, NAN, NAN], 0.13, 0.12)})
    _write(root / "sweep", {"pareto": ("pareto.csv", pareto)}, kind="sweep",
           extra={"judge_calibration": CAL.to_dict()})
    patching = pd.DataFrame([{"layer": i, "component": c, "direction": d, "image": "none",
                              "recovered": min(1.0, 0.2 * i), "ci_low": 0.0, "ci_high": 1.0, "n": 8}
                             for i in range(L) for c in ("resid", "attn_out", "mlp_out") for d in ("restore", "break")])
    signals = pd.DataFrame({"layer": range(L), "weight_shift": 0.01 * np.arange(1, L + 1),
                            "patching_resid": np.minimum(1.0, 0.2 * np.arange(L))})
    _write(root / "locate", {"patching": ("patching.csv", patching), "signals": ("signals.csv", signals)},
           kind="locate")


def test_report_is_self_contained_and_complete(tmp_path: Path) -> None:
    _make_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert 'class="missing"' not in page  # every section found its data
    assert "0.95 [0.85, 1.00] (n=60); corrected 0.93 [0.80, 0.99]" in page  # raw and judge-corrected rates
    imgs = re.findall(r'<svg[^>]* class="figure" data-stem="([^"]+)"', page)  # inline SVG, text kept as text
    assert sorted(imgs) == sorted(f"report_{s}" for s in ("dynamics", "weight_heatmap", "taskvec", "probe",
                                                           "direction_cos", "safety_layers", "pareto", "linked",
                                                           "locate_signals", "locate_patching", "pareto_image"))
    assert not re.search(r'(src|href)="https?://', page) and "<img" not in page
    assert "<text" in page and 'id="heatmap-weight"' in page and 'id="pareto-pt-3"' in page
    tips = json.loads(re.search(r'<script type="application/json" id="vlsafe-tips">(.*?)</script>', page).group(1))
    assert tips["points"]["pareto-pt-3"].startswith("#3 c\n")
    assert tips["heatmaps"]["heatmap-weight"]["cols"] == [str(i) for i in range(6)]
    assert "chosen by: signals.csv:direction_drift" in tips["points"]["pareto-pt-3"]
    assert 'id="pareto-image-pt-2"' in page and 'id="pareto-image-pt-4"' not in page  # no image number: not drawn
    assert "safety (image): 60%" in tips["points"]["pareto-image-pt-2"]
    assert "0.95 [0.85, 1.00] (n=60)" in page
    for stem in imgs:
        assert (tmp_path / "figures" / f"{stem}.png").stat().st_size > 1000
        assert (tmp_path / "figures" / f"{stem}.pdf").is_file()
    assert "vlsafe diff" in page  # reproducibility block


def test_report_on_partial_run_marks_missing_sections(tmp_path: Path) -> None:
    _make_run(tmp_path)
    page = build_report(tmp_path / "probe").read_text()
    assert "No diff layers.csv" in page and "report_probe" in page


def test_report_errors(tmp_path: Path) -> None:
    pd.DataFrame({"layer": [0], "module": ["all"], "rel_frobenius": [0.1]}).to_csv(tmp_path / "layers.csv")
    with pytest.raises(VlsafeError, match="no vlsafe outputs"):
        build_report(tmp_path)
    with pytest.raises(VlsafeError, match="not a run directory"):
        build_report(tmp_path / "nope")


def test_report_finds_tables_by_run_json_not_by_name_or_columns(tmp_path: Path) -> None:
    """A listed table under any file name is read; a stray CSV with a table's name and columns, shallower than
    the listed one (so a discovery by columns or names would take it first), is ignored."""
    _make_run(tmp_path)
    diff = tmp_path / "diff"
    (diff / "layers.csv").rename(diff / "shift_by_layer.csv")
    listed = json.loads((diff / "run.json").read_text())["tables"]
    write_run_json(diff, kind="diff", tables={**listed, "diff_layers": "shift_by_layer.csv"})
    stray = pd.read_csv(diff / "shift_by_layer.csv").assign(rel_frobenius=9.0)
    stray.to_csv(tmp_path / "layers.csv", index=False)
    (tmp_path / "notes").mkdir()
    stray.to_csv(tmp_path / "notes" / "taskvectors.csv", index=False)
    art = discover(tmp_path)
    assert [p for p, _ in art.all("diff_layers")] == [diff / "shift_by_layer.csv"]
    assert art.first("diff_layers")["rel_frobenius"].max() < 1
    assert [p for p, _ in art.all("taskvectors")] == [diff / "taskvectors.csv"]
    page = build_report(tmp_path).read_text()
    assert 'class="missing"' not in page and "report_weight_heatmap" in page


def _one_line_error(root: Path, pattern: str) -> None:
    with pytest.raises(VlsafeError, match=pattern) as e:
        build_report(root)
    assert "\n" not in str(e.value)


def test_listed_table_missing_is_one_line_error(tmp_path: Path) -> None:
    _make_run(tmp_path)
    (tmp_path / "probe" / "similarity.csv").unlink()
    _one_line_error(tmp_path, r"probe/similarity\.csv: listed as 'similarity' in .*probe/run\.json but missing")


def _legacy(run: Path, command: str) -> None:
    """Rewrite `run/run.json` as an older vlsafe wrote it: no `kind`, no `tables`."""
    rec = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    rec = {k: v for k, v in rec.items() if k not in ("kind", "tables")}
    (run / "run.json").write_text(json.dumps({**rec, "command": command}))


def test_run_json_without_tables_is_one_line_error(tmp_path: Path) -> None:
    """A run.json written by an older vlsafe (no `tables`) stops the report and names the file to rerun, unless
    its command writes no table the report reads (a resumed sweep's merged or tuned point models)."""
    _make_run(tmp_path)
    for cmd, name in (("merge", "points/a/model"), ("tune", "points/b/model")):
        (tmp_path / "sweep" / name).mkdir(parents=True)
        _legacy(tmp_path / "sweep" / name, cmd)
        pd.DataFrame({"layer": [0], "module": ["all"], "rel_frobenius": [9.0]}).to_csv(
            tmp_path / "sweep" / name / "layers.csv", index=False)
    art = discover(tmp_path)
    assert len(art.runs) == 8 and [p for p, _ in art.all("diff_layers")] == [tmp_path / "diff" / "layers.csv"]
    _legacy(tmp_path / "eval", "eval")
    _one_line_error(tmp_path, r"eval/run\.json: no \"tables\" in run\.json \(written by an older vlsafe\)")
    (tmp_path / "eval" / "run.json").write_text("{not json")
    _one_line_error(tmp_path, r"eval/run\.json: not valid JSON")


def test_listed_table_without_the_columns_read_is_one_line_error(tmp_path: Path) -> None:
    """The task-vector cosine is spelled `cosine`, as `aggregate_task_vectors` writes it; `cos` is not guessed."""
    _make_run(tmp_path)
    tv = tmp_path / "diff" / "taskvectors.csv"
    pd.read_csv(tv).rename(columns={"cosine": "cos"}).to_csv(tv, index=False)
    _one_line_error(tmp_path, r"diff/taskvectors\.csv: the 'taskvectors' table lacks column\(s\) cosine")


def test_remedies_fronts_by_family_and_stage(tmp_path: Path) -> None:
    """Two fronts (text, image) among the full-stage points; families coloured as in the legend; the key names each
    point's layers and the signal that chose them."""
    from vlsafe.experiments.report.plots_pareto import front_of, pareto, pareto_key

    _make_run(tmp_path)
    p = pd.read_csv(tmp_path / "sweep" / "pareto.csv")
    assert set(front_of(p).index) == {0, 1, 3}
    assert "e" not in set(p.loc[front_of(p).index, "point"])                # screened numbers do not compete
    assert set(front_of(p, "safety_image").index) == {1}                    # b dominates a and c with an image
    key = pareto_key(p)
    assert list(key["front"]) == ["yes", "yes", "", "yes", ""] and list(key["image front"]) == ["", "yes", "", "", ""]
    assert list(key["chosen by"])[1:3] == ["signals.csv:patching_resid", "signals.csv:direction_drift"]
    assert list(key["family"]) == ["reference", "merge", "tuning", "reference", "merge"]
    for safety in ("safety", "safety_image"):
        fig = pareto(p, safety=safety)
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert legend[:4] == ["Pareto front", "reference", "merge", "tuning"] and legend[-2] == "screened only"
        colours: dict[str, set] = {}
        points = [c for c in fig.axes[0].collections if "-pt-" in str(c.get_gid())]
        for coll in points:  # one per drawn point, gid = its number
            i = int(coll.get_gid().rsplit("-", 1)[1]) - 1
            if p.loc[i, "stage"] == "full":
                colours.setdefault(p.loc[i, "family"], set()).add(tuple(np.round(coll.get_facecolor()[0][:3], 3)))
        assert all(len(c) == 1 for c in colours.values())                   # one colour per family
        assert len(set().union(*colours.values())) == len(colours)          # and distinct between families
        assert len(points) == (5 if safety == "safety" else 4)
        plt.close(fig)
    page = build_report(tmp_path).read_text()
    assert page.index('id="fig-pareto"') < page.index('id="fig-pareto-image"')
    assert "Harmful prompts with an image" in page and "activation, reference" in page


def test_pareto_front_drops_dominated_points() -> None:
    p = pd.DataFrame({"safety": [0.9, 0.7, 0.6, 0.9], "helpfulness": [0.5, 0.8, 0.7, 0.4]})
    front = pareto_front(p)
    assert list(front.index) == [0, 1]

