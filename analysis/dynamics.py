"""Adaptation dynamics: per-layer weight shift from the first checkpoint along a list of checkpoints.

>>> from vlsafe.analysis.dynamics import dynamics
>>> df = dynamics(["llm", "lvlm-step-40", "lvlm-step-80"])   # long format: one row per (checkpoint, layer)

Steps are parsed from names like `lvlm-step-40`, `llava-tulu2sft-ckpt-5600` or `checkpoint-500`; an
un-numbered first checkpoint (the LLM before adaptation) is step 0; when any other name carries no step,
`step` is left empty for every row and plots use the checkpoint index.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import pandas as pd

from vlsafe.analysis.checkpoints import Checkpoint
from vlsafe.analysis.pairing import checkpoint_label, checkpoint_labels
from vlsafe.analysis.weightshift import aggregate_layers, diff_checkpoints

_STEP_RE = re.compile(r"(?:step|ckpt|checkpoint|iter|iteration|epoch)[-_=]?(\d+)", re.IGNORECASE)
_TRAILING_RE = re.compile(r"[-_](\d+)$")
COLUMNS = ["checkpoint", "index", "step", "layer", "module", "rel_frobenius", "cosine", "frac_changed"]


def parse_step(label: str) -> int | None:
    """The training step in a checkpoint name (`lvlm-step-40` → 40, `ckpt-5600` → 5600), else None."""
    name = checkpoint_label(label)
    hits = _STEP_RE.findall(name)
    if hits:
        return int(hits[-1])
    m = _TRAILING_RE.search(name)
    return int(m.group(1)) if m else None


def _steps(labels: Sequence[str], steps: Sequence[int] | None) -> list[int | None]:
    if steps is not None:
        return [int(s) for s in steps]
    parsed = [parse_step(lb) for lb in labels]
    if parsed[0] is None and len(parsed) > 1 and all(s is not None for s in parsed[1:]):
        parsed[0] = 0  # an un-numbered reference (the LLM before adaptation) is step 0
    return parsed if all(s is not None for s in parsed) else [None] * len(labels)


def dynamics_table(tensors: pd.DataFrame, labels: Sequence[str], steps: Sequence[int] | None = None) -> pd.DataFrame:
    """Long-format dynamics from a multi-POST `diff_checkpoints` table (first label = the reference).

    One row per (checkpoint, layer) with `module=all`, plus embed/norm/head rows (empty layer); the
    reference itself appears at index 0 with zero shift.
    """
    layers = aggregate_layers(tensors)
    layers = layers[(layers["module"] == "all") | layers["layer"].isna()]
    idx = {lb: i for i, lb in enumerate(labels)}
    st = _steps(labels, steps)
    first = layers[layers["checkpoint_b"] == labels[1]] if len(labels) > 1 else layers.iloc[0:0]
    zero = first.assign(checkpoint_b=labels[0], rel_frobenius=0.0, cosine=1.0, frac_changed=0.0)
    rows: list[dict[str, Any]] = []
    for part in (zero, layers):
        for r in part.itertuples(index=False):
            i = idx[r.checkpoint_b]
            rows.append({"checkpoint": r.checkpoint_b, "index": i, "step": st[i], "layer": r.layer,
                         "module": r.module, "rel_frobenius": r.rel_frobenius, "cosine": r.cosine,
                         "frac_changed": r.frac_changed})
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["layer"] = df["layer"].astype("Int64")
    df["step"] = df["step"].astype("Int64")
    return df


def dynamics(checkpoints: Sequence[Checkpoint | str], *, labels: Sequence[str] | None = None,
             steps: Sequence[int] | None = None, **diff_kwargs: Any) -> pd.DataFrame:
    """Per-layer relative shift of each checkpoint from the first one, streaming (see `dynamics_table`)."""
    specs = [c.spec if isinstance(c, Checkpoint) else str(c) for c in checkpoints]
    labels = list(labels) if labels else checkpoint_labels(specs)
    tensors = diff_checkpoints(checkpoints[0], list(checkpoints[1:]), labels=labels, **diff_kwargs)
    return dynamics_table(tensors, labels, steps)
