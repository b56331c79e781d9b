"""Resumable, cached organism build: each stage writes `DIR/<stage>/` through a temp dir + rename, with a
`stage.json` holding the hash of everything it depends on (its config section and its upstream stages' hashes),
the files it wrote and their sizes.

On a rerun a stage is skipped when its `stage.json` is intact, its hash matches the current config and every file
is present at its recorded size (safetensors headers are parsed too); otherwise it is rebuilt — so an interrupted
build resumes after the last finished stage, a corrupt or partial stage is rebuilt, and a config change rebuilds
exactly the stages whose section changed plus their dependents. Metrics are cached per checkpoint the same way.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.runinfo import atomic_path, write_csv
from vlsafe.experiments.organism.config import OrganismConfig, stage_section

STAGE_VERSION = 1
STAGE_FILE = "stage.json"
Hook = Callable[[str], None]


@dataclass(frozen=True)
class StageSpec:
    """One stage: its upstream stages, how to build it into a fresh dir, and a time estimate (seconds)."""

    name: str
    deps: tuple[str, ...]
    run: Callable[["Ctx", Path], dict[str, Any]]
    estimate: Callable[[OrganismConfig], float]
    extra: Callable[[OrganismConfig], list[str]] = field(default=lambda cfg: [])


@dataclass
class Ctx:
    """What a stage's build function gets: the config, the output root, progress flag, stage hashes."""

    cfg: OrganismConfig
    root: Path
    progress: bool = True
    hashes: dict[str, str] = field(default_factory=dict)

    def path(self, stage: str) -> Path:
        return self.root / stage

    def save_extra(self, name: str, owner: str, write: Callable[[Path], None], info: dict[str, Any]) -> None:
        """Write an extra checkpoint dir (e.g. `lvlm-step-N`) atomically, with its own `stage.json`."""
        with atomic_path(self.root / name) as tmp:
            write(tmp)
            write_stage_json(tmp, name, extra_hash(self.hashes[owner], name), info, 0.0)


@dataclass
class StageResult:
    """What happened to one stage in a build."""

    stage: str
    status: str  # built | cached | linked (hard-linked from another organism folder with the same stage hash)
    seconds: float  # build time (for a cached stage: when it was built)
    estimate_s: float
    reason: str = ""


def stage_hashes(cfg: OrganismConfig, specs: list[StageSpec]) -> dict[str, str]:
    """Hash of each stage: its config section plus its upstream stages' hashes (so changes propagate)."""
    out: dict[str, str] = {}
    for s in specs:
        payload = {"stage": s.name, "version": STAGE_VERSION, "section": stage_section(cfg, s.name),
                   "deps": {d: out[d] for d in s.deps}}
        out[s.name] = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return out


