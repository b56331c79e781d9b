"""Across checkpoints: how the safety direction moved (LLM vs the LVLM's language model, with/without an image).

- `direction_similarity`: cosine per (layer, position) between the directions of every pair of checkpoints;
- `projection_drift`: checkpoint B's harmful/harmless activations projected on checkpoint A's unit direction
  (means, spreads and d′ per layer) — does B still separate the classes along A's axis?
- `transfer`: a probe trained on A's activations scored on B's (`vlsafe.probes.linear.probe_transfer`).

Checkpoints with different hidden sizes cannot be compared (`VlsafeError`); layers are matched by index
(the shared layer axis) over the layers both sides have.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.directions import DirectionSet, unit
from vlsafe.probes.linear import probe_transfer
from vlsafe.probes.stacking import positions_of, stack_activations


def check_same_width(a: Any, b: Any, *, label_a: str = "A", label_b: str = "B") -> None:
    """Refuse to compare two direction sets / activations / checkpoints of different hidden sizes."""
    wa, wb = _width(a), _width(b)
    if wa is not None and wb is not None and wa != wb:
        raise VlsafeError(f"cannot compare {label_a} (hidden size {wa}) with {label_b} (hidden size {wb}): "
                          "directions live in different spaces")


def _width(x: Any) -> int | None:
    for attr in ("hidden_size",):
        if hasattr(x, attr):
            return int(getattr(x, attr))
    if isinstance(x, torch.Tensor):
        return int(x.shape[-1])
    return None


def _common(a: DirectionSet, b: DirectionSet) -> tuple[list[int], list[Any]]:
    layers = [l for l in a.layers if l in b.layers]
    positions = [p for p in a.positions if p in b.positions or str(p) in map(str, b.positions)]
    if not layers or not positions:
        raise VlsafeError(f"direction sets share no layers/positions (layers {a.layers[:3]}… vs {b.layers[:3]}…, "
                          f"positions {a.positions} vs {b.positions})")
    return layers, positions


def direction_cosines(a: DirectionSet, b: DirectionSet, *, label_a: str = "A", label_b: str = "B") -> pd.DataFrame:
    """`layer, position, checkpoint_a, checkpoint_b, direction_cosine` over the layers/positions both sets have."""
    check_same_width(a, b, label_a=label_a, label_b=label_b)
    layers, positions = _common(a, b)
    rows = []
    for pos in positions:
        for layer in layers:
            ra, rb = a.get(layer, position=pos), b.get(layer, position=pos)
            na, nb = float(ra.norm()), float(rb.norm())
            cos = float(ra @ rb / (na * nb)) if na > 0 and nb > 0 else float("nan")
            rows.append({"layer": layer, "position": str(pos), "checkpoint_a": label_a, "checkpoint_b": label_b,
                         "direction_cosine": cos})
    return pd.DataFrame(rows)


def direction_similarity(sets: Mapping[str, DirectionSet], *, reference: str | None = None) -> pd.DataFrame:
    """Cosines for every pair of labelled sets (or every set against `reference`)."""
    labels = list(sets)
    if len(labels) < 2:
        raise VlsafeError("direction similarity needs at least two checkpoints")
    if reference is not None and reference not in sets:
        raise VlsafeError(f"no direction set {reference!r} (have {', '.join(labels)})")
    pairs = [(reference, l) for l in labels if l != reference] if reference else list(combinations(labels, 2))
    return pd.concat([direction_cosines(sets[a], sets[b], label_a=a, label_b=b) for a, b in pairs], ignore_index=True)


def project(acts: Any, directions: DirectionSet, *, hook: str = "resid_pre") -> tuple[torch.Tensor, list[int]]:
    """Scalar projections `[n, L, P]` (fp64) of activations on the unit directions at the same layers."""
    x, layers = stack_activations(acts, hook=hook, layers=[l for l in directions.layers])
    if x.shape[-1] != directions.hidden_size:
        raise VlsafeError(f"cannot project activations of hidden size {x.shape[-1]} on directions of hidden size "
                          f"{directions.hidden_size}")
    if x.shape[2] != len(directions.positions):
        raise VlsafeError(f"activations have {x.shape[2]} positions, directions {len(directions.positions)}")
    u = unit(directions.raw)                                   # [L, P, d]
    return torch.einsum("nlpd,lpd->nlp", x.to(torch.float64), u), layers


def projection_drift(directions: DirectionSet, acts_harmful: Any, acts_harmless: Any, *, direction_from: str = "A",
                     activations_from: str = "B", hook: str = "resid_pre") -> pd.DataFrame:
    """Per (layer, position): mean/std of harmful and harmless projections on A's direction, and their d′."""
    ph, layers = project(acts_harmful, directions, hook=hook)
    pb, _ = project(acts_harmless, directions, hook=hook)
    rows = []
    for p, pos in enumerate(directions.positions):
        for i, layer in enumerate(layers):
            h, b = ph[:, i, p].numpy(), pb[:, i, p].numpy()
            pooled = np.sqrt((h.var(ddof=1) + b.var(ddof=1)) / 2) if len(h) > 1 and len(b) > 1 else np.nan
            rows.append({"layer": layer, "position": str(pos), "direction_from": direction_from,
                         "activations_from": activations_from, "harmful_mean": float(h.mean()),
                         "harmful_std": float(h.std(ddof=1)) if len(h) > 1 else np.nan,
                         "harmless_mean": float(b.mean()),
                         "harmless_std": float(b.std(ddof=1)) if len(b) > 1 else np.nan,
                         "d_prime": float((h.mean() - b.mean()) / pooled) if pooled and pooled > 0 else np.nan})
    return pd.DataFrame(rows)


def transfer(acts_a: tuple[Any, Any], acts_b: tuple[Any, Any], *, label_a: str = "A", label_b: str = "B",
             hook: str = "resid_pre", layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Probe trained on A's (harmful, harmless) activations, tested on B's; adds `train_on`, `test_on` columns."""
    (ah, ab), (bh, bb) = acts_a, acts_b
    xa_h, lays = stack_activations(ah, hook=hook, layers=layers)
    xa_b, _ = stack_activations(ab, hook=hook, layers=lays)
    xb_h, _ = stack_activations(bh, hook=hook, layers=lays)
    xb_b, _ = stack_activations(bb, hook=hook, layers=lays)
    check_same_width(xa_h, xb_h, label_a=label_a, label_b=label_b)
    ya = np.r_[np.ones(len(xa_h), int), np.zeros(len(xa_b), int)]
    yb = np.r_[np.ones(len(xb_h), int), np.zeros(len(xb_b), int)]
    df = probe_transfer(torch.cat([xa_h, xa_b]), ya, torch.cat([xb_h, xb_b]), yb)
    df["layer"] = [lays[i] for i in df["layer"]]
    pos = positions_of(ah, xa_h.shape[2])
    df["position"] = [str(pos[int(p) + len(pos)]) for p in df["position"]]
    df.insert(0, "train_on", label_a)
    df.insert(1, "test_on", label_b)
    return df
