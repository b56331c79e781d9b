"""Replicates of the model organism over seeds and recipe variants (`vlsafe replicate`).

>>> from vlsafe.experiments.replicate import make_plan, run_replicate
>>> plan = make_plan(profile="tiny", seeds="0,1", vary=["alignment_strength=moderate,strong"], out="runs/rep")
>>> replicates, summary = run_replicate(plan, "runs/rep")

Each combination (seed × varied values) is an organism in `DIR/combos/<id>/`, cached by its stage hashes;
`DIR/replicates.csv`, `DIR/summary.csv`, `DIR/figures/` and `DIR/run.json` gather them.
"""

from __future__ import annotations

from vlsafe.experiments.replicate.api import run_replicate
from vlsafe.experiments.replicate.plan import Combo, Plan, make_plan
from vlsafe.experiments.replicate.tables import replicates_table, summarize

__all__ = ["Combo", "Plan", "make_plan", "replicates_table", "run_replicate", "summarize"]
