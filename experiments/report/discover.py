"""Find the tables of any run directory through the `run.json` files under it.

A run directory may be a single `vlsafe diff` output, a `vlsafe probe` output, or the demo tree holding many
sub-runs. Every `run.json` names its tables (`"tables"`: table kind → file relative to that run directory; see
`vlsafe.analysis.runinfo.TABLE_KINDS`), and only those files are read: a CSV that no `run.json` lists is ignored,
whatever its columns. A `run.json` that is not valid JSON or lists a file that is missing is a one-line
`VlsafeError` naming the file. Directories whose name starts with a dot (temporary folders of atomic writes) are
skipped.

Legacy: a `run.json` without `"tables"` was written by an older vlsafe. If its command is one that writes no table
the report reads (`merge`, `tune`: the models of a resumed sweep's finished points), it lists no tables; any
other is a one-line error naming it (rerun that command). Nothing is ever guessed from file or column names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.runinfo import read_json_object, run_tables

# columns the report reads from each table kind; a listed table without them is a one-line error naming it
READS: dict[str, set[str]] = {
    "diff_layers": {"layer", "module", "rel_frobenius"},
    "probe_layers": {"checkpoint", "layer", "probe_accuracy"},
    "similarity": {"layer", "checkpoint_a", "checkpoint_b", "direction_cosine"},
    "eval_summary": {"checkpoint", "prompt_set", "n", "refusal_rate"},
    "organism_metrics": {"checkpoint", "metric"},
    "taskvectors": {"layer", "cosine"},
    "dynamics": {"layer", "step"},
    "safety_layers": {"layer", "pair"},
    "pareto": {"safety", "helpfulness"},
    "patching": {"layer", "component", "direction", "image", "recovered"},
    "signals": {"layer"},
}
# commands whose run.json, from before `tables` existed, is read as listing no tables (see the module docstring)
LEGACY_WITHOUT_TABLES = frozenset({"merge", "tune"})


@dataclass
class Artefacts:
    """The run records under a directory and the tables they list (read on first use)."""

    root: Path
    paths: dict[str, list[Path]] = field(default_factory=dict)
    runs: list[tuple[Path, dict]] = field(default_factory=list)
    owners: dict[Path, tuple[Path, dict]] = field(default_factory=dict)  # table file → (run.json, record) listing it
    _loaded: dict[Path, pd.DataFrame] = field(default_factory=dict, repr=False)

    def all(self, kind: str) -> list[tuple[Path, pd.DataFrame]]:
        """Every table of a kind, in path order, with its file."""
        return [(p, self._load(kind, p)) for p in sorted(self.paths.get(kind) or [])]

    def first(self, kind: str) -> pd.DataFrame | None:
        """The shallowest table of a kind (a run's summary sits above its sub-runs' tables)."""
        path = self.first_path(kind)
        return self._load(kind, path) if path is not None else None

    def first_path(self, kind: str) -> Path | None:
        """The file `first(kind)` reads, or None."""
        items = sorted(self.paths.get(kind) or [], key=lambda p: (len(p.relative_to(self.root).parts), str(p)))
        return items[0] if items else None

    def sources(self, *kinds: str) -> list[str]:
        """The files (relative to the root, POSIX) of every table of these kinds, for captions."""
        return [p.relative_to(self.root).as_posix() for k in kinds for p in sorted(self.paths.get(k) or [])]

    def run_of(self, path: Path) -> tuple[Path, dict] | None:
        """The `run.json` (its file and record) that lists the table file `path` (the first, in path order)."""
        return self.owners.get(path)

    def _load(self, kind: str, path: Path) -> pd.DataFrame:
        if path not in self._loaded:
            self._loaded[path] = read_table(path, kind)
        return self._loaded[path]


def read_table(path: Path, kind: str) -> pd.DataFrame:
    """Read a listed table (CSV, or JSON lines for `.jsonl`) and check the columns the report reads."""
    try:
        df = pd.read_json(path, lines=True) if path.suffix == ".jsonl" else pd.read_csv(path)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise VlsafeError(f"{path}: cannot read the {kind!r} table ({type(e).__name__})") from None
    missing = sorted(READS.get(kind, set()) - set(df.columns))
    if missing:
        raise VlsafeError(f"{path}: the {kind!r} table lacks column(s) {', '.join(missing)}")
    return df


def discover(root: str | Path) -> Artefacts:
    """Every `run.json` under `root` and the tables each lists (see the module docstring)."""
    root = Path(root)
    art = Artefacts(root)
    for rj in sorted(root.rglob("run.json")):
        if any(part.startswith(".") for part in rj.relative_to(root).parts):
            continue
        record = read_json_object(rj)
        legacy = "tables" not in record and record.get("command") in LEGACY_WITHOUT_TABLES
        for kind, path in ({} if legacy else run_tables(rj, record)).items():
            if path not in art.paths.setdefault(kind, []):
                art.paths[kind].append(path)
            art.owners.setdefault(path, (rj, record))
        art.runs.append((rj, record))
    return art
