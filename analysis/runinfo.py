"""Run directories: `run.json` provenance and atomic writes (temp path, then rename).

Every run directory gets `run.json` with the resolved config, package versions, git commit, checkpoint
hashes and seed, so a figure can be traced back to exactly what produced it. It also names the run's `kind`
(one word per command: `diff`, `probe`, `eval`, ...) and its `tables`: table kind (one of `TABLE_KINDS`) →
file name relative to the run directory. Readers (the report) find tables through `run_tables`, never by
guessing from file or column names.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

from vlsafe.analysis.errors import VlsafeError

PACKAGES = ("vlsafe", "torch", "transformers", "safetensors", "transformer-lens", "nnsight", "peft", "trl",
            "scikit-learn", "numpy", "pandas", "matplotlib", "mergekit", "gguf")


# table kind → what it holds; the contract between the commands that write tables and the report that reads them
TABLE_KINDS: dict[str, str] = {
    "diff_tensors": "vlsafe diff: weight shift per tensor (tensors.csv)",
    "diff_layers": "vlsafe diff: weight shift per layer and module (layers.csv)",
    "taskvectors": "vlsafe diff --base: task-vector cosine per layer and module (taskvectors.csv)",
    "taskvectors_tensors": "vlsafe diff --base: task vectors per tensor (taskvectors_tensors.csv)",
    "dynamics": "vlsafe diff with several POSTs: weight shift per step (dynamics.csv)",
    "probe_layers": "vlsafe probe: probe accuracy and direction norm per layer (layers.csv)",
    "safety_layers": "vlsafe probe: safety-layer cosine curves (safety_layers.csv)",
    "similarity": "vlsafe probe: direction cosine between checkpoints (similarity.csv)",
    "drift": "vlsafe probe: projections on other checkpoints' directions (drift.csv)",
    "transfer": "vlsafe probe: probe transfer between checkpoints (transfer.csv)",
    "selection": "vlsafe probe --select: direction selection scores (selection.csv)",
    "eval_summary": "vlsafe eval: refusal rates with intervals (summary.csv)",
    "eval_generations": "vlsafe eval: one row per generation (generations.jsonl)",
    "eval_metrics": "vlsafe eval: the one evaluation's tidy rows (metrics.csv)",
    "organism_metrics": "vlsafe organism: metrics of every checkpoint (metrics.csv)",
    "stage_times": "vlsafe organism: build time of every stage (stage_times.csv)",
    "replicates": "vlsafe replicate: every combination x checkpoint x metric, with intervals (replicates.csv)",
    "replicate_summary": "vlsafe replicate: mean, sd, min, max across seeds per recipe (summary.csv)",
    "train_log": "vlsafe tune: training log (train_log.csv)",
    "pareto": "vlsafe sweep: safety and helpfulness of every point (pareto.csv)",
    "safelora": "vlsafe safelora: per-module projection (safelora.csv)",
    "patching": "vlsafe locate: recovered fraction per layer, component, direction and image (patching.csv)",
    "shift": "vlsafe locate: image-induced shift per condition, label, layer and position (shift.csv)",
    "signals": "vlsafe locate: every localisation signal per layer (signals.csv)",
    "signals_corr": "vlsafe locate: Spearman correlations between signals (signals_corr.csv)",
    "conditions": "vlsafe gate: fitted gate conditions per layer, thresholds and val rates (conditions.csv)",
}
_WORD = re.compile(r"[a-z][a-z0-9_]*")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of the packages that shape results (None when absent)."""
    out: dict[str, str | None] = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_commit(cwd: Path | None = None) -> str | None:
    """The current git commit of the vlsafe source tree (with `-dirty` when modified), or None."""
    here = cwd or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) if sha else None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success rename it into place, on error remove it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)) / final.name
    try:
        yield tmp
        if final.is_dir() and tmp.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def check_out_dir(out: str | os.PathLike, *, inputs: Any = (), replaces: bool = True) -> None:
    """Refuse an `-o` folder before any work when writing it would lose or mix data (one-line errors):

    - it exists and is a file;
    - it is one of `inputs` (paths of input checkpoints, adapters, files): outputs would mix with (or, replaced
      whole, delete) an input;
    - with `replaces` (commands that replace the whole folder, as `atomic_path` does): it holds one of `inputs`,
      or it exists, is not empty and is not an earlier vlsafe run folder (no `run.json`), so whatever is in it
      would be deleted.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VlsafeError(f"{out}: exists and is not a folder; choose a new -o folder")
    target = out.resolve()
    for item in inputs:
        if item is None:
            continue
        path = Path(str(item)).expanduser()
        if not path.exists():
            continue  # a hub id or a built-in name: not a local path
        path = path.resolve()
        if path == target or (replaces and target in path.parents):
            raise VlsafeError(f"{out}: the output folder is or holds an input ({item}); choose another -o folder")
    if replaces and out.is_dir() and any(out.iterdir()) and not (out / "run.json").is_file():
        raise VlsafeError(f"{out}: exists and is not an earlier vlsafe run folder (its files would be deleted); "
                          "choose a new -o folder")


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file that must hold an object (a config, a run record), or a one-line error naming the file and
    where it breaks."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise VlsafeError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError:
        raise VlsafeError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise VlsafeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise VlsafeError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (sorted keys, 2-space indent)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def write_csv(path: str | os.PathLike, df: Any) -> Path:
    """Write a pandas DataFrame as CSV atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def _table_path(rel: Any, where: str) -> str:
    """`rel` as a POSIX path inside the run directory, or a one-line error naming `where`."""
    if not isinstance(rel, str) or not rel:
        raise VlsafeError(f"{where}: a table file must be a non-empty relative path (got {rel!r})")
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or "\\" in rel:
        raise VlsafeError(f"{where}: table file {rel!r} must be relative to the run directory, inside it")
    return str(path)


