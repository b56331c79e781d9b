"""`run.json` names its kind and its tables; `write_run_json` refuses what a reader could not follow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.runinfo import TABLE_KINDS, run_tables, write_run_json


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (run / "layers.csv").write_text("layer,module,rel_frobenius\n0,all,0.5\n")
    (run / "sub" / "odd name.csv").write_text("layer,cosine\n0,0.1\n")
    return run


def test_run_json_records_kind_and_tables_and_reads_them_back(tmp_path: Path) -> None:
    run = _run(tmp_path)
    tables = {"diff_layers": "layers.csv", "taskvectors": "sub/odd name.csv"}
    rj = write_run_json(run, kind="diff", tables=tables, config={"x": 1}, extra={"outputs": ["layers.csv"]})
    rec = json.loads(rj.read_text())
    assert (rec["kind"], rec["tables"], rec["command"], rec["outputs"]) == ("diff", tables, "diff", ["layers.csv"])
    assert run_tables(rj, rec) == {"diff_layers": run / "layers.csv", "taskvectors": run / "sub" / "odd name.csv"}
    rec = json.loads(write_run_json(run, kind="demo", tables={}, command="vlsafe demo").read_text())
    assert (rec["kind"], rec["tables"], rec["command"]) == ("demo", {}, "vlsafe demo")


@pytest.mark.parametrize(("kind", "tables", "message"), [
    ("diff", {"diff_layer": "layers.csv"}, "unknown table kind 'diff_layer'"),
    ("diff", {"diff_layers": "tensors.csv"}, r"run/tensors\.csv: table 'diff_layers' listed for run\.json does not"),
    ("diff", {"diff_layers": "/abs/layers.csv"}, "must be relative to the run directory"),
    ("diff", {"diff_layers": "../layers.csv"}, "must be relative to the run directory"),
    ("diff", {"diff_layers": ""}, "must be a non-empty relative path"),
    ("diff", [("diff_layers", "layers.csv")], "tables must map a table kind to a file name"),
    ("Diff", {}, "run kind must be one lowercase word"),
    ("vlsafe diff", {}, "run kind must be one lowercase word"),
])
def test_write_run_json_rejects_bad_kind_and_tables(tmp_path: Path, kind: str, tables: object, message: str) -> None:
    run = _run(tmp_path)
    with pytest.raises(VlsafeError, match=message) as e:
        write_run_json(run, kind=kind, tables=tables)  # type: ignore[arg-type]
    assert "\n" not in str(e.value) and not (run / "run.json").exists()


def test_write_run_json_needs_kind_and_tables_and_keeps_its_own_keys(tmp_path: Path) -> None:
    run = _run(tmp_path)
    with pytest.raises(TypeError):
        write_run_json(run, kind="diff")  # type: ignore[call-arg]
    with pytest.raises(VlsafeError, match=r"extra run\.json keys \['tables'\] would replace"):
        write_run_json(run, kind="diff", tables={}, extra={"tables": {"diff_layers": "x.csv"}})


def test_every_table_kind_is_a_word_with_a_description() -> None:
    assert TABLE_KINDS and all(k.isidentifier() and k == k.lower() and TABLE_KINDS[k] for k in TABLE_KINDS)
