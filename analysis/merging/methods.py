"""The merge methods vlsafe runs: their parameters (scope, type, default) and how to call the operators.

Mirrors mergekit 0.1.5's method specs (`merge_methods/registry.py`, `generalized_task_arithmetic.py`):
per-model parameters (`weight`, `density`, `gamma`) resolve per input; shared ones (`lambda`, `normalize`,
`rescale`, `t`, and vlsafe's `tie_break` for magnitude trimming) only from the global `parameters`. `linear` gives every input (the base included) a weight;
the task-arithmetic family ignores the base's per-model parameters. `int8_mask` is accepted for
compatibility and ignored (masks are always boolean here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.merging import operators as ops

REQUIRED = object()


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its parameters and defaults and whether it needs a base model."""

    name: str
    needs_base: bool
    per_model: dict[str, Any]  # name -> default (REQUIRED when none)
    shared: dict[str, Any]
    base_has_params: bool = False  # linear: the base is an ordinary weighted input
    exact_inputs: int | None = None  # slerp: base + one other
    sparsify: str | None = None  # magnitude | random | band
    consensus: bool = False
    types: dict[str, type] = field(default_factory=dict)

    @property
    def parameters(self) -> list[str]:
        return [*self.per_model, *self.shared]

    @property
    def gate(self) -> str:
        """The parameter whose neutral value copies the base (used to export layer selections)."""
        return "t" if self.name == "slerp" else "weight" if self.name == "linear" else "lambda"


_TYPES = {"weight": float, "density": float, "gamma": float, "lambda": float, "t": float, "normalize": bool,
          "rescale": bool, "int8_mask": bool, "tie_break": str}


def _gta(name: str, sparsify: str | None, consensus: bool, normalize: bool, rescale: bool) -> MethodSpec:
    per_model: dict[str, Any] = {"weight": REQUIRED, "density": 1.0}
    if sparsify == "band":
        per_model["gamma"] = 0.01
    shared = {"lambda": 1.0, "normalize": normalize, "rescale": rescale, "int8_mask": False}
    if sparsify == "magnitude":
        shared["tie_break"] = "sort"  # vlsafe extension: "index" trims without a full sort (see operators)
    return MethodSpec(name, True, per_model, shared, sparsify=sparsify, consensus=consensus, types=_TYPES)


METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("linear", False, {"weight": REQUIRED}, {"normalize": True}, base_has_params=True, types=_TYPES),
    MethodSpec("slerp", True, {}, {"t": REQUIRED}, exact_inputs=2, types=_TYPES),
    _gta("task_arithmetic", None, False, False, False),
    _gta("ties", "magnitude", True, True, False),
    _gta("dare_linear", "random", False, False, True),
    _gta("dare_ties", "random", True, False, True),
    _gta("breadcrumbs", "band", False, False, False),
    _gta("breadcrumbs_ties", "band", True, False, False),
)}


def method_spec(name: str) -> MethodSpec:
    """The spec of merge method `name`; unknown names list the valid ones."""
    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise VlsafeError(f"unknown merge_method '{name}'{hint}; valid: {', '.join(METHODS)}")
    return METHODS[name]


def apply(spec: MethodSpec, base: torch.Tensor | None, others: Sequence[torch.Tensor],
          shared: dict[str, Any], per_model: Sequence[dict[str, Any]], *, dtype: torch.dtype | None,
          out_dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """Run method `spec` on one tensor group. `others` excludes the base except for `linear`, where it is
    every input in order; `per_model` is aligned with `others`."""
    kw = dict(dtype=dtype, out_dtype=out_dtype)
    if spec.name == "linear":
        return ops.linear(others, [p["weight"] for p in per_model], shared["normalize"], **kw)
    if spec.name == "slerp":
        return ops.slerp(base, others[0], shared["t"], **kw)
    w = [p["weight"] for p in per_model]
    ds = [p["density"] for p in per_model]
    for d in ds:
        if not 0.0 < d <= 1.0:
            raise VlsafeError(f"density {d} is outside (0, 1]")
    rescale = shared["rescale"]
    if spec.sparsify == "magnitude":
        sp = lambda d, i: ops.magnitude_prune(d, ds[i], rescale, shared["tie_break"])  # noqa: E731
    elif spec.sparsify == "random":
        sp = lambda d, i: ops.random_prune(d, ds[i], rescale, generator)  # noqa: E731
    elif spec.sparsify == "band":
        gs = [p["gamma"] for p in per_model]
        sp = lambda d, i: ops.magnitude_band(d, ds[i], gs[i], rescale)  # noqa: E731
    else:
        sp = None
    return ops.generalized_task_arithmetic(base, others, w, lam=shared["lambda"], normalize=shared["normalize"],
                                           consensus=spec.consensus, sparsify=sp, **kw)
