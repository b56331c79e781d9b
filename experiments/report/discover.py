"""Find the artefacts of any run directory by their columns, not by their paths.

A run directory may be a single `vlsafe diff` output, a `vlsafe probe` output, or the demo tree holding
many sub-runs. Each CSV is classified by the columns its writer guarantees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

# kind → columns that identify it (all must be present)
SIGNATURES: dict[str, set[str]] = {
    "diff_layers": {"layer", "module", "rel_frobenius", "cosine"},
    "probe_layers": {"checkpoint", "layer", "probe_accuracy"},
    "similarity": {"layer", "checkpoint_a", "checkpoint_b", "direction_cosine"},
    "eval_summary": {"checkpoint", "prompt_set", "n", "refusal_rate", "ci_low", "ci_high"},
    "organism_metrics": {"checkpoint", "metric"},
    "taskvectors": {"layer", "cos"},
    "dynamics": {"layer", "step", "rel_frobenius"},
    "safety_layers": {"layer", "pair"},
    "pareto": {"safety", "helpfulness"},
}
# tables whose rows are per-tensor, not per-layer: same columns as diff_layers plus `tensor`
_EXCLUDE = {"diff_layers": {"tensor", "step"}}


@dataclass
class Artefacts:
    """Everything found under a run directory: tables by kind (with their source path) and run records."""

    root: Path
    tables: dict[str, list[tuple[Path, pd.DataFrame]]] = field(default_factory=dict)
    runs: list[tuple[Path, dict]] = field(default_factory=list)

    def first(self, kind: str) -> pd.DataFrame | None:
        """The shallowest table of a kind (a run's summary sits above its per-item files)."""
        items = sorted(self.tables.get(kind) or [], key=lambda it: (len(it[0].relative_to(self.root).parts),
                                                                    str(it[0])))
        return items[0][1] if items else None

    def all(self, kind: str) -> list[tuple[Path, pd.DataFrame]]:
        return self.tables.get(kind) or []


def classify(df: pd.DataFrame) -> str | None:
    """The artefact kind of a table, from its columns (most specific signature first)."""
    cols = set(df.columns)
    if {"checkpoint", "metric"} <= cols and {"value", "rate"} & cols:  # organism metrics: long format
        return "organism_metrics"
    for kind in sorted(SIGNATURES, key=lambda k: -len(SIGNATURES[k])):
        if kind != "organism_metrics" and SIGNATURES[kind] <= cols and not (_EXCLUDE.get(kind, set()) & cols):
            return kind
    # task-vector tables may name the cosine differently
    if {"layer"} <= cols and any(c.startswith("cos") for c in cols) and any(c.startswith("norm") for c in cols):
        return "taskvectors"
    return None


def discover(root: str | Path) -> Artefacts:
    """Scan `root` recursively for CSV tables and `run.json` records (skipping hidden and checkpoint dirs)."""
    root = Path(root)
    art = Artefacts(root)
    for csv in sorted(root.rglob("*.csv")):
        if any(part.startswith(".") for part in csv.relative_to(root).parts):
            continue
        try:
            df = pd.read_csv(csv)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            continue
        kind = classify(df)
        if kind:
            art.tables.setdefault(kind, []).append((csv, df))
    for rj in sorted(root.rglob("run.json")):
        if any(part.startswith(".") for part in rj.relative_to(root).parts):
            continue
        try:
            art.runs.append((rj, json.loads(rj.read_text())))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return art
