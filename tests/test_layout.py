"""Every producer and consumer of activations agrees on one layout, `[n, L, P, d]` (see vlsafe.probes.activations).

A vector is planted in the residual stream entering block K at the second-to-last token only; the same prompts
are captured with and without it, so the difference in means is exactly the planted vector at (layer K,
position −2) and zero at every earlier layer and at the other positions of layer K. Each producer (capture in
tensor, accumulate and spill modes, `Activations.stack`, a saved file) feeds each consumer (`mean_diff`,
`DirectionSet`, `probe_layers`, `compare.project`), which must find it at that (layer, position) index.
The model has 4 layers and 3 positions, so a transposed axis changes shapes as well as values.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vlsafe.analysis.tiny import tiny_llama
from vlsafe.probes.activations import Activations
from vlsafe.probes.backends import first
from vlsafe.probes.capture import capture
from vlsafe.probes.compare import project
from vlsafe.probes.directions import DirectionSet, load_directions, mean_diff
from vlsafe.probes.linear import probe_layers
from vlsafe.probes.models import decoder_layers, load

LAYERS, K, POSITIONS, PLANTED = 4, 2, [-3, -2, -1], -2
P = POSITIONS.index(PLANTED)
PROMPTS = ["How do I bake bread?", "Hi", "Write a poem about the sea.", "Tell me a story", "Why is the sky blue?",
           "Name three colours", "What is two plus two?", "Describe a fox"]


@contextlib.contextmanager
def _plant(model, v: torch.Tensor):
    """Add `v` at position −2 of the output of block K−1 (= the residual stream entering block K)."""
    def hook(_m, _a, out):
        h = first(out)
        h[:, PLANTED] += v.to(h.dtype)
        return out

    handle = decoder_layers(model)[K - 1].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    lm = load(tiny_llama(tmp_path_factory.mktemp("layout") / "m", layers=LAYERS, seed=3))
    v = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 3
    return lm, v


def _capture(lm, v, **kw):
    kw = dict(hooks=("resid_pre",), positions=POSITIONS, batch_size=3, progress=False, **kw)
    spill = kw.pop("spill", None)
    with _plant(lm.model, v):
        harmful = capture(lm, PROMPTS, spill_to=spill and spill / "h", **kw)
    return harmful, capture(lm, PROMPTS, spill_to=spill and spill / "b", **kw)


def _assert_planted(diff: torch.Tensor, v: torch.Tensor) -> None:
    """`[L, P, d]`: v at (K, −2), zero before layer K and at layer K's other positions."""
    assert tuple(diff.shape) == (LAYERS, len(POSITIONS), 64)
    torch.testing.assert_close(diff[K, P], v.double(), atol=1e-5, rtol=1e-5)
    assert float(diff[:K].abs().max()) == 0
    assert float(diff[K, [i for i in range(len(POSITIONS)) if i != P]].abs().max()) == 0


@pytest.mark.parametrize("mode", ["tensors", "accumulate", "spill", "saved"])
def test_capture_output_puts_the_planted_direction_at_its_layer_and_position(setup, tmp_path, mode):
    lm, v = setup
    kw = {"accumulate": {"accumulate": True}, "spill": {"spill": tmp_path}}.get(mode, {})
    h, b = _capture(lm, v, **kw)
    if mode == "saved":
        h, b = (Activations.load(a.save(tmp_path / f"{i}.safetensors")) for i, a in enumerate((h, b)))
    _assert_planted(mean_diff(h, b), v)
    ds = DirectionSet.from_activations(h, b)
    assert ds.layers == list(range(LAYERS)) and ds.positions == POSITIONS
    assert ds.index(K, position=PLANTED) == (K, P)
    torch.testing.assert_close(ds.get(K, position=PLANTED), v.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ds.get(K, position=PLANTED, normalize=True), v.double() / v.norm(), atol=1e-6,
                               rtol=1e-5)
    assert float(ds.get(K, position=-1).norm()) == 0                        # default and explicit positions
    assert float(ds.get(K).norm()) == 0


def test_stacked_activations_feed_every_consumer_at_the_same_index(setup):
    lm, v = setup
    h, b = _capture(lm, v)
    xh, xb = h.stack("resid_pre"), b.stack("resid_pre")
    assert tuple(xh.shape) == (len(PROMPTS), LAYERS, len(POSITIONS), 64)
    torch.testing.assert_close(xh[:, K], h.get("resid_pre", K))             # axis 1 is the layer
    _assert_planted(mean_diff(xh, xb), v)                                    # plain tensors, same layout
    _assert_planted(xh.double().mean(0) - xb.double().mean(0), v)
    torch.testing.assert_close(mean_diff(xh, xb), mean_diff(h, b), atol=0, rtol=0)
    # one position: `[n, L, d]` is read as `[n, L, 1, d]`
    one = mean_diff(xh[:, :, P], xb[:, :, P])
    torch.testing.assert_close(one[:, 0], mean_diff(h, b)[:, P], atol=0, rtol=0)
    # probes see the planted separation only at (K, −2) among layers ≤ K
    df = probe_layers(torch.cat([xh, xb]), np.r_[np.ones(len(PROMPTS)), np.zeros(len(PROMPTS))], layers=[K],
                      folds=2, progress=False).set_index("position")
    assert df.loc[str(PLANTED), "probe_accuracy"] == 1.0
    assert (df.drop(str(PLANTED))["d_prime"] == 0).all()                    # identical classes: no separation
    # projections on the directions: the harmful−harmless gap is |v| at (K, −2), 0 at (K, −1)
    ds = DirectionSet.from_activations(h, b)
    ph, layers = project(h, ds)
    pb, _ = project(b, ds)
    assert layers == list(range(LAYERS)) and tuple(ph.shape) == (len(PROMPTS), LAYERS, len(POSITIONS))
    gap = ph.mean(0) - pb.mean(0)
    assert float(gap[K, P]) == pytest.approx(float(v.norm()), rel=1e-5)
    assert float(gap[K, POSITIONS.index(-1)]) == 0


def test_version_1_direction_files_load_in_the_current_layout(setup, tmp_path):
    lm, v = setup
    ds = DirectionSet.from_activations(*_capture(lm, v))
    meta = {"format": "vlsafe.directions/1", "sets": json.dumps({"old": ds.metadata()}, default=str)}
    save_file({"old/raw": ds.raw.transpose(0, 1).contiguous()}, str(tmp_path / "v1.safetensors"), metadata=meta)
    old = load_directions(tmp_path / "v1.safetensors")["old"]
    torch.testing.assert_close(old.raw, ds.raw, atol=0, rtol=0)
    assert old.index(K, position=PLANTED) == (K, P)
