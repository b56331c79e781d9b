"""Where a judge-corrected rate comes from: the judge's calibration a run recorded, as one caption sentence.

A corrected rate (Rogan–Gladen, `vlsafe.probes.behavior.calibration`) is only as good as the judge's measured
sensitivity and specificity, so the report names them under every table or figure that shows one. The record is
the one the run used, as its `run.json` holds it (`JudgeCalibration.to_dict`: judge, counts, sensitivity,
specificity, source): `vlsafe eval` writes it as `config.judge_calibration`, `vlsafe sweep` as the top-level
`judge_calibration`; either is None for a judge without a calibration. A table gets a sentence only when it has
corrected numbers and its run recorded a calibration; nothing is said otherwise (no numbers are invented).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from vlsafe.experiments.report.discover import Artefacts
from vlsafe.probes.behavior.calibration import JudgeCalibration

__all__ = ["recorded_calibration", "calibration_sentence", "calibration_note"]


def recorded_calibration(record: dict[str, Any] | None, *, where: str = "run.json") -> JudgeCalibration | None:
    """The judge calibration a `run.json` record holds (top level, else in its config), or None; a malformed one
    is a one-line `VlsafeError` naming `where`."""
    if not record:
        return None
    config = record.get("config")
    rec = record.get("judge_calibration") or (config.get("judge_calibration") if isinstance(config, dict) else None)
    if not rec:
        return None
    return JudgeCalibration.from_dict(rec if isinstance(rec, dict) else {}, where=f"{where}: judge_calibration")


def calibration_sentence(cal: JudgeCalibration) -> str:
    """`Corrected rates: vlsafe judge, sensitivity 0.96 (n = 134), specificity 0.98 (n = 140), measured on
    tests/data/judge_holdout.jsonl; Rogan–Gladen with a parametric-bootstrap interval.` (no `measured on` clause
    when the record names no source)."""
    where = f", measured on {cal.source}" if cal.source else ""
    return (f"Corrected rates: {cal.judge} judge, sensitivity {cal.sensitivity:.2f} (n = {cal.n_pos}), specificity "
            f"{cal.specificity:.2f} (n = {cal.n_neg}){where}; Rogan–Gladen with a parametric-bootstrap interval.")


def calibration_note(art: Artefacts, kind: str, columns: list[str], *, first_only: bool = False) -> str:
    """The sentences (one per distinct calibration) for the tables of `kind` that have a number in any of
    `columns`, read from the `run.json` that lists each; `first_only` looks at `art.first(kind)` alone (the table a
    figure draws). Empty when none applies."""
    first = art.first_path(kind)
    cals: list[JudgeCalibration] = []
    for path, df in art.all(kind):
        if (first_only and path != first) or not _has_numbers(df, columns) or (run := art.run_of(path)) is None:
            continue
        cal = recorded_calibration(run[1], where=str(run[0]))
        if cal is not None and cal not in cals:
            cals.append(cal)
    return " ".join(calibration_sentence(c) for c in cals)


def _has_numbers(df: pd.DataFrame, columns: list[str]) -> bool:
    cols = [c for c in columns if c in df.columns]
    return bool(cols) and bool(df[cols].notna().any().any())
