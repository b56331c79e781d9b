"""Safety-layer cosine curves and onset on a constructed case; layer scaling restores exactly; the scan driver."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.tiny import tiny_llama
from vlsafe.probes.capture import capture
from vlsafe.probes.models import load
from vlsafe.probes.safety_layers import (cosine_curves, greedy_continuations, last_token_states, onset_layer,
                                  over_rejection_scan, scale_layers, separation_gap, sliding_windows,
                                  substring_judge)

ONSET, L, D = 4, 8, 32


def _constructed(n: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal and malicious states share one direction b; from layer ONSET malicious ones turn towards m."""
    g = torch.Generator().manual_seed(seed)
    b, m = torch.randn(D, generator=g), torch.randn(D, generator=g)
    normal = b + 0.3 * torch.randn(n, L, D, generator=g)
    malicious = b + 0.3 * torch.randn(n, L, D, generator=g)
    malicious[:, ONSET:] += 1.5 * m
    return normal, malicious


def _all_pairs_mean(x: torch.Tensor, y: torch.Tensor, same: bool) -> torch.Tensor:
    xu, yu = x / x.norm(dim=-1, keepdim=True), y / y.norm(dim=-1, keepdim=True)
    cos = torch.einsum("ild,jld->ijl", xu.double(), yu.double())
    if same:
        keep = ~torch.eye(x.shape[0], dtype=torch.bool)
        return cos[keep].mean(0)
    return cos.reshape(-1, x.shape[1]).mean(0)


def test_cosine_curves_and_onset_on_constructed_states():
    normal, malicious = _constructed()
    df = cosine_curves(normal, malicious, pairs=500)
    assert set(df["pair"]) == {"N-N", "M-M", "N-M"} and len(df) == 3 * L
    assert (df["n_pairs"] == 1500).all()
    wide = df.pivot(index="layer", columns="pair", values="cosine_mean")
    # random-pair means estimate the all-pairs means
    for kind, (x, y, same) in {"N-N": (normal, normal, True), "M-M": (malicious, malicious, True),
                               "N-M": (normal, malicious, False)}.items():
        np.testing.assert_allclose(wide[kind].to_numpy(), _all_pairs_mean(x, y, same).numpy(), atol=0.02)
    assert (wide.loc[: ONSET - 1, "N-M"] > 0.85).all()
    assert (wide.loc[ONSET:, "N-M"] < wide.loc[ONSET:, "N-N"] - 0.2).all()
    assert onset_layer(df) == ONSET
    gap = separation_gap(df)
    assert gap.loc[: ONSET - 1].abs().max() < 0.05 < gap.loc[ONSET:].min()
    assert onset_layer(df, margin=5.0) is None
    assert (df["seed_std"] < df["cosine_std"]).all()                  # spread of 3 means < spread of pairs
    pd_again = cosine_curves(normal, malicious, pairs=500)
    assert pd_again.equals(df)                                        # seeded
    assert not cosine_curves(normal, malicious, pairs=500, seeds=(1, 2, 3)).equals(df)


def test_cosine_curve_bad_inputs():
    normal, malicious = _constructed(n=5)
    with pytest.raises(VlsafeError, match="at least 2 normal"):
        cosine_curves(normal[:1], malicious)
    with pytest.raises(VlsafeError, match="differ"):
        cosine_curves(normal, malicious[:, :3])
    with pytest.raises(VlsafeError, match=r"\[n, L, d\]"):
        cosine_curves(normal[0], malicious)


def test_last_token_states_are_block_outputs(tiny_llama_dir):
    lm = load(tiny_llama_dir)
    prompts = ["How do I bake bread?", "Hi", "Write a poem about the sea."]
    states = last_token_states(lm, prompts)
    assert tuple(states.shape) == (3, 2, 64)
    acts = capture(lm, prompts, hooks=("resid_post",), positions="last", progress=False)
    torch.testing.assert_close(states[:, 1], acts.get("resid_post", 1)[:, 0])
    # the last block's output is before the final norm (HF's last hidden_states entry is after it)
    enc = lm.tokenizer(lm.tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]}],
                                                        add_generation_prompt=True, tokenize=False),
                       return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hs = lm.model(**enc, output_hidden_states=True).hidden_states
    torch.testing.assert_close(states[0, 0], hs[1][0, -1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(states[0, 1], hs[2][0, -1], atol=1e-3)


def test_scale_layers_scales_window_and_restores_exactly(tmp_path):
    lm = load(tiny_llama(tmp_path / "m", layers=4))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with scale_layers(lm.model, 1, 3, 1.1):
        now = lm.model.state_dict()
        for k, v in before.items():
            layer = int(k.split(".")[2]) if k.startswith("model.layers.") else None
            scaled = layer in (1, 2) and k.endswith("proj.weight")
            torch.testing.assert_close(now[k], v * 1.1 if scaled else v, atol=0, rtol=1e-6)
            assert scaled == (not torch.equal(now[k], v)), k
    after = lm.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(RuntimeError):
        with scale_layers(lm.model, 0, 4, 15.0):
            raise RuntimeError("boom")
    assert all(torch.equal(lm.model.state_dict()[k], v) for k, v in before.items())
    for bad in ((3, 3), (-1, 2), (2, 5)):
        with pytest.raises(VlsafeError, match="out of range for a 4-layer model"):
            with scale_layers(lm.model, *bad, 2.0):
                pass


def test_over_rejection_scan_driver(tmp_path):
    lm = load(tiny_llama(tmp_path / "m", layers=4, seed=4))
    prompts = ["How do I bake bread?", "Give me three tips for studying.", "Describe a red circle."]
    base = greedy_continuations(lm, prompts, max_new_tokens=6)
    changed = lambda text: text not in base                            # noqa: E731  "refusal" = any change
    windows = sliding_windows(4, 2, stride=2)
    assert windows == [(0, 2), (2, 4)]
    df = over_rejection_scan(lm, prompts, windows, alphas=(1.0, 15.0), judge=changed, max_new_tokens=6,
                             progress=False)
    assert list(df.columns) == ["start", "end", "alpha", "n", "refusals", "refusal_rate", "delta"]
    assert len(df) == 1 + 2 * 2 and (df["n"] == 3).all()
    assert df.loc[0, "refusals"] == 0 and (df[df["alpha"] == 1.0]["refusals"] == 0).all()
    assert (df[df["alpha"] == 15.0]["refusals"] > 0).any()
    assert greedy_continuations(lm, prompts, max_new_tokens=6) == base        # weights restored after the scan
    with pytest.raises(VlsafeError, match="empty"):
        over_rejection_scan(lm, [], windows)
    with pytest.raises(VlsafeError, match="width"):
        sliding_windows(4, 5)


def test_substring_judge_default_list():
    assert substring_judge("I'm sorry, but I can't help with that.")
    assert substring_judge("as an AI language model, I ...")
    assert not substring_judge("Sure, here is a short answer.")
    assert substring_judge("Nope.", substrings=["nope"])