def check_tables(run_dir: str | os.PathLike, kind: str, tables: Mapping[str, str]) -> dict[str, str]:
    """Validate a run's `kind` and `tables` (known table kinds, relative paths of files that exist)."""
    if not isinstance(kind, str) or not _WORD.fullmatch(kind):
        raise VlsafeError(f"{run_dir}: run kind must be one lowercase word such as 'diff' (got {kind!r})")
    if not isinstance(tables, Mapping):
        raise VlsafeError(f"{run_dir}: tables must map a table kind to a file name (got {type(tables).__name__})")
    out: dict[str, str] = {}
    for table, rel in tables.items():
        if table not in TABLE_KINDS:
            raise VlsafeError(f"{run_dir}: unknown table kind {table!r} (known: {', '.join(sorted(TABLE_KINDS))})")
        out[table] = _table_path(rel, f"{run_dir} ({table})")
        if not (Path(run_dir) / out[table]).is_file():
            raise VlsafeError(f"{Path(run_dir) / out[table]}: table {table!r} listed for run.json does not exist")
    return out


def write_run_json(run_dir: str | os.PathLike, *, kind: str, tables: Mapping[str, str],
                   command: str | None = None, config: dict[str, Any] | None = None,
                   checkpoints: dict[str, Any] | None = None, seed: int | None = None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write `run_dir/run.json`; call it after the tables are written.

    `kind` is one lowercase word naming the command (`diff`, `probe`, `eval`, `merge`, `tune`, `sweep`,
    `organism`, `safelora`, `resta`, `export_remedy`, `demo`, ...); `tables` maps each table kind the run
    wrote (a key of `TABLE_KINDS`) to its file, relative to `run_dir` (`{}` when it wrote none). `command` is
    the human-readable command recorded alongside (default: `kind`). `checkpoints` maps a label to a
    `Checkpoint` (hashed) or any JSON value. `extra` adds top-level keys; it may not replace the record's own.
    """
    checked = check_tables(run_dir, kind, tables)
    ckpts: dict[str, Any] = {}
    for label, c in (checkpoints or {}).items():
        if hasattr(c, "content_hash"):
            ckpts[label] = {"spec": c.spec, "path": str(c.path), "family": c.family.name,
                            "content_hash": c.content_hash()}
        else:
            ckpts[label] = c
    record = {
        "kind": kind,
        "tables": checked,
        "command": command or kind,
        "argv": sys.argv,
        "config": config or {},
        "checkpoints": ckpts,
        "seed": seed,
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    clash = sorted(set(record) & set(extra or {}))
    if clash:
        raise VlsafeError(f"{run_dir}: extra run.json keys {clash} would replace the record's own")
    return write_json(Path(run_dir) / "run.json", {**record, **(extra or {})})


def run_tables(run_json: str | os.PathLike, record: dict[str, Any]) -> dict[str, Path]:
    """The tables a `run.json` lists (table kind → absolute path); one-line error naming the file when the record
    has no `tables` (an older vlsafe wrote it), is malformed, or lists a file that does not exist.

    Table kinds unknown to this version are returned as they are (a newer vlsafe may write more)."""
    path = Path(run_json)
    tables = record.get("tables") if isinstance(record, dict) else None
    if tables is None:
        raise VlsafeError(f"{path}: no \"tables\" in run.json (written by an older vlsafe); rerun the command "
                          f"that wrote {path.parent} to list its tables")
    if not isinstance(tables, dict):
        raise VlsafeError(f"{path}: \"tables\" must map a table kind to a file name")
    out: dict[str, Path] = {}
    for table, rel in tables.items():
        if not isinstance(table, str) or not _WORD.fullmatch(table):
            raise VlsafeError(f"{path}: table kind {table!r} is not a lowercase word")
        out[table] = path.parent / _table_path(rel, f"{path} ({table})")
        if not out[table].is_file():
            raise VlsafeError(f"{out[table]}: listed as {table!r} in {path} but missing")
    return out
