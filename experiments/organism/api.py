"""One call to build (or resume) the organism and evaluate every checkpoint."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from vlsafe.experiments.organism.build import Hook, StageResult, StageSpec, build, record_times, stage_scope
from vlsafe.experiments.organism.config import OrganismConfig, load_config
from vlsafe.experiments.organism.metrics import checkpoints, estimate_seconds, run_metrics
from vlsafe.experiments.organism.stages import specs

__all__ = ["build_organism", "load_config", "organism_checkpoints", "scoped_checkpoints", "write_organism_run_json",
           "STAGE_NAMES"]
STAGE_NAMES = tuple(s.name for s in specs()) + ("metrics",)
BENCH_CSV = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "organism.csv"


def scoped_checkpoints(cfg: OrganismConfig, until: str | None) -> list[str] | None:
    """The checkpoints that a build `until` a stage makes: that stage's, its upstream stages' and their extra
    checkpoints (`lvlm-step-N` belong to `lvlm`), in table order; None (every checkpoint) when `until` is None."""
    if until is None:
        return None
    keep = set(stage_scope(specs(), until=until))
    owner = {e: s.name for s in specs() for e in s.extra(cfg)}
    return [n for n, _ in checkpoints(cfg) if owner.get(n, n) in keep]


def build_organism(cfg: OrganismConfig, out_dir: str | os.PathLike, *, only: str | None = None,
                   until: str | None = None, hook: Hook | None = None, progress: bool = True,
                   bench_csv: Path | None = None,
                   on_plan: Callable[[StageSpec, str | None, float], None] | None = None,
                   reuse: list[Path] | tuple[Path, ...] = (),
                   ) -> tuple[list[StageResult], pd.DataFrame | None]:
    """Build the stages (all, `only` one of `STAGE_NAMES`, or those `until` a stage: it and the stages it needs),
    then metrics (of the checkpoints built); returns (stage results, metrics).

    Stages and checkpoint metrics that another organism root in `reuse` holds under the same hashes are
    hard-linked from there instead of built (a replicate's recipes at one seed share `llm-base`, `distill`, `vision`).

    Stage times go to `DIR/stage_times.csv` (and to `bench_csv` when given). Metrics are skipped when `only`
    names a build stage, and computed alone with `only="metrics"`.
    """
    import torch

    out = Path(out_dir)
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        results: list[StageResult] = []
        if only != "metrics":
            results = build(cfg, out, specs(), only=only, until=until, hook=hook, progress=progress,
                            on_plan=on_plan, reuse=reuse)
        metrics = None
        if only in (None, "metrics"):
            if on_plan is not None:
                on_plan(StageSpec("metrics", (), lambda c, p: {}, estimate_seconds), "evaluating every checkpoint "
                        "(cached per checkpoint; re-judged from stored generations when only the judge changed)",
                        estimate_seconds(cfg))
            metrics, times = run_metrics(cfg, out, progress=progress, reuse=reuse,
                                         names=scoped_checkpoints(cfg, until))
            results += [StageResult(f"metrics:{k}", "cached" if cached else "built", sec, 0.0)
                        for k, (sec, cached) in times.items()]
        record_times(results, out, cfg, bench_csv)
        return results, metrics
    finally:
        torch.set_num_threads(old_threads)


def organism_checkpoints(out: str | os.PathLike) -> dict[str, Any]:
    """Every built stage checkpoint under `out` (a folder with `stage.json` and `config.json`), opened by name."""
    from vlsafe.analysis.checkpoints import open_checkpoint

    return {d.name: open_checkpoint(d) for d in sorted(Path(out).iterdir())
            if (d / "stage.json").is_file() and (d / "config.json").is_file()}


def write_organism_run_json(out: str | os.PathLike, cfg: OrganismConfig, results: list[StageResult], *,
                            extra: dict[str, Any] | None = None) -> Path:
    """The organism's `run.json`: its tables (those written), resolved config, checkpoint hashes, seed and the
    stage results (plus `extra`); the same record for `vlsafe organism` and each `vlsafe replicate` combination."""
    from vlsafe.analysis.runinfo import write_run_json

    root = Path(out)
    tables = {kind: f for kind, f in (("organism_metrics", "metrics.csv"), ("stage_times", "stage_times.csv"))
              if (root / f).is_file()}
    return write_run_json(root, kind="organism", tables=tables, config=cfg.model_dump(),
                          checkpoints=organism_checkpoints(root), seed=cfg.seed,
                          extra={"stages": [r.__dict__ for r in results], **(extra or {})})
