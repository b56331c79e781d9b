"""`vlsafe.probes.signals`: one row per layer, a column per available signal, Spearman with bootstrap CIs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.signals import signal_correlations, signals_table

L = 8


def _tables() -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(0)
    shift = np.arange(L, dtype=float)                       # planted: weight shift grows with depth
    diff = pd.DataFrame({"checkpoint_a": "a", "checkpoint_b": "b", "layer": list(range(L)) * 2,
                         "module": ["all"] * L + ["q_proj"] * L, "rel_frobenius": np.r_[shift, -shift],
                         "cosine": np.r_[1 - shift / 100, np.ones(L)]})
    patch = pd.DataFrame([{"layer": l, "component": c, "direction": d, "image": "none",
                           "recovered": (-shift[l] if c == "attn_out" else rng.normal()) * (1 if d == "restore" else 9)}
                          for l in range(L) for c in ("resid", "attn_out") for d in ("restore", "break")])
    return {"diff_layers": diff, "patching": patch}


def test_signals_columns_and_agreement() -> None:
    sig, notes = signals_table(_tables())
    assert list(sig["layer"]) == list(range(L))
    assert {"weight_shift", "weight_cosine_drop", "patching_resid", "patching_attn_out"} <= set(sig.columns)
    assert "direction_drift" not in sig.columns and any("direction_drift absent" in n for n in notes)
    np.testing.assert_allclose(sig["weight_shift"], np.arange(L))        # the module=all rows, not q_proj
    np.testing.assert_allclose(sig["patching_attn_out"], -np.arange(L))  # restore rows only
    corr = signal_correlations(sig, n_boot=200)
    row = corr[(corr.signal_a == "weight_shift") & (corr.signal_b == "patching_attn_out")].iloc[0]
    assert row["spearman"] == pytest.approx(-1.0) and row["ci_high"] == pytest.approx(-1.0)
    row = corr[(corr.signal_a == "weight_shift") & (corr.signal_b == "weight_cosine_drop")].iloc[0]
    assert row["spearman"] == pytest.approx(1.0) and row["n_layers"] == L
    other = corr[(corr.signal_a == "weight_shift") & (corr.signal_b == "patching_resid")].iloc[0]
    assert other["ci_low"] < other["spearman"] < other["ci_high"]


def test_constant_signal_gives_nan_and_no_tables_is_an_error() -> None:
    sig = pd.DataFrame({"layer": range(5), "a": np.arange(5.0), "b": np.ones(5)})
    corr = signal_correlations(sig, n_boot=20)
    assert np.isnan(corr["spearman"].iloc[0])
    with pytest.raises(VlsafeError, match="no table"):
        signals_table({})
