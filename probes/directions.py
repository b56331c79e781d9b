"""Difference-in-means safety directions per layer × position, their file format, and selection.

After Arditi et al. 2024 (`andyrdt/refusal_direction`; formulas in `docs/methods.md`, "Refusal directions"):
`r[ℓ, i] = μ_harmful[ℓ, i] − μ_harmless[ℓ, i]` over the residual stream entering block ℓ at position i,
means accumulated in **fp64**; shape `[L, P, d]` (vlsafe's one layout, see `vlsafe.probes.activations`).
Selection ablates each unit candidate everywhere (bypass), adds the raw candidate at its own layer (induce),
measures KL(baseline ‖ ablated) on harmless prompts, discards NaN, late layers (ℓ ≥ int(0.8 L)), KL > 0.1 and
induce < 0, and keeps the lowest bypass.

>>> acts_h = capture(lm, harmful, positions="post_instruction")       # vlsafe.probes.capture
>>> ds = DirectionSet.from_activations(acts_h, capture(lm, harmless, ...), checkpoint=lm.checkpoint)
>>> ds.save("directions.safetensors"); sel = select_direction(lm, ds, harmful_val, harmless_val)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.runinfo import atomic_path
from vlsafe.probes.stacking import positions_of, stacked_means
from vlsafe.probes.scores import refusal_tokens, score_batches  # noqa: F401  (refusal_tokens re-exported)

FORMAT = "vlsafe.directions/2"   # tensors `[L, P, d]`
_FORMAT_V1 = "vlsafe.directions/1"   # older files: tensors `[P, L, d]`, transposed on load


def _mean(x: Any, what: str, hook: str, layers: Sequence[int] | None) -> tuple[torch.Tensor, int, list[int]]:
    """(mean `[L, P, d]` fp64, count, layers) from activations (either capture mode) or a tensor."""
    try:
        return stacked_means(x, hook=hook, layers=layers)
    except VlsafeError as e:
        raise VlsafeError(f"difference in means, {what} set: {e}") from None


def mean_diff(acts_harmful: Any, acts_harmless: Any, *, hook: str = "resid_pre", layers: Sequence[int] | None = None,
              normalize: bool = False) -> torch.Tensor:
    """`μ_harmful − μ_harmless` as fp64 `[L, P, d]` (unit vectors along d when `normalize`).

    Each input is what `vlsafe.probes.capture.capture` returns (tensor or `accumulate=True` streaming mode), or a
    `[n, L, P, d]` / `[n, L, d]` tensor.
    """
    diff = _diff(acts_harmful, acts_harmless, hook, layers)[0]
    return unit(diff) if normalize else diff


def _diff(acts_harmful: Any, acts_harmless: Any, hook: str,
          layers: Sequence[int] | None) -> tuple[torch.Tensor, int, int, list[int]]:
    """(μ_harmful − μ_harmless `[L, P, d]` fp64, n_harmful, n_harmless, layers)."""
    mh, nh, lays = _mean(acts_harmful, "harmful", hook, layers)
    mb, nb, lb = _mean(acts_harmless, "harmless", hook, lays)
    if lays != lb or mh.shape != mb.shape:
        raise VlsafeError(f"difference in means: harmful activations {tuple(mh.shape)} do not match harmless "
                          f"{tuple(mb.shape)} (layers × positions × d)")
    return mh - mb, nh, nb, lays


def unit(x: torch.Tensor) -> torch.Tensor:
    """Normalise along the last axis (zero vectors stay zero)."""
    n = x.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, x / n.clamp_min(1e-300), torch.zeros_like(x))


@dataclass
class DirectionSet:
    """Raw difference-in-means directions `[L, P, d]` (fp64) with where they came from.

    `layers` label the first axis (block indices: the residual stream entering that block); `positions` the
    second (e.g. `[-1]`, `[-5, …, -1]`, `["mean"]`). `model_hash`/`hidden_size`/`num_layers` describe the model.
    """

    raw: torch.Tensor
    layers: list[int]
    positions: list[Any]
    hidden_size: int
    num_layers: int
    model_hash: str = ""
    model_spec: str = ""
    hook: str = "resid_pre"
    n_harmful: int = 0
    n_harmless: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.raw = torch.as_tensor(self.raw, dtype=torch.float64)
        if self.raw.dim() != 3 or self.raw.shape[0] != len(self.layers) or self.raw.shape[1] != len(self.positions) \
                or self.raw.shape[2] != self.hidden_size:
            raise VlsafeError(f"direction set: tensor shape {tuple(self.raw.shape)} does not match "
                              f"{len(self.layers)} layers × {len(self.positions)} positions × "
                              f"hidden {self.hidden_size}")

    @classmethod
    def from_activations(cls, acts_harmful: Any, acts_harmless: Any, *, checkpoint: Any = None,
                         hook: str = "resid_pre", layers: Sequence[int] | None = None,
                         positions: Sequence[Any] | None = None, num_layers: int | None = None) -> "DirectionSet":
        """Difference in means of two captured sets; `checkpoint` (a `Checkpoint`) fills the model metadata."""
        raw, nh, nb, lays = _diff(acts_harmful, acts_harmless, hook, layers)
        pos = list(positions) if positions is not None else positions_of(acts_harmful, raw.shape[1])
        return cls(raw, lays, pos, raw.shape[-1],
                   num_layers if num_layers is not None else (checkpoint.num_layers if checkpoint else max(lays) + 1),
                   model_hash=checkpoint.content_hash() if checkpoint is not None else "",
                   model_spec=getattr(checkpoint, "spec", "") if checkpoint is not None else "",
                   hook=hook, n_harmful=nh, n_harmless=nb)

    # ---- access -------------------------------------------------------------------------------------
    @property
    def unit(self) -> torch.Tensor:
        return unit(self.raw)

    @property
    def norms(self) -> torch.Tensor:
        """‖r‖ per `[L, P]`."""
        return self.raw.norm(dim=-1)

    def index(self, layer: int, *, position: Any = None) -> tuple[int, int]:
        """(layer index, position index) into `raw` of a layer and position label (default: the last position)."""
        if layer not in self.layers:
            raise VlsafeError(f"direction set has no layer {layer} (layers {self.layers[0]}–{self.layers[-1]} of a "
                              f"{self.num_layers}-layer model)")
        p = len(self.positions) - 1 if position is None else _find(self.positions, position)
        return self.layers.index(layer), p

    def get(self, layer: int, *, position: Any = None, normalize: bool = False) -> torch.Tensor:
        """The `[d]` direction at `layer` and `position` (default: the last); a unit vector when `normalize`."""
        li, p = self.index(layer, position=position)
        r = self.raw[li, p]
        return unit(r) if normalize else r.clone()

    def table(self, *, label: str = "") -> pd.DataFrame:
        """Tidy rows `checkpoint, layer, position, direction_norm`."""
        rows = [{"checkpoint": label, "layer": lay, "position": str(pos), "direction_norm": float(self.norms[i, p])}
                for p, pos in enumerate(self.positions) for i, lay in enumerate(self.layers)]
        return pd.DataFrame(rows)

    # ---- file format --------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {"layers": self.layers, "positions": self.positions, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "model_hash": self.model_hash, "model_spec": self.model_spec,
                "hook": self.hook, "n_harmful": self.n_harmful, "n_harmless": self.n_harmless, "extra": self.extra}

    def save(self, path: str | os.PathLike, *, label: str = "default") -> Path:
        """Write `directions.safetensors` holding this one set (see `save_directions` for several)."""
        return save_directions(path, {label: self})

    @classmethod
    def load(cls, path: str | os.PathLike, *, checkpoint: Any = None, label: str | None = None,
             allow_other_model: bool = False) -> "DirectionSet":
        """Read one set (the only one, or `label`); checked against `checkpoint` (see `load_directions`)."""
        sets = load_directions(path, checkpoint=checkpoint, allow_other_model=allow_other_model)
        if label is None:
            if len(sets) != 1:
                raise VlsafeError(f"{path}: holds {len(sets)} direction sets ({', '.join(sets)}); pass label=")
            return next(iter(sets.values()))
        if label not in sets:
            raise VlsafeError(f"{path}: no direction set {label!r} (has {', '.join(sets)})")
        return sets[label]

    def check_model(self, checkpoint: Any, *, where: str = "direction set", allow_other_model: bool = False) -> None:
        """Refuse a model with another hidden size, or (unless `allow_other_model`) another content hash."""
        hidden = _hidden(checkpoint)
        if hidden is not None and hidden != self.hidden_size:
            raise VlsafeError(f"{where}: directions have hidden size {self.hidden_size} but {_spec(checkpoint)} has "
                              f"{hidden}; they come from another model")
        if allow_other_model or not self.model_hash or not hasattr(checkpoint, "matches_hash"):
            return
        if not checkpoint.matches_hash(self.model_hash):
            raise VlsafeError(f"{where}: computed on {self.model_spec or 'another model'} "
                              f"(hash {self.model_hash[:12]}), not on {_spec(checkpoint)} "
                              f"(hash {checkpoint.content_hash()[:12]}); pass allow_other_model to apply it anyway")


def _find(positions: list[Any], position: Any) -> int:
    for i, p in enumerate(positions):
        if p == position or str(p) == str(position):
            return i
    raise VlsafeError(f"direction set has no position {position!r} (positions {positions})")


def _hidden(ckpt: Any) -> int | None:
    if hasattr(ckpt, "hidden_size"):
        return int(ckpt.hidden_size)
    if hasattr(ckpt, "checkpoint"):
        return int(ckpt.checkpoint.hidden_size)
    return None


def _spec(ckpt: Any) -> str:
    return str(getattr(ckpt, "spec", None) or getattr(getattr(ckpt, "checkpoint", None), "spec", "the model"))


def save_directions(path: str | os.PathLike, sets: Mapping[str, DirectionSet]) -> Path:
    """Write several direction sets (keyed by checkpoint label) to one safetensors file, atomically."""
    from safetensors.torch import save_file

    if not sets:
        raise VlsafeError(f"{path}: no direction sets to save")
    tensors = {f"{label}/raw": ds.raw.detach().clone().contiguous() for label, ds in sets.items()}
    meta = {"format": FORMAT, "sets": json.dumps({label: ds.metadata() for label, ds in sets.items()}, default=str)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_directions(path: str | os.PathLike, *, checkpoint: Any = None,
                    allow_other_model: bool = False) -> dict[str, DirectionSet]:
    """Read a `directions.safetensors`; with `checkpoint` (a `Checkpoint` or `LoadedModel`) every set is checked
    against it: another hidden size is always refused, another content hash unless `allow_other_model`.
    Files of the older format `vlsafe.directions/1` (tensors `[P, L, d]`) are read and transposed."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise VlsafeError(f"{p}: no such direction file")
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
            fmt = meta.get("format")
            if fmt not in (FORMAT, _FORMAT_V1):
                raise VlsafeError(f"{p}: not a vlsafe direction file (metadata format {fmt!r})")
            info = json.loads(meta["sets"])
            raw = {label: f.get_tensor(f"{label}/raw") for label in info}
            if fmt == _FORMAT_V1:
                raw = {label: t.transpose(0, 1) for label, t in raw.items()}
            sets = {label: DirectionSet(raw[label], **_from_meta(m)) for label, m in info.items()}
    except (OSError, ValueError, KeyError) as e:
        raise VlsafeError(f"{p}: unreadable direction file ({str(e).splitlines()[0][:160]})") from None
    if checkpoint is not None:
        for label, ds in sets.items():
            ds.check_model(checkpoint, where=f"{p} [{label}]", allow_other_model=allow_other_model)
    return sets


