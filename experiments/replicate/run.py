"""Build every combination of a replicate plan (locally or one Ray task each), resumable per combination.

Each combination is an ordinary organism build in `DIR/combos/<id>/` (its stage hashes decide what is cached),
with its own `metrics.csv`, `stage_times.csv` and `run.json`; stages it shares with another recipe at the same
seed (same hash: `llm-base`, `distill`, `vision` when only the alignment differs) are hard-linked, not rebuilt. A
combination whose stages and metrics are all valid for its config is finished: it is neither rebuilt nor
dispatched. With Ray, `DIR` must sit on a filesystem every node sees under the same path (each task writes its
combination's folder there), as for `sweep_ray`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from vlsafe.analysis.errors import VlsafeError
from vlsafe.experiments.replicate.plan import Combo, Plan

ComboHook = Callable[[str, str], None]  # (combo id, stage) right before a stage is built


def combo_finished(combo: Combo) -> bool:
    """True when every stage and every checkpoint's metrics of `combo` (within its `until` scope) are cached and
    valid."""
    from vlsafe.experiments.organism.api import scoped_checkpoints
    from vlsafe.experiments.organism.build import Ctx, stage_hashes, stage_reason, stage_scope
    from vlsafe.experiments.organism.metrics import metrics_cached
    from vlsafe.experiments.organism.stages import specs

    root = Path(combo.dir)
    if not root.is_dir():
        return False
    cfg = combo.load()
    all_specs = specs()
    ctx = Ctx(cfg, root, False, stage_hashes(cfg, all_specs))
    scope = stage_scope(all_specs, until=combo.until)
    return (all(stage_reason(ctx, s) is None for s in all_specs if s.name in scope)
            and metrics_cached(cfg, root, scoped_checkpoints(cfg, combo.until)))


def build_combo(combo: Combo, *, hook: ComboHook | None = None, progress: bool = False,
                reuse: list[Path] | tuple[Path, ...] = ()) -> str:
    """Build (or resume) one combination's organism and its metrics; returns its folder.

    Module level, so a Ray worker imports it; `hook` (local runs only) is told each stage before it is built.
    Stages (and checkpoint metrics) that a folder in `reuse` holds under the same hashes — the other recipes at
    the same seed — are hard-linked from there, not rebuilt.
    """
    from vlsafe.experiments.organism.api import build_organism, write_organism_run_json

    cfg = combo.load()
    root = Path(combo.dir)
    root.mkdir(parents=True, exist_ok=True)
    stage_hook = None if hook is None else (lambda stage: hook(combo.id, stage))
    results, _ = build_organism(cfg, root, until=combo.until, hook=stage_hook, progress=progress, reuse=reuse)
    write_organism_run_json(root, cfg, results, extra={"replicate": {"combo": combo.id, "recipe": combo.recipe,
                                                                    "values": dict(combo.values)}})
    return combo.dir


def _siblings(plan: Plan, combo: Combo) -> list[Path]:
    """The folders whose stages `combo` may share: the plan's other combinations at the same seed, then the
    plan's `reuse` folders (stages are linked only under the same hash, so any folder is safe to offer)."""
    return ([Path(c.dir) for c in plan.combos if c.seed == combo.seed and c.id != combo.id]
            + [Path(r) for r in plan.reuse])


def _build_quiet(combo: Combo, *, siblings: dict[str, list[Path]]) -> str:
    return build_combo(combo, reuse=siblings[combo.id])


def run_combos(plan: Plan, *, ray: str | None = None, resources: dict | None = None, hook: ComboHook | None = None,
               progress: bool = True, on_combo: Callable[[Combo, bool], None] | None = None) -> list[str]:
    """Build every unfinished combination: in this process, or one Ray task each when `ray` is an address.

    `on_combo(combo, finished)` reports each combination before it is built (local) or dispatched (Ray).
    """
    if ray is not None:
        from vlsafe.experiments.sweep_ray import run_points_ray

        def done(c: Combo) -> str | None:
            finished = combo_finished(c)
            if on_combo is not None:
                on_combo(c, finished)
            return c.dir if finished else None

        res = resources or {"num_cpus": plan.combos[0].threads or 1}
        build = functools.partial(_build_quiet, siblings={c.id: _siblings(plan, c) for c in plan.combos})
        return run_points_ray(list(plan.combos), build, ray, res, done=done, label=lambda c: c.id,
                              progress=progress)
    out = []
    for c in plan.combos:
        finished = combo_finished(c)
        if on_combo is not None:
            on_combo(c, finished)
        out.append(c.dir if finished else build_combo(c, hook=hook, progress=progress, reuse=_siblings(plan, c)))
    return out


def read_metrics(plan: Plan) -> list[tuple[Combo, pd.DataFrame]]:
    """Each combination with its `metrics.csv` (one-line error naming a missing or unreadable file)."""
    out = []
    for c in plan.combos:
        path = Path(c.dir) / "metrics.csv"
        try:
            out.append((c, pd.read_csv(path)))
        except (OSError, ValueError) as e:
            raise VlsafeError(f"{path}: cannot read the combination's metrics ({str(e).splitlines()[0]})") from None
    return out
