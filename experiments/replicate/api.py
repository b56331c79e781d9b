"""One call: build every combination of a replicate plan, then write `replicates.csv`, `summary.csv`,
`findings.md` (the replicates table and which claims survive every seed), `figures/` and `run.json` (kind
`replicate`) in the output folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from vlsafe.experiments.replicate.findings import write_findings
from vlsafe.experiments.replicate.plan import Combo, Plan
from vlsafe.experiments.replicate.run import ComboHook, read_metrics, run_combos
from vlsafe.experiments.replicate.tables import replicates_table, summarize

TABLES = {"replicates": "replicates.csv", "replicate_summary": "summary.csv"}


def run_replicate(plan: Plan, out_dir: str | os.PathLike, *, ray: str | None = None, resources: dict | None = None,
                  hook: ComboHook | None = None, progress: bool = True, figures: bool = True,
                  on_combo: Callable[[Combo, bool], None] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build (or resume) every combination, then the tables, figures and run record; returns
    (replicates, summary). See `run_combos` for `ray`, `resources`, `hook` and `on_combo`."""
    from vlsafe.analysis.runinfo import write_csv, write_run_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_combos(plan, ray=ray, resources=resources, hook=hook, progress=progress, on_combo=on_combo)
    rep = replicates_table(read_metrics(plan))
    summary = summarize(rep, where=str(out / TABLES["replicates"]))
    write_csv(out / TABLES["replicates"], rep)
    write_csv(out / TABLES["replicate_summary"], summary)
    write_findings(rep, summary, out)
    if figures:
        from vlsafe.experiments.replicate.figures import write_figures

        write_figures(rep, out / "figures")
    write_run_json(out, kind="replicate", tables=TABLES, seed=plan.seeds[0],
                   config={"source": plan.source, "seeds": list(plan.seeds),
                           "vary": {k: list(v) for k, v in plan.vary.items()},
                           "until": plan.combos[0].until if plan.combos else None, "reuse": list(plan.reuse)},
                   extra={"combos": {c.id: os.path.relpath(c.dir, out) for c in plan.combos}})
    return rep, summary