def _from_meta(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("layers", "positions", "hidden_size", "num_layers", "model_hash", "model_spec", "hook", "n_harmful",
            "n_harmless", "extra")
    return {k: m[k] for k in keys if k in m}


# ---- selection --------------------------------------------------------------------------------------------

@dataclass
class Selection:
    """Outcome of `select_direction`: every candidate's scores and filters, and the chosen one (or none)."""

    table: pd.DataFrame
    layer: int | None
    position: Any
    direction: torch.Tensor | None
    baseline_harmful: float
    baseline_harmless: float

    @property
    def filtered_all(self) -> bool:
        return self.layer is None


def _kl(base_logits: torch.Tensor, new_logits: torch.Tensor) -> float:
    """Mean KL(base ‖ new) over rows, fp64."""
    lp = torch.log_softmax(base_logits.to(torch.float64), -1)
    lq = torch.log_softmax(new_logits.to(torch.float64), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def select_direction(lm: Any, candidates: DirectionSet, harmful_val: Sequence[str], harmless_val: Sequence[str], *,
                     kl_threshold: float = 0.1, max_layer_frac: float = 0.8, kind: str = "first_token",
                     induce_coeff: float = 1.0, batch_size: int = 8, on_empty: str = "raise",
                     openings: Sequence[str] | None = None, progress: bool = True) -> Selection:
    """Pick the candidate that best bypasses refusal when ablated (`docs/methods.md`, "Refusal directions"), with
    a row per candidate.

    Table columns: `layer, position, bypass_score, induce_score, kl, direction_norm, filtered, reason, chosen`.
    When every candidate is filtered (a model that never refuses) raises `VlsafeError` (`on_empty="raise"`) or
    returns with `filtered_all` true (`on_empty="flag"`).
    """
    from vlsafe.probes.interventions import ablate_direction, add_direction

    if not harmful_val or not harmless_val:
        raise VlsafeError("select_direction: empty harmful or harmless validation set")
    kw = dict(kind=kind, batch_size=batch_size, openings=openings)
    base_h, _ = score_batches(lm, harmful_val, **kw)
    base_b, base_logits = score_batches(lm, harmless_val, **kw)
    cutoff = int(max_layer_frac * candidates.num_layers)
    rows = []
    grid = [(p, i) for p in range(len(candidates.positions)) for i in range(len(candidates.layers))]
    for p, i in tqdm(grid, desc="select direction", disable=not progress, leave=False):
        layer, r = candidates.layers[i], candidates.raw[i, p]
        row = {"layer": layer, "position": str(candidates.positions[p]), "direction_norm": float(r.norm())}
        if not torch.isfinite(r).all() or float(r.norm()) == 0:
            rows.append({**row, "bypass_score": np.nan, "induce_score": np.nan, "kl": np.nan})
            continue
        with ablate_direction(lm.model, r):
            bypass, _ = score_batches(lm, harmful_val, **kw)
            _, abl_logits = score_batches(lm, harmless_val, **kw)
        with add_direction(lm.model, r, layer, coeff=induce_coeff):
            induce, _ = score_batches(lm, harmless_val, **kw)
        rows.append({**row, "bypass_score": float(np.mean(bypass)), "induce_score": float(np.mean(induce)),
                     "kl": _kl(base_logits, abl_logits)})
    table = _filter(pd.DataFrame(rows), cutoff, kl_threshold)
    return _choose(table, candidates, float(np.mean(base_h)), float(np.mean(base_b)), on_empty, cutoff, kl_threshold)


def _filter(table: pd.DataFrame, cutoff: int, kl_threshold: float) -> pd.DataFrame:
    def reason(r: pd.Series) -> str:
        if any(np.isnan(r[c]) for c in ("bypass_score", "induce_score", "kl")):
            return "nan"
        if r["layer"] >= cutoff:
            return f"layer>={cutoff}"
        if r["kl"] > kl_threshold:
            return f"kl>{kl_threshold:g}"
        if r["induce_score"] < 0:
            return "induce<0"
        return ""

    table["reason"] = table.apply(reason, axis=1)
    table["filtered"] = table["reason"] != ""
    return table


def _choose(table: pd.DataFrame, cands: DirectionSet, base_h: float, base_b: float, on_empty: str, cutoff: int,
            kl_threshold: float) -> Selection:
    table["chosen"] = False
    table["baseline_harmful"], table["baseline_harmless"] = base_h, base_b
    kept = table[~table["filtered"]]
    if kept.empty:
        counts = table["reason"].value_counts().to_dict()
        why = ", ".join(f"{k}: {v}" for k, v in counts.items())
        msg = (f"all {len(table)} candidate directions were filtered out ({why}; "
               f"baseline harmful score {base_h:.2f}) — the model may never refuse; try kind='opening' or relax "
               f"kl_threshold={kl_threshold:g} / max_layer_frac")
        if on_empty == "raise":
            raise VlsafeError(msg)
        return Selection(table, None, None, None, base_h, base_b)
    best = kept["bypass_score"].idxmin()
    table.loc[best, "chosen"] = True
    layer, pos = int(table.loc[best, "layer"]), table.loc[best, "position"]
    return Selection(table, layer, pos, cands.get(layer, position=pos), base_h, base_b)
