"""Which checkpoint plays which part in a run, read from its tables (never from a list of expected names).

The organism's `metrics.csv` orders its checkpoints and gives each stepped one its `stage2_step`: the checkpoint
with the largest step is the adapted model (`final`), the last one listed before the first stepped one is the
reference it was adapted from (`ref`), step 0 is the checkpoint before stage 2 (`stage1`), the stepped ones in
between are the trajectory, and the unstepped ones listed after `final` are the remedies. Without organism
metrics, a diff's PRE and its last POST are `ref` and `final`; without a diff, the first and last text-only
checkpoints of the probe tables. An image variant of a checkpoint is named `NAME+IMAGE` (`vlsafe probe --image`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


@dataclass(frozen=True)
class Roles:
    """Checkpoint names by role; any may be None (or empty) when the tables do not say."""

    ref: str | None = None
    final: str | None = None
    stage1: str | None = None
    trajectory: tuple[str, ...] = ()
    remedies: tuple[str, ...] = ()
    steps: dict[str, int] = field(default_factory=dict)


def _organism_roles(metrics: pd.DataFrame) -> Roles | None:
    if "stage2_step" not in metrics.columns:
        return None
    order = list(dict.fromkeys(metrics["checkpoint"].astype(str)))
    step_of = metrics.assign(s=pd.to_numeric(metrics["stage2_step"], errors="coerce")).dropna(subset=["s"])
    steps = {str(c): int(s) for c, s in zip(step_of["checkpoint"], step_of["s"])}
    if not steps:
        return None
    final = max(steps, key=lambda c: (steps[c], order.index(c)))
    first = min(order.index(c) for c in steps)
    ref = order[first - 1] if first > 0 else None
    stage1 = next((c for c in order if steps.get(c) == 0 and c != final), None)
    trajectory = tuple(sorted((c for c in steps if 0 < steps[c] < steps[final]), key=steps.__getitem__))
    remedies = tuple(c for c in order[order.index(final) + 1:] if c not in steps)
    return Roles(ref, final, stage1, trajectory, remedies, steps)


def text_only(names: list[str]) -> list[str]:
    """The checkpoint names that are not image variants (`NAME+IMAGE`)."""
    return [n for n in names if "+" not in n]


def image_variant(name: str, names: list[str]) -> str | None:
    """The first `name+IMAGE` among `names`, or None."""
    return next((n for n in names if n.startswith(name + "+")), None)


def checkpoint_roles(*, metrics: pd.DataFrame | None = None, diff: pd.DataFrame | None = None,
                     probe: pd.DataFrame | None = None, sim: pd.DataFrame | None = None) -> Roles:
    """The roles of a run's checkpoints (see the module docstring)."""
    if metrics is not None and (roles := _organism_roles(metrics)) is not None:
        return roles
    if diff is not None and {"checkpoint_a", "checkpoint_b"} <= set(diff.columns) and len(diff):
        return Roles(ref=str(diff["checkpoint_a"].iloc[0]), final=str(diff["checkpoint_b"].iloc[-1]))
    names: list[str] = []
    if probe is not None:
        names += list(probe["checkpoint"].astype(str))
    if sim is not None:
        names += [str(x) for pair in zip(sim["checkpoint_a"], sim["checkpoint_b"]) for x in pair]
    names = text_only(list(dict.fromkeys(names)))
    return Roles(ref=names[0], final=names[-1]) if len(names) >= 2 else Roles()
