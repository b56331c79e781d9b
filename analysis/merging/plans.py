"""Layer-targeted merge plans built from measurements.

Scores come from the tables vlsafe writes: a diff `layers.csv` (`layer, module, rel_frobenius, cosine`:
where the weights moved most), a probe `layers.csv` (`checkpoint, layer, position, probe_accuracy, …`:
where harmful and harmless prompts separate), or any per-layer series (e.g. a safety-layer curve). Plans
are ordinary `MergePlan`s, so they run with `run_merge` and export to mergekit YAML.

>>> scores = diff_scores("runs/diff/layers.csv")                    # per-layer relative change
>>> plan = plan_restore_layers("lvlm", "llm-aligned", top_k_layers(scores, k=4), alpha=0.5)
>>> plan = plan_proportional(scores, max_lambda=0.8, base="lvlm", target="llm-aligned")
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Mapping

import pandas as pd

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.merging.config import LayerMap, MergePlan, ModelEntry

Table = pd.DataFrame | str | os.PathLike


def _read(table: Table) -> tuple[pd.DataFrame, str]:
    if isinstance(table, pd.DataFrame):
        return table, "table"
    try:
        return pd.read_csv(table), str(table)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise VlsafeError(f"{table}: cannot read CSV ({e.__class__.__name__})") from None


def _checked(plan: MergePlan) -> MergePlan:
    plan.validate_structure("plan")
    return plan


def layer_scores(table: Table, score_col: str, *, module: str | None = "all", checkpoint: str | None = None,
                 position: int | str | None = None, agg: str = "mean") -> pd.Series:
    """One score per layer (index `layer`, sorted) from a tidy table, filtered then aggregated by `agg`.

    `module` filters a diff table (`all` = the per-layer aggregate rows); `checkpoint`/`position` filter a
    probe table. Rows without a layer (embeddings, head) are dropped.
    """
    df, src = _read(table)
    for col in ("layer", score_col):
        if col not in df.columns:
            raise VlsafeError(f"{src}: no column '{col}' (columns: {', '.join(map(str, df.columns))})")
    for col, value in (("module", module), ("checkpoint", checkpoint), ("position", position)):
        if value is not None and col in df.columns:
            df = df[df[col].astype(str) == str(value)]
    df = df.dropna(subset=["layer"])
    if df.empty:
        raise VlsafeError(f"{src}: no rows left for module={module}, checkpoint={checkpoint}, position={position}")
    scores = df.groupby(df["layer"].astype(int))[score_col].agg(agg).sort_index()
    if scores.isna().any():
        raise VlsafeError(f"{src}: '{score_col}' is missing for layer {int(scores[scores.isna()].index[0])}")
    return scores.rename(score_col)


def diff_scores(table: Table, metric: str = "rel_frobenius", module: str = "all") -> pd.Series:
    """Per-layer weight shift from a diff `layers.csv`; `cosine` becomes 1 − cosine (bigger = moved more)."""
    s = layer_scores(table, metric, module=module)
    return (1.0 - s).rename("1-cosine") if metric == "cosine" else s


def probe_scores(table: Table, metric: str = "probe_accuracy", *, checkpoint: str | None = None,
                 position: int | str | None = None) -> pd.Series:
    """Per-layer separability from a probe `layers.csv` (mean over positions unless one is chosen)."""
    return layer_scores(table, metric, module=None, checkpoint=checkpoint, position=position)


def _series(scores: pd.Series | Mapping[int, float] | pd.DataFrame, score_col: str | None) -> pd.Series:
    if isinstance(scores, pd.DataFrame):
        if score_col is None:
            raise VlsafeError("top_k_layers: give score_col for a DataFrame")
        return layer_scores(scores, score_col, module="all" if "module" in scores.columns else None)
    return pd.Series(scores, dtype=float) if not isinstance(scores, pd.Series) else scores


def top_k_layers(scores: pd.Series | Mapping[int, float] | pd.DataFrame, score_col: str | None = None,
                 k: int = 4, *, largest: bool = True) -> list[int]:
    """The `k` layers with the largest (or smallest) score, returned in ascending layer order."""
    s = _series(scores, score_col)
    if not 0 < k <= len(s):
        raise VlsafeError(f"top_k_layers: k={k} but there are {len(s)} layers")
    picked = s.nlargest(k) if largest else s.nsmallest(k)
    return sorted(int(i) for i in picked.index)


def first_layer_reaching(scores: pd.Series | Mapping[int, float], threshold: float) -> int:
    """The first layer whose score is at least `threshold` (e.g. where probe accuracy first reaches 0.8).

    (Not the safety-layer onset of cosine curves: that is `vlsafe.probes.safety_layers.onset_layer`.)"""
    s = _series(scores, None).sort_index()
    hit = s[s >= threshold]
    if hit.empty:
        raise VlsafeError(f"first_layer_reaching: no layer reaches {threshold} "
                          f"(max {s.max():.3g} at layer {int(s.idxmax())})")
    return int(hit.index[0])


def layers_from(start: int, width: int, num_layers: int) -> list[int]:
    """`width` consecutive layers starting at `start`, clipped to the model."""
    if width <= 0 or not 0 <= start < num_layers:
        raise VlsafeError(f"layers_from: start {start} / width {width} outside a {num_layers}-layer model")
    return list(range(start, min(num_layers, start + width)))


def plan_restore_layers(lvlm: str, llm: str, layers: Iterable[int], alpha: float, *,
                        modules: list[str] | None = None, dtype: str = "float32") -> MergePlan:
    """Move `layers` of the LVLM's language model back toward the aligned LLM by α; copy everything else.

    θ_ℓ = θ_LVLM,ℓ + α(θ_LLM,ℓ − θ_LVLM,ℓ) on the chosen layers (task arithmetic with the LVLM as base);
    vision tower, projector, embeddings and other layers stay the LVLM's.
    """
    layers = sorted(int(i) for i in layers)
    if not layers:
        raise VlsafeError("plan_restore_layers: no layers chosen")
    return _checked(MergePlan(merge_method="task_arithmetic", base_model=lvlm, dtype=dtype, layers=layers, modules=modules,
                     models=[ModelEntry(model=llm, parameters={"weight": float(alpha)})]))


def plan_proportional(scores: pd.Series | Mapping[int, float], max_lambda: float, *, base: str, target: str,
                      modules: list[str] | None = None, dtype: str = "float32") -> MergePlan:
    """Per-layer coefficient λ_ℓ = max_lambda · s_ℓ / max(s) toward `target` (negative scores count as 0).

    θ_ℓ = θ_base,ℓ + λ_ℓ(θ_target,ℓ − θ_base,ℓ); non-layer tensors keep the base (λ = 0).
    """
    s = _series(scores, None).clip(lower=0.0)
    if s.empty or not all(math.isfinite(v) for v in s) or s.max() <= 0:
        raise VlsafeError("plan_proportional: scores must be finite with a positive maximum")
    coeffs = {int(i): float(max_lambda * v / s.max()) for i, v in s.items()}
    weight = LayerMap(layers=coeffs, default=0.0)
    return _checked(MergePlan(merge_method="task_arithmetic", base_model=base, dtype=dtype, modules=modules,
                     models=[ModelEntry(model=target, parameters={"weight": weight})]))


def plan_resta(sft: str, aligned: str, unaligned: str, beta: float, *, layers: list[int] | None = None,
               dtype: str = "float32") -> MergePlan:
    """RESTA: θ = θ_SFT + β(θ_aligned − θ_unaligned), as task arithmetic on base θ_SFT with weights β, −β."""
    return _checked(MergePlan(merge_method="task_arithmetic", base_model=sft, dtype=dtype, layers=layers,
                     models=[ModelEntry(model=aligned, parameters={"weight": float(beta)}),
                             ModelEntry(model=unaligned, parameters={"weight": -float(beta)})]))
