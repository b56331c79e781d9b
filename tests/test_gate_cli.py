"""`vlsafe gate`: one condition file per layer, fitted on -train with the threshold from harmless-val; bad input
writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from test_eval_cli import _error
from vlsafe.analysis.tiny import tiny_llama
from vlsafe.experiments.cli import main
from vlsafe.probes.gate import Condition, fit_condition


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("gate") / "m", layers=3, seed=1)


def test_gate_cli_writes_the_fitted_conditions(tmp_path: Path, model: Path) -> None:
    sets = ["--harmful-train", "harmful-train", "--harmless-train", "harmless-train"]
    out = tmp_path / "gates"
    assert main(["gate", str(model), "--layer", "1", "--layer", "2", "--kind", "direction", *sets, "-o", str(out)]) == 0
    table = pd.read_csv(out / "conditions.csv")
    assert table["layer"].tolist() == [1, 2]
    want = fit_condition(str(model), layer=1, kind="direction", harmful_train="harmful-train",
                         harmless_train="harmless-train", harmless_val="harmless-val", harmful_val="harmful-val")
    got = Condition.load(out / "layer1.json")
    assert got.threshold == pytest.approx(want.threshold) and got.layer == 1
    assert table.loc[0, "val_fpr"] == pytest.approx(want.provenance["val_fpr"])
    assert table.loc[0, "val_fpr"] <= 0.05
    assert json.loads((out / "run.json").read_text())["tables"] == {"conditions": "conditions.csv"}


def test_gate_cli_bad_input_writes_nothing(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "gates"
    assert "out of range" in _error(capsys, ["gate", str(model), "--layer", "9", "-o", str(out)])
    assert "-test" in _error(capsys, ["gate", str(model), "--layer", "1", "--harmless-val", "harmless-test",
                                      "-o", str(out)])
    assert not out.exists()
