"""One table of localisation signals on the shared layer axis, and whether they agree (Spearman, bootstrap CI).

`signals_table` takes whatever tables a run has (each optional) and returns one row per layer with one column per
signal it could compute (bigger = "more is lost / moved here" for every column except `probe_accuracy_delta`,
`taskvector_cosine` and the projections, which keep their sign):

| column | from | value per layer |
|---|---|---|
| `weight_shift` | `vlsafe diff` layers.csv (`module=all`) | relative Frobenius change |
| `weight_cosine_drop` | the same | 1 − cosine of the weights |
| `taskvector_cosine` | `vlsafe diff --base` taskvectors.csv (`module=all`) | task-vector cosine |
| `direction_drift`, `direction_drift_image` | `vlsafe probe` similarity.csv (last position) | 1 − cosine of the
  source's and the target's (text; `+image` variant) directions |
| `probe_accuracy_delta` | `vlsafe probe` layers.csv | target − source probe accuracy (last position) |
| `refusal_projection_drop` | `vlsafe probe` drift.csv | reference − other mean harmful projection on the reference direction |
| `patching_<component>[_<image>]` | `patching.csv` (`restore`) | recovered fraction |
| `atp_<component>[_<image>]` | `patching.csv` of `--method attribution` | estimated recovered fraction |
| `image_shift_refusal_<condition>` | `shift.csv` (harmful, last position) | shift projected on the refusal direction |

A missing table means the column is absent; `notes` says which and why.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

from vlsafe.analysis.errors import VlsafeError

__all__ = ["signals_table", "signal_correlations", "signal_label"]

# column stem → (panel title, y-axis label): what each signal is and in which unit (see the table above)
SIGNAL_LABELS: dict[str, tuple[str, str]] = {
    "weight_shift": ("weight shift", "‖ΔW‖ / ‖W‖"),
    "weight_cosine_drop": ("weight cosine drop", "1 − cos(W, W′)"),
    "taskvector_cosine": ("task-vector cosine", "cos(τ_A, τ_B)"),
    "direction_drift_image": ("refusal-direction drift, image", "1 − cos(r, r′)"),
    "direction_drift": ("refusal-direction drift", "1 − cos(r, r′)"),
    "probe_accuracy_delta": ("probe accuracy change", "Δ accuracy"),
    "refusal_projection_drop": ("refusal projection drop", "Δ mean projection"),
    "patching": ("patching", "recovered fraction"),
    "atp": ("attribution patching", "est. recovered fraction"),
    "image_shift_refusal": ("image shift on r̂", "shift · r̂"),
}


def signal_label(column: str) -> tuple[str, str]:
    """(title, y label) of a `signals_table` column: `patching_resid_scene` → ("patching resid (scene)",
    "recovered fraction"); a column no stem names keeps its own name and gets no unit."""
    for stem, (title, unit) in SIGNAL_LABELS.items():
        if column == stem or column.startswith(stem + "_"):
            rest = column[len(stem) + 1:]
            if stem in ("patching", "atp"):  # `<component>[_<image>]`
                from vlsafe.probes.patching import COMPONENTS

                comp = next((c for c in COMPONENTS if rest == c or rest.startswith(c + "_")), "")
                title, rest = f"{title} {comp}".strip(), rest[len(comp) + 1:] if comp else rest
            return (f"{title} ({rest})" if rest else title), unit
    return column.replace("_", " "), ""


def _last_position(df: pd.DataFrame) -> pd.DataFrame:
    if "position" not in df.columns:
        return df
    pos = df["position"].astype(str)
    for want in ("-1", "last"):
        if (pos == want).any():
            return df[pos == want]
    return df


def _per_layer(df: pd.DataFrame, col: str) -> pd.Series:
    df = df.dropna(subset=["layer"])
    return df.groupby(df["layer"].astype(int))[col].mean()


def _diff(tables: Mapping[str, pd.DataFrame], out: dict[str, pd.Series], notes: list[str],
          target: str | None) -> None:
    layers = tables.get("diff_layers")
    if layers is None:
        notes.append("no diff layers table: weight_shift, weight_cosine_drop absent")
    else:
        rows = layers[layers["module"] == "all"]
        if "checkpoint_b" in rows.columns and rows["checkpoint_b"].nunique() > 1:
            posts = list(dict.fromkeys(rows["checkpoint_b"]))
            pick = target if target in posts else posts[-1]
            notes.append(f"diff has several POSTs: weight shift of {pick}")
            rows = rows[rows["checkpoint_b"] == pick]
        out["weight_shift"] = _per_layer(rows, "rel_frobenius")
        out["weight_cosine_drop"] = 1 - _per_layer(rows, "cosine")
    tv = tables.get("taskvectors")
    if tv is None:
        notes.append("no task-vector table (diff --base): taskvector_cosine absent")
    else:
        out["taskvector_cosine"] = _per_layer(tv[tv["module"] == "all"] if "module" in tv else tv, "cosine")


def _pick(labels: list[Any], want: str | None, fallback: int) -> Any:
    if want is not None:
        return want if want in labels else None
    return labels[fallback] if labels else None


def _probe(tables: Mapping[str, pd.DataFrame], out: dict[str, pd.Series], notes: list[str],
           source: str | None, target: str | None) -> None:
    sim, layers, drift = (tables.get(k) for k in ("similarity", "probe_layers", "drift"))
    if sim is None:
        notes.append("no probe similarity table: direction_drift absent")
    else:
        sim = _last_position(sim)
        ref = source if source is not None else sim["checkpoint_a"].iloc[0]
        pairs = sim[(sim["checkpoint_a"] == ref) | (sim["checkpoint_b"] == ref)]
        other = np.where(pairs["checkpoint_a"] == ref, pairs["checkpoint_b"], pairs["checkpoint_a"])
        pairs = pairs.assign(other=other)
        others = [o for o in dict.fromkeys(pairs["other"]) if o != ref]
        text = [o for o in others if "+" not in str(o) and (target is None or o == target)]
        image = [o for o in others if "+" in str(o) and (target is None or str(o).startswith(f"{target}+"))]
        for name, cands in (("direction_drift", text), ("direction_drift_image", image)):
            if cands:
                out[name] = 1 - _per_layer(pairs[pairs["other"] == cands[-1]], "direction_cosine")
                notes.append(f"{name}: {ref} vs {cands[-1]}")
            else:
                notes.append(f"{name} absent: no {ref} / {target or 'other'} pair in the probe run")
    if layers is None:
        notes.append("no probe layers table: probe_accuracy_delta absent")
    elif (ends := _endpoints(layers, "checkpoint", "probe_accuracy", source, target)) is not None:
        (a, acc_a), (b, acc_b) = ends
        out["probe_accuracy_delta"] = acc_b - acc_a
    if drift is None:
        notes.append("no probe drift table: refusal_projection_drop absent")
    elif (ends := _endpoints(drift, "activations_from", "harmful_mean", source, target)) is not None:
        (a, mean_a), (b, mean_b) = ends
        out["refusal_projection_drop"] = mean_a - mean_b
        notes.append(f"refusal_projection_drop: {a} − {b} on {drift['direction_from'].iloc[0]}'s direction")


def _endpoints(df: pd.DataFrame, label_col: str, value_col: str, source: str | None,
               target: str | None) -> tuple[tuple[Any, pd.Series], tuple[Any, pd.Series]] | None:
    """(source label, its per-layer `value_col`) and the same for the target, at the last position, text-only
    labels (no `+image`); None when either is missing or they are the same checkpoint."""
    df = _last_position(df)
    labels = [lb for lb in dict.fromkeys(df[label_col]) if "+" not in str(lb)]
    a, b = _pick(labels, source, 0), _pick(labels, target, -1)
    if a is None or b is None or a == b:
        return None
    return tuple((lb, _per_layer(df[df[label_col] == lb], value_col)) for lb in (a, b))  # type: ignore[return-value]


def _is_attribution(pt: pd.DataFrame) -> bool:
    """True for a `patching.csv` of first-order estimates (`vlsafe locate --method attribution`)."""
    return "method" in pt.columns and bool((pt["method"] == "attribution").any())


def _own(tables: Mapping[str, pd.DataFrame], out: dict[str, pd.Series], notes: list[str]) -> None:
    pt = tables.get("patching")
    if pt is None:
        notes.append("no patching table: patching columns absent")
    else:
        pt = pt[pt["direction"] == "restore"]
        stem = "atp" if _is_attribution(pt) else "patching"   # first-order estimates get their own name
        for (comp, image), g in pt.groupby(["component", "image"], sort=False):
            name = f"{stem}_{comp}" + ("" if image in ("none", "text") else f"_{image}")
            out[name.replace(":", "").replace("/", "_")] = _per_layer(g, "recovered")
    sh = tables.get("shift")
    if sh is None:
        notes.append("no shift table: image_shift columns absent")
    else:
        sh = _last_position(sh[sh["label"] == "harmful"])
        for cond, g in sh.groupby("condition", sort=False):
            out[f"image_shift_refusal_{cond}".replace(":", "")] = _per_layer(g, "refusal_projection")


def signals_table(tables: Mapping[str, pd.DataFrame | None], *, source: str | None = None,
                  target: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """(`signals.csv`: `layer` + one column per available signal, notes). `tables` maps the table kinds
    `diff_layers`, `taskvectors`, `probe_layers`, `similarity`, `drift`, `patching`, `shift` to DataFrames
    (or None). `source`/`target` are the two checkpoints' labels in a probe run with more checkpoints (default:
    its first and last)."""
    out: dict[str, pd.Series] = {}
    notes: list[str] = []
    _diff(tables, out, notes, target)
    _probe(tables, out, notes, source, target)
    _own(tables, out, notes)
    if not out:
        raise VlsafeError("signals: no table to compute a signal from")
    df = pd.DataFrame(out)
    df.index.name = "layer"
    return df.sort_index().reset_index(), notes


def signal_correlations(signals: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """`signals_corr.csv`: Spearman ρ between every pair of signal columns over the layers both have, with a
    bootstrap 95 % interval over layers (resampled with replacement; degenerate resamples skipped)."""
    cols = [c for c in signals.columns if c != "layer"]
    rng = np.random.default_rng(seed)
    rows = []
    for i, a in enumerate(cols):
        for b in cols[i + 1:]:
            both = signals[[a, b]].dropna().to_numpy(dtype=float)
            rho, lo, hi = _spearman_ci(both, rng, n_boot)
            rows.append({"signal_a": a, "signal_b": b, "spearman": rho, "ci_low": lo, "ci_high": hi,
                         "n_layers": len(both)})
    return pd.DataFrame(rows, columns=["signal_a", "signal_b", "spearman", "ci_low", "ci_high", "n_layers"])


def _rho(x: np.ndarray) -> float:
    if len(x) < 3 or np.ptp(x[:, 0]) == 0 or np.ptp(x[:, 1]) == 0:
        return float("nan")
    ra, rb = (pd.Series(x[:, k]).rank().to_numpy() for k in (0, 1))   # average ranks for ties
    return float(np.corrcoef(ra, rb)[0, 1])


def _spearman_ci(x: np.ndarray, rng: Any, n_boot: int) -> tuple[float, float, float]:
    rho = _rho(x)
    if np.isnan(rho):
        return rho, float("nan"), float("nan")
    boot = np.array([_rho(x[rng.integers(0, len(x), len(x))]) for _ in range(n_boot)])
    boot = boot[~np.isnan(boot)]
    if not len(boot):
        return rho, float("nan"), float("nan")
    return rho, float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))
