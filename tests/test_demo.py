"""`vlsafe demo --profile tiny`: the main job end to end on tiny models, into a report with every section."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from vlsafe.experiments.cli import main
from vlsafe.experiments.report.discover import READS, discover

SECTIONS = {"dynamics", "weight_heatmap", "taskvec", "probe", "direction_cos", "safety_layers", "pareto", "linked",
            "locate_signals", "locate_patching", "pareto_image"}
# the tables the report reads, as each sub-run's run.json lists them (the shallowest of a kind is drawn)
TABLES = {"diff_layers": ["diff/layers.csv", "taskvec/layers.csv"], "dynamics": ["diff/dynamics.csv"],
          "taskvectors": ["taskvec/taskvectors.csv"], "probe_layers": ["probe/layers.csv"],
          "similarity": ["probe/similarity.csv"], "safety_layers": ["probe/safety_layers.csv"],
          "eval_summary": ["eval/summary.csv", "eval_image/summary.csv"],
          "organism_metrics": ["organism/metrics.csv"], "pareto": ["sweep/pareto.csv"],
          "patching": ["locate/patching.csv"], "signals": ["locate/signals.csv"]}


def test_tiny_demo_fills_every_report_section(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--profile", "tiny", "-o", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert 'class="missing"' not in page
    assert {m.removeprefix("report_") for m in re.findall(r'class="figure" data-stem="([^"]+)"', page)} == SECTIONS
    art = discover(out)
    assert {k: [str(p.relative_to(out)) for p, _ in art.all(k)] for k in READS} == TABLES
    for csv in ("diff/layers.csv", "diff/dynamics.csv", "taskvec/taskvectors.csv", "probe/layers.csv",
                "probe/similarity.csv", "eval/summary.csv", "eval_image/summary.csv", "sweep/pareto.csv",
                "organism/metrics.csv"):
        assert not pd.read_csv(out / csv).empty, csv
    # the remedies study: two stages, the image front for LVLMs only, targeted points aimed by locate's signals
    pareto = pd.read_csv(out / "sweep/pareto.csv")
    assert set(pareto["stage"]) <= {"full", "screen"} and (pareto["stage"] == "full").any()
    assert {"reference", "merge", "tuning"} <= set(pareto["family"])
    text_only = pareto["point"].str.contains("llm-aligned]", regex=False)
    assert pareto.loc[text_only, "safety_image"].isna().all() and pareto.loc[~text_only, "safety_image"].notna().all()
    assert pareto["layer_signal"].str.startswith("signals.csv:").sum() >= 8
    # every checkpoint in the safety table came from the eval run in this directory
    summary = pd.concat([pd.read_csv(out / "eval/summary.csv"), pd.read_csv(out / "eval_image/summary.csv")])
    for ckpt in summary["checkpoint"].unique():
        assert ckpt in page
    # a second run reuses every stage
    capsys.readouterr()
    assert main(["demo", "--profile", "tiny", "-o", str(out)]) == 0
    log = capsys.readouterr().out
    for stage in ("diff", "taskvec", "probe", "locate", "gate", "eval", "eval-img"):
        assert re.search(rf"\[demo\] {re.escape(stage)}\s+cached", log), stage


def test_demo_rebuilds_a_cached_stage_whose_run_json_lists_no_tables(tmp_path: Path, monkeypatch) -> None:
    """A stage output from an older vlsafe (run.json without `tables`) is rebuilt, not reused."""
    from vlsafe.experiments import demo

    calls: list[list[str]] = []
    monkeypatch.setattr(demo, "_cli", calls.append)
    stages, stage = demo.Stages(tmp_path, echo=lambda line: None), tmp_path / "diff"
    stage.mkdir()
    stages.run("diff", ["diff", "x"], stage, [])
    (stage / "run.json").write_text(json.dumps({"command": "diff"}))
    stages.run("diff", ["diff", "x"], stage, [])
    assert len(calls) == 2
    (stage / "run.json").write_text(json.dumps({"command": "diff", "kind": "diff", "tables": {}}))
    stages.run("diff", ["diff", "x"], stage, [])
    assert len(calls) == 2
