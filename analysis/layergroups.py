"""Per-layer aggregation of per-tensor rows: groups per (layer, module) plus `module=all` per layer, in block order.

Shared by `vlsafe.analysis.weightshift.aggregate_layers` and `vlsafe.analysis.taskvectors.aggregate_task_vectors`: both sum
fp64 per-tensor statistics over groups and derive ratios from the sums. The tables have a few hundred rows,
so groups are found with a dict over the rows and reduced with numpy and `math.fsum`: pandas `groupby`'s fixed
costs per call were a visible share of a cold small diff (`docs/performance.md`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

MODULE_ORDER = ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "post_attention_layernorm",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def group_layers(df: pd.DataFrame, keys: Sequence[str], sums: Sequence[str], maxes: Sequence[str] = ()) -> pd.DataFrame:
    """Per (*keys, layer, module) and per (*keys, layer) with `module="all"`: `n_tensors` and the column sums
    of `sums` (NaN counted as 0) and maxima of `maxes` (NaN skipped). Rows without a layer (embeddings,
    final norm, head) form their own (layer=NA, module) groups and enter no `all` row. Rows are in
    `layer_order` within each `keys` group (groups in first-seen order); columns are keys, layer, module,
    n_tensors, sums, maxes."""
    keys = list(keys)
    kv = list(zip(*(df[k].tolist() for k in keys))) if keys else [()] * len(df)
    layers = [None if pd.isna(x) else int(x) for x in df["layer"].tolist()]
    modules = df["module"].tolist()
    per_module: dict[tuple, int] = {}
    per_layer: dict[tuple, int] = {}
    mod_ids = [per_module.setdefault((*k, ly, m), len(per_module)) for k, ly, m in zip(kv, layers, modules)]
    lay_ids = [per_layer.setdefault((*k, ly), len(per_layer)) if ly is not None else -1
               for k, ly in zip(kv, layers)]
    ids = np.array(mod_ids + [len(per_module) + i for i in lay_ids if i >= 0], dtype=np.int64)
    rows = np.array(list(range(len(df))) + [r for r, i in enumerate(lay_ids) if i >= 0], dtype=np.int64)
    labels = list(per_module) + [(*k, "all") for k in per_layer]
    stats = _reduce(df, ids, rows, len(labels), sums, maxes)
    group: dict[tuple, int] = {}
    first = [group.setdefault(lab[:len(keys)], len(group)) for lab in labels]
    order = layer_order([lab[-2] for lab in labels], [str(lab[-1]) for lab in labels], first)
    cols: dict[str, Any] = {k: [labels[i][j] for i in order] for j, k in enumerate(keys)}
    cols["layer"] = pd.array([labels[i][-2] for i in order], dtype="Int64")
    cols["module"] = [labels[i][-1] for i in order]
    cols.update({c: v[order] for c, v in stats.items()})
    return pd.DataFrame(cols)


def _reduce(df: pd.DataFrame, ids: np.ndarray, rows: np.ndarray, n: int, sums: Sequence[str],
            maxes: Sequence[str]) -> dict[str, np.ndarray]:
    """`n_tensors`, sums and maxima of the source `rows` into the groups `ids`. Float sums are correctly rounded
    (`math.fsum`, independent of row order); int columns stay int."""
    by = np.argsort(ids, kind="stable")
    counts = np.bincount(ids, minlength=n).astype(np.int64)
    ends = np.cumsum(counts).tolist()
    spans = list(zip([0, *ends[:-1]], ends))
    out = {"n_tensors": counts}
    for c in sums:
        v = df[c].to_numpy()
        if v.dtype.kind in "iu":
            out[c] = np.zeros(n, dtype=np.int64)
            np.add.at(out[c], ids, v[rows])
        else:
            v = df[c].to_numpy(dtype=np.float64, na_value=np.nan)[rows][by]
            v = np.where(np.isnan(v), 0.0, v).tolist()
            out[c] = np.array([math.fsum(v[a:b]) for a, b in spans], dtype=np.float64)
    for c in maxes:
        v, acc = df[c].to_numpy(dtype=np.float64, na_value=np.nan), np.full(n, np.nan)
        np.fmax.at(acc, ids, v[rows])
        out[c] = acc.astype(np.int64) if df[c].to_numpy().dtype.kind in "iu" else acc
    return out


def layer_order(layers: Sequence[int | None], modules: Sequence[str], group: Sequence[int]) -> list[int]:
    """Row order: by `group` id, then within a group embed first, then layers ascending
    (modules in block order, unknown modules by name after them, `all` last), then the other layer-less rows
    by name. Stable for ties."""
    rank = {m: i for i, m in enumerate(MODULE_ORDER)}

    def key(i: int) -> tuple:
        ly, m, g = layers[i], modules[i], group[i]
        if ly is None:
            return g, 0 if m == "embed" else 2, 0, 0, 0, m
        known = m in rank
        return g, 1, ly, 2 if m == "all" else 1, rank.get(m, len(rank)), "" if known or m == "all" else m
    return sorted(range(len(layers)), key=key)


def cosine(dot: float, sq_a: float, sq_b: float) -> float:
    """⟨a,b⟩/(‖a‖‖b‖) from fp64 sums (NaN when either side is zero)."""
    den = math.sqrt(sq_a * sq_b)
    return dot / den if den > 0 else math.nan
