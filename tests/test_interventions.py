"""Interventions: ablation hooks = orthogonalised weights (text, tied, LVLM + projector); ablation and
activation addition act where and how `docs/methods.md` ("Refusal directions") says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.tiny import tiny_llama, tiny_llava
from vlsafe.probes.capture import capture
from vlsafe.probes.interventions import ablate_direction, add_direction, orthogonalize_model, orthogonalize_weights
from vlsafe.probes.models import load
from vlsafe.probes.templates import encode

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "Hi"]


def _logits(lm, batch) -> torch.Tensor:
    with torch.no_grad():
        out = lm.model(**batch.model_inputs()).logits
    return out[batch.attention_mask.bool()]            # real tokens only


def _noise_image(seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_orthogonalised_weights_equal_ablation_hooks(tmp_path, tied):
    src = tiny_llama(tmp_path / "src", tie_word_embeddings=tied, seed=3)
    lm = load(src)
    r = torch.randn(64, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 3
    batch = encode(lm, PROMPTS)
    base = _logits(lm, batch)
    with ablate_direction(lm.model, r):
        ablated = _logits(lm, batch)
    out = orthogonalize_weights(src, r, tmp_path / "ortho")
    ortho = load(out)
    assert (ablated - base).abs().max() > 1e-3                      # the intervention does something
    torch.testing.assert_close(_logits(ortho, batch), ablated, atol=2e-5, rtol=1e-4)
    # the head became its own tensor on disk, with the ORIGINAL (un-orthogonalised) embedding values
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("tie_word_embeddings") is False
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
        head, emb = f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight")
    u = (r / r.norm()).float()
    assert (emb @ u).abs().max() < 1e-5                             # E r̂ = 0
    if tied:
        torch.testing.assert_close(head, lm.model.lm_head.weight.detach())
        assert (head @ u).abs().max() > 1e-3


def test_lvlm_orthogonalisation_includes_projector(tmp_path):
    src = tiny_llava(tmp_path / "llava", seed=5)
    lm = load(src)
    r = torch.randn(64, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    batch = encode(lm, ["What is in the image?", "Describe it"], [_noise_image(0), _noise_image(1)])
    base = _logits(lm, batch)
    with ablate_direction(lm.model, r):
        ablated = _logits(lm, batch)
    assert (ablated - base).abs().max() > 1e-3
    ortho = load(orthogonalize_weights(src, r, tmp_path / "ortho"))
    torch.testing.assert_close(_logits(ortho, batch), ablated, atol=2e-5, rtol=1e-4)
    no_proj = load(src)
    orthogonalize_model(no_proj.model, r, projector=False)
    assert (_logits(no_proj, batch) - ablated).abs().max() > 1e-4   # the projector term is needed


def test_ablation_removes_direction_everywhere(tiny_llama_dir):
    lm = load(tiny_llama_dir)
    r = torch.randn(64, generator=torch.Generator().manual_seed(1))
    u = r / r.norm()
    kw = dict(hooks=("resid_pre", "resid_post"), positions=[-3, -2, -1], progress=False)
    plain = capture(lm, PROMPTS, **kw)
    with ablate_direction(lm.model, r):
        abl = capture(lm, PROMPTS, **kw)
    for kind in ("resid_pre", "resid_post"):
        for layer in range(2):
            assert (plain.get(kind, layer) @ u).abs().max() > 1e-3
            assert (abl.get(kind, layer) @ u).abs().max() < 1e-5
    # hooks are gone after the context
    again = capture(lm, PROMPTS, **kw)
    torch.testing.assert_close(again.get("resid_post", 1), plain.get("resid_post", 1))


def test_add_direction_only_at_its_layer(tmp_path):
    lm = load(tiny_llama(tmp_path / "m", layers=3))
    r = torch.randn(64, generator=torch.Generator().manual_seed(2))
    kw = dict(hooks=("resid_pre",), positions=[-4, -1], progress=False)
    plain = capture(lm, PROMPTS, **kw)
    with add_direction(lm.model, r, layer=1, coeff=-2.5):
        added = capture(lm, PROMPTS, **kw)
    torch.testing.assert_close(added.get("resid_pre", 0), plain.get("resid_pre", 0), atol=0, rtol=0)
    delta = added.get("resid_pre", 1) - plain.get("resid_pre", 1)
    torch.testing.assert_close(delta, (-2.5 * r).expand_as(delta), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(added.get("resid_pre", 2), plain.get("resid_pre", 2), atol=1e-4)


def test_bad_intervention_inputs(tiny_llama_dir, tmp_path):
    lm = load(tiny_llama_dir)
    with pytest.raises(VlsafeError, match="layer 5 out of range"):
        with add_direction(lm.model, torch.ones(64), layer=5):
            pass
    with pytest.raises(VlsafeError, match="hidden size is 64"):
        with ablate_direction(lm.model, torch.ones(32)):
            pass
    with pytest.raises(VlsafeError, match="zero"):
        orthogonalize_weights(tiny_llama_dir, torch.zeros(64), tmp_path / "x")
    assert not (tmp_path / "x").exists()
