"""Activations as one array for the direction, probe and comparison code, in vlsafe's one layout `[n, L, P, d]`.

The layout (prompts × layers × positions × hidden) is documented in `vlsafe.probes.activations`.
`stack_activations` accepts what `vlsafe.probes.capture.capture` returns (`Activations`, tensor mode), or a plain
tensor `[n, L, P, d]` / `[n, L, d]` (one position), and returns fp32/fp64 data in that order plus the
layer list. Accumulated captures (`accumulate=True`) only hold statistics; `stacked_means` reads those.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from vlsafe.analysis.errors import VlsafeError


def _is_activations(x: Any) -> bool:
    return hasattr(x, "stack") and hasattr(x, "requests") and hasattr(x, "positions")


def _layers_of(acts: Any, hook: str) -> list[int]:
    lays = sorted({layer for kind, layer in acts.requests if kind == hook})
    if not lays:
        raise VlsafeError(f"activations: hook {hook!r} not captured (have {', '.join(acts.hooks)})")
    return lays


def _pick_layers(have: list[int], layers: Sequence[int] | None, what: str) -> list[int]:
    if layers is None:
        return have
    want = [int(x) for x in layers]
    missing = [x for x in want if x not in have]
    if missing:
        raise VlsafeError(f"{what}: layer(s) {missing} not captured (have {have[0]}–{have[-1]})" if have else
                          f"{what}: no layers captured")
    return want


def stack_activations(x: Any, *, hook: str = "resid_pre", layers: Sequence[int] | None = None,
                      label: Any = None) -> tuple[torch.Tensor, list[int]]:
    """(`[n, L, P, d]` tensor, layers) from `Activations` or a tensor; `label` keeps rows with that label."""
    if _is_activations(x):
        if getattr(x, "accumulate", False):
            raise VlsafeError("activations were accumulated (statistics only); per-prompt arrays are not available")
        lays = _pick_layers(_layers_of(x, hook), layers, "activations")
        t = x.stack(hook, layers=lays)
        if label is not None:
            rows = [i for i, lab in enumerate(x.labels or []) if lab == label]
            if not rows:
                raise VlsafeError(f"activations: no prompts with label {label!r}")
            t = t[rows]
        return t, lays
    if isinstance(x, torch.Tensor) or hasattr(x, "__array__"):
        t = torch.as_tensor(x)
        if t.dim() == 3:
            t = t.unsqueeze(2)
        if t.dim() != 4:
            raise VlsafeError(f"activations must be [n, L, P, d] or [n, L, d], got shape {tuple(t.shape)}")
        have = list(range(t.shape[1]))
        lays = _pick_layers(have, layers, "activations")
        return (t if lays == have else t[:, lays]), lays
    raise VlsafeError(f"cannot read activations from a {type(x).__name__}")


def stacked_means(acts: Any, *, hook: str = "resid_pre", layers: Sequence[int] | None = None,
                  label: Any = None) -> tuple[torch.Tensor, int, list[int]]:
    """(fp64 mean `[L, P, d]`, prompt count, layers) from `Activations` in either mode, or a tensor."""
    if _is_activations(acts) and getattr(acts, "accumulate", False):
        lays = _pick_layers(_layers_of(acts, hook), layers, "activations")
        means = torch.stack([acts.mean(hook, layer, label=label) for layer in lays])
        count = acts.stats(hook, lays[0], position=acts.positions[-1], label=label).count
        return means.to(torch.float64), int(count), lays
    t, lays = stack_activations(acts, hook=hook, layers=layers, label=label)
    if t.shape[0] == 0:
        raise VlsafeError("activations: empty prompt set")
    return t.to(torch.float64).mean(0), int(t.shape[0]), lays


def positions_of(acts: Any, n: int) -> list[Any]:
    """Position labels of `acts` (`Activations.positions`), else −n…−1."""
    pos = getattr(acts, "positions", None)
    if isinstance(pos, (list, tuple)) and len(pos) == n:
        return list(pos)
    return list(range(-n, 0))
