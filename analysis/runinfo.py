"""Run directories: `run.json` provenance and atomic writes (temp path, then rename).

Every run directory gets `run.json` with the resolved config, package versions, git commit, checkpoint
hashes and seed, so a figure can be traced back to exactly what produced it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

PACKAGES = ("vlsafe", "torch", "transformers", "safetensors", "transformer-lens", "nnsight", "peft", "trl",
            "scikit-learn", "numpy", "pandas", "matplotlib", "mergekit", "gguf")


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


def write_run_json(run_dir: str | os.PathLike, *, command: str, config: dict[str, Any] | None = None,
                   checkpoints: dict[str, Any] | None = None, seed: int | None = None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write `run_dir/run.json`. `checkpoints` maps a label to a `Checkpoint` (hashed) or any JSON value."""
    ckpts: dict[str, Any] = {}
    for label, c in (checkpoints or {}).items():
        if hasattr(c, "content_hash"):
            ckpts[label] = {"spec": c.spec, "path": str(c.path), "family": c.family.name,
                            "content_hash": c.content_hash()}
        else:
            ckpts[label] = c
    record = {
        "command": command,
        "argv": sys.argv,
        "config": config or {},
        "checkpoints": ckpts,
        "seed": seed,
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    return write_json(Path(run_dir) / "run.json", record)