def extra_hash(owner_hash: str, name: str) -> str:
    return hashlib.sha256(f"{owner_hash}:{name}".encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------- validity

def _files(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != STAGE_FILE}


def write_stage_json(path: Path, name: str, digest: str, info: dict[str, Any], seconds: float) -> None:
    """Record a finished stage (written last, inside the temp dir, before the rename)."""
    record = {"stage": name, "hash": digest, "version": STAGE_VERSION, "status": "complete",
              "seconds": round(seconds, 4), "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(),
              "files": _files(path), "info": info}
    (path / STAGE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def _safetensors_ok(f: Path) -> bool:
    try:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return f.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, struct.error):
        return False


def check_stage(path: Path, digest: str) -> str | None:
    """None when `path` holds a complete stage with hash `digest`, else why it must be (re)built."""
    meta = path / STAGE_FILE
    if not meta.is_file():
        return "not built" if not path.exists() else "no stage.json (partial or foreign directory)"
    try:
        record = json.loads(meta.read_text())
        files = dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return "stage.json is unreadable"
    if record.get("status") != "complete":
        return "stage.json does not mark the stage complete"
    if record.get("hash") != digest:
        return "config or an upstream stage changed"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, expected {size} (truncated or modified)"
        if f.suffix == ".safetensors" and not _safetensors_ok(f):
            return f"{rel} is not a valid safetensors file"
    return None


def built_seconds(path: Path) -> float:
    """How long a cached stage took when it was built (from its `stage.json`)."""
    try:
        return float(json.loads((path / STAGE_FILE).read_text()).get("seconds", 0.0))
    except (OSError, ValueError):
        return 0.0


def stage_reason(ctx: Ctx, spec: StageSpec) -> str | None:
    """Why `spec` must be built (its own dir or one of its extra dirs is invalid), or None when cached."""
    why = check_stage(ctx.path(spec.name), ctx.hashes[spec.name])
    if why:
        return why
    for extra in spec.extra(ctx.cfg):
        why = check_stage(ctx.path(extra), extra_hash(ctx.hashes[spec.name], extra))
        if why:
            return f"{extra}: {why}"
    return None


# ----------------------------------------------------------------------------------------------------- building

def _run_stage(ctx: Ctx, spec: StageSpec, hook: Hook | None) -> float:
    if hook is not None:
        hook(spec.name)
    t0 = time.perf_counter()
    with atomic_path(ctx.path(spec.name)) as tmp:
        info = spec.run(ctx, tmp)
        if not tmp.is_dir():
            raise VlsafeError(f"stage {spec.name}: wrote nothing")
        write_stage_json(tmp, spec.name, ctx.hashes[spec.name], info, time.perf_counter() - t0)
    return time.perf_counter() - t0


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not supported
        shutil.copy2(src, dst)


def link_file(src: Path, dst: Path) -> None:
    """Make `dst` a hard link to `src` (a copy across filesystems), atomically."""
    with atomic_path(dst) as tmp:
        _link(src, tmp)


def link_tree(src: Path, dst: Path) -> None:
    """Make `dst` a copy of the folder `src` whose files are hard links (copies across filesystems), atomically."""
    with atomic_path(dst) as tmp:
        tmp.mkdir()
        for f in sorted(src.rglob("*")):
            target = tmp / f.relative_to(src)
            if f.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            _link(f, target)


def reuse_stage(ctx: Ctx, spec: StageSpec, roots: list[Path]) -> Path | None:
    """Link `spec`'s folder (and its extra folders) from the first of `roots` that holds them valid under the same
    hashes — e.g. a replicate's other recipe at the same seed shares `distill` and `vision` — and return that root;
    None when no root has them. Linked files are never written again: every stage is replaced by a rename."""
    names = [(spec.name, ctx.hashes[spec.name])] + [(e, extra_hash(ctx.hashes[spec.name], e))
                                                    for e in spec.extra(ctx.cfg)]
    for root in roots:
        if root.resolve() == ctx.root.resolve() or any(check_stage(root / n, h) for n, h in names):
            continue
        for n, h in names:
            if check_stage(ctx.path(n), h):
                link_tree(root / n, ctx.path(n))
        return root
    return None


def _remove_stale_temps(ctx: Ctx, specs: list[StageSpec]) -> None:
    """Delete temp dirs (`.<stage>.*`) left by a killed build; a stage only becomes visible by its rename."""
    if not ctx.root.is_dir():
        return
    names = [s.name for s in specs] + [e for s in specs for e in s.extra(ctx.cfg)]
    for name in names:
        for tmp in ctx.root.glob(f".{name}.*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)


def stage_scope(specs: list[StageSpec], *, only: str | None = None, until: str | None = None) -> list[str]:
    """The stages a build covers, in build order: every one, just `only`, or `until` a stage (it and every stage
    it needs, directly or not). One-line errors for an unknown stage or for both given."""
    names = [s.name for s in specs]
    for stage in (only, until):
        if stage is not None and stage not in names:
            raise VlsafeError(f"unknown stage {stage!r}; stages: {', '.join(names)}")
    if only is not None and until is not None:
        raise VlsafeError("give only or until, not both")
    if only is not None:
        return [only]
    if until is None:
        return names
    deps = {s.name: s.deps for s in specs}
    need, todo = set(), [until]
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            todo += list(deps[n])
    return [n for n in names if n in need]


def build(cfg: OrganismConfig, out_dir: str | os.PathLike, specs: list[StageSpec], *, only: str | None = None,
          until: str | None = None, hook: Hook | None = None, progress: bool = True,
          on_plan: Callable[[StageSpec, str | None, float], None] | None = None,
          reuse: list[Path] | tuple[Path, ...] = ()) -> list[StageResult]:
    """Build every stage of `specs` in order (or just `only`, or `until` a stage: it and the stages it needs),
    skipping valid cached ones.

    A stage that a folder in `reuse` (another organism root) holds valid under the same hash is hard-linked from
    there instead of built (status `linked`). `hook(stage)` runs right before a stage is built (tests use it to
    simulate an interruption);
    `on_plan(spec, reason, estimate)` reports each stage before it runs (reason None = cached).
    """
    ctx = Ctx(cfg, Path(out_dir), progress, stage_hashes(cfg, specs))
    by_name = {s.name: s for s in specs}
    chosen = [by_name[n] for n in stage_scope(specs, only=only, until=until)]
    if only:
        missing = [d for d in by_name[only].deps if stage_reason(ctx, by_name[d])]
        if missing:
            raise VlsafeError(f"stage {only} needs {missing[0]} first ({stage_reason(ctx, by_name[missing[0]])}); "
                              "run without --only")
    _remove_stale_temps(ctx, specs)
    results = []
    for spec in chosen:
        reason = stage_reason(ctx, spec)
        est = spec.estimate(cfg)
        if on_plan is not None:
            on_plan(spec, reason, est)
        if reason is None:
            results.append(StageResult(spec.name, "cached", built_seconds(ctx.path(spec.name)), est))
            continue
        source = reuse_stage(ctx, spec, [Path(r) for r in reuse])
        if source is not None:
            results.append(StageResult(spec.name, "linked", built_seconds(ctx.path(spec.name)), est,
                                       f"same stage hash in {source}"))
            continue
        seconds = _run_stage(ctx, spec, hook)
        results.append(StageResult(spec.name, "built", seconds, est, reason))
    return results


def record_times(results: list[StageResult], out_dir: Path, cfg: OrganismConfig, bench_csv: Path | None) -> None:
    """Write `DIR/stage_times.csv` and append built stages to the benchmark CSV (with the load average)."""
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [{"stage": r.stage, "status": r.status, "seconds": round(r.seconds, 3), "estimate_s": round(r.estimate_s),
             "reason": r.reason, "profile": cfg.profile, "alignment": cfg.alignment_strength,
             "precision": cfg.precision, "threads": cfg.threads or 0, "cpus": os.cpu_count(),
             "load_avg_1m": round(load, 2), "finished": now}
            for r in results]
    df = pd.DataFrame(rows)
    old = out_dir / "stage_times.csv"
    if old.is_file():  # keep rows of stages this run did not look at (e.g. with --only)
        prev = pd.read_csv(old)
        df = pd.concat([prev[~prev.stage.isin(df.stage)], df], ignore_index=True)
    write_csv(old, df)
    if bench_csv is not None:
        built = pd.DataFrame([r for r in rows if r["status"] == "built"])
        if not built.empty:
            if bench_csv.is_file():
                built = pd.concat([pd.read_csv(bench_csv), built], ignore_index=True)
            write_csv(bench_csv, built)
