"""Linear probes per layer: planted separability, shuffled-label control, d′, transfer, bad input, SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.linear import d_prime, probe_layers, probe_sets, probe_transfer

L, D, SEP_FROM = 5, 16, 2


def _data(n: int = 100, shift: float = 3.0, seed: int = 0, flip: bool = False):
    """[2n, L, 1, d] Gaussian activations; from layer SEP_FROM the classes differ by `shift` along one axis."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, L, 1, D, generator=g)
    y = np.r_[np.ones(n, int), np.zeros(n, int)]
    axis = torch.zeros(D)
    axis[3] = shift * (-1 if flip else 1)
    x[:n, SEP_FROM:] += axis
    return x, y


def test_probe_accuracy_follows_planted_separation():
    x, y = _data()
    df = probe_layers(x, y, progress=False)
    assert list(df.columns) == ["layer", "position", "probe_accuracy", "probe_auroc", "control_accuracy",
                                "control_auroc", "d_prime", "n"]
    assert df["layer"].tolist() == list(range(L)) and (df["position"] == "-1").all() and (df["n"] == 200).all()
    t = df.set_index("layer")
    # Bayes accuracy for a 3σ shift is Φ(1.5) = 0.93
    assert (t.loc[SEP_FROM:, "probe_accuracy"] > 0.85).all() and (t.loc[SEP_FROM:, "probe_auroc"] > 0.92).all()
    assert (t.loc[: SEP_FROM - 1, "probe_accuracy"] < 0.62).all()
    assert (df["control_accuracy"] - 0.5).abs().max() < 0.12
    assert abs(df["control_accuracy"].mean() - 0.5) < 0.06
    # d′ along the difference in means ≈ the planted shift / unit noise
    assert t.loc[SEP_FROM:, "d_prime"].to_numpy() == pytest.approx(3.0, abs=0.4)
    assert t.loc[: SEP_FROM - 1, "d_prime"].abs().max() < 0.6


def test_probe_sets_labels_and_layers():
    x, _ = _data(n=30)
    df = probe_sets(x[:30], x[30:], layers=[1, 3], folds=3, progress=False)
    assert df["layer"].tolist() == [1, 3]
    assert df.set_index("layer").loc[3, "probe_accuracy"] > df.set_index("layer").loc[1, "probe_accuracy"]


def test_d_prime_sign_and_scale():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 3))
    y = np.r_[np.ones(2000, int), np.zeros(2000, int)]
    x[:2000, 0] += 2.0
    assert d_prime(x, y) == pytest.approx(2.0, abs=0.1)
    assert d_prime(np.zeros((10, 3)), np.r_[np.ones(5, int), np.zeros(5, int)]) == 0.0


def test_probe_transfer():
    xa, ya = _data(seed=1)
    xb, yb = _data(seed=2)
    same = probe_transfer(xa, ya, xb, yb).set_index("layer")
    assert list(same.columns) == ["position", "transfer_accuracy", "transfer_auroc"]
    assert (same.loc[SEP_FROM:, "transfer_accuracy"] > 0.85).all()
    xc, yc = _data(seed=3, flip=True)                                  # B encodes the concept the other way round
    flipped = probe_transfer(xa, ya, xc, yc).set_index("layer")
    assert (flipped.loc[SEP_FROM:, "transfer_auroc"] < 0.1).all()
    with pytest.raises(VlsafeError, match="hidden size"):
        probe_transfer(xa, ya, xb[..., :8], yb)


def test_bad_probe_inputs():
    x, y = _data(n=10)
    with pytest.raises(VlsafeError, match="two classes"):
        probe_layers(x, np.ones(20, int), progress=False)
    with pytest.raises(VlsafeError, match="19 labels for 20"):
        probe_layers(x, y[:19], progress=False)
    with pytest.raises(VlsafeError, match="has 1 prompt"):
        probe_layers(x[9:], y[9:], progress=False)
    with pytest.raises(VlsafeError, match="not captured"):
        probe_layers(x, y, layers=[L + 1], progress=False)
    with pytest.raises(VlsafeError, match="empty"):
        probe_sets(x[:0], x, progress=False)


@pytest.mark.smollm2
def test_smollm2_late_layers_separate_harmful_from_harmless(smollm2_dir):
    from vlsafe.probes.behavior.datasets import load_prompts
    from vlsafe.probes.capture import capture
    from vlsafe.probes.models import load

    lm = load(smollm2_dir)
    harmful = load_prompts("harmful-train").sample(100, seed=0)
    harmless = load_prompts("harmless-train").sample(100, seed=0)
    layers = [0, 6, 12, 18, 21, 24]          # the forward stops after the last requested block
    kw = dict(positions="last", layers=layers, batch_size=16, progress=False)
    df = probe_sets(capture(lm, harmful.prompts, **kw), capture(lm, harmless.prompts, **kw), progress=False)
    t = df.set_index("layer")
    assert (t.loc[20:, "probe_accuracy"] >= 0.85).all(), df
    assert (df["control_accuracy"] - 0.5).abs().max() < 0.15, df
    assert abs(df["control_accuracy"].mean() - 0.5) < 0.08, df
    assert t.loc[0, "probe_accuracy"] < 0.7                            # layer 0, last token = template token
