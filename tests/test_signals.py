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


def test_probe_signals_pick_source_and_target_labels() -> None:
    """A probe run over more checkpoints: the drift is read for the (source, target) pair, not the first/last."""
    layers = range(4)
    sim = pd.DataFrame([{"layer": l, "checkpoint_a": a, "checkpoint_b": b, "position": "-1",
                         "direction_cosine": c(l)} for l in layers for a, b, c in [
                            ("base", "aligned", lambda l: 0.5), ("aligned", "lvlm", lambda l: 1 - l / 10),
                            ("aligned", "lvlm+blank", lambda l: 1 - l / 5), ("aligned", "other", lambda l: 0.0)]])
    acc = pd.DataFrame([{"checkpoint": ck, "layer": l, "position": "-1", "probe_accuracy": v + l}
                        for ck, v in [("base", 0.0), ("aligned", 1.0), ("lvlm", 3.0), ("other", 9.0)] for l in layers])
    sig, notes = signals_table({"similarity": sim, "probe_layers": acc}, source="aligned", target="lvlm")
    np.testing.assert_allclose(sig["direction_drift"], [l / 10 for l in layers])
    np.testing.assert_allclose(sig["direction_drift_image"], [l / 5 for l in layers])
    np.testing.assert_allclose(sig["probe_accuracy_delta"], 2.0)
