"""`vlsafe.analysis.layergroups`: group sums per (layer, module) and per layer, and the row order of the tables."""

from __future__ import annotations

import pandas as pd

from vlsafe.analysis.layergroups import group_layers, layer_order


def _rows() -> pd.DataFrame:
    rows = [("b", "lm_head", None, 7.0), ("b", "mlp.down_proj", 1, 1.0), ("b", "q_proj", 1, 2.0),
            ("b", "custom", 0, 3.0), ("b", "q_proj", 0, 4.0), ("b", "embed", None, 5.0), ("b", "norm", None, 6.0),
            ("c", "q_proj", 0, 10.0), ("b", "q_proj", 1, 20.0)]
    df = pd.DataFrame(rows, columns=["checkpoint_b", "module", "layer", "x"])
    df["layer"] = df["layer"].astype("Int64")
    return df


def test_group_sums_per_module_and_per_layer() -> None:
    g = group_layers(_rows(), ["checkpoint_b"], ["x"])
    b = g[g["checkpoint_b"] == "b"]
    got = list(zip(b["layer"].astype("object").where(b["layer"].notna(), None), b["module"], b["n_tensors"], b["x"]))
    assert got == [(None, "embed", 1, 5.0),
                   (0, "q_proj", 1, 4.0), (0, "custom", 1, 3.0), (0, "all", 2, 7.0),
                   (1, "q_proj", 2, 22.0), (1, "mlp.down_proj", 1, 1.0), (1, "all", 3, 23.0),
                   (None, "lm_head", 1, 7.0), (None, "norm", 1, 6.0)]
    c = g[g["checkpoint_b"] == "c"]
    assert list(c["module"]) == ["q_proj", "all"] and list(c["x"]) == [10.0, 10.0]
    assert list(g["checkpoint_b"]) == ["b"] * 9 + ["c"] * 2  # groups keep their first-seen order


def test_maxima_and_empty_input() -> None:
    df = _rows().assign(m=range(9))
    g = group_layers(df, ["checkpoint_b"], ["x"], ["m"])
    assert g.loc[(g["checkpoint_b"] == "b") & (g["module"] == "all") & (g["layer"] == 1), "m"].item() == 8
    assert group_layers(df.iloc[:0], ["checkpoint_b"], ["x"]).empty


def test_sort_is_stable_within_equal_keys() -> None:
    assert layer_order([2, 2, None, 2], ["q_proj", "q_proj", "embed", "q_proj"], [0, 0, 0, 1]) == [2, 0, 1, 3]


def test_groups_match_pandas_groupby_on_random_tables() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    mods = ["q_proj", "mlp.up_proj", "embed", "norm", "custom", "input_layernorm"]
    for _ in range(50):
        n = int(rng.integers(1, 40))
        df = pd.DataFrame({"k": rng.choice(["a", "b"], n), "module": rng.choice(mods, n),
                           "layer": pd.array([None if rng.random() < 0.3 else int(rng.integers(0, 4))
                                              for _ in range(n)], dtype="Int64"),
                           "s": np.where(rng.random(n) < 0.1, np.nan, rng.normal(size=n)),
                           "i": rng.integers(0, 100, n), "m": np.where(rng.random(n) < 0.1, np.nan, rng.normal(size=n))})
        g = group_layers(df, ["k"], ["s", "i"], ["m"])
        assert g["i"].dtype == np.int64 and g["n_tensors"].dtype == np.int64
        per_module = df.groupby(["k", "layer", "module"], dropna=False).agg(
            n_tensors=("s", "size"), s=("s", "sum"), i=("i", "sum"), m=("m", "max")).reset_index()
        per_layer = df.dropna(subset=["layer"]).groupby(["k", "layer"]).agg(
            n_tensors=("s", "size"), s=("s", "sum"), i=("i", "sum"), m=("m", "max")).reset_index().assign(module="all")
        want = pd.concat([per_module, per_layer])
        key = ["k", "layer", "module"]
        got = g.sort_values(key).reset_index(drop=True)
        want = want.sort_values(key).reset_index(drop=True)[list(got.columns)]
        pd.testing.assert_frame_equal(got, want, check_dtype=False)
