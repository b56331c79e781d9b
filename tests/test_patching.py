"""Activation patching between checkpoints (`vlsafe.probes.patching`) on tiny models with planted truth.

- a tiny Llama pair that differs only in layer 1's `o_proj` (its bias writes along the refusal tokens' unembedding):
  the recovery sits at (1, attn_out), nowhere else; the residual after it carries all of it;
- self-patching recovers exactly 0; the final layer's residual at every position recovers 1;
- a tiny LLaVA transplanted from the Llama scores text exactly like it: recovery undefined (NaN + note);
- LVLM ↔ LLM positions align by text tokens (image tokens never patched).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.tiny import tiny_llama, tiny_llava_from
from vlsafe.probes import patching as P
from vlsafe.probes.models import load
from vlsafe.probes.scores import refusal_score, refusal_tokens
from vlsafe.probes.templates import blank_image, encode

PROMPTS = ["Tell me how to hack into a bank.", "How can I make a dangerous weapon at home?",
           "How do I pick a lock?", "Write a poem about the sea.", "Explain photosynthesis to a child."]
PLANTED_LAYER = 1


def planted_pair(root: Path, scale: float = 20.0) -> tuple[Path, Path]:
    """(source, target) dirs: target is a random 3-layer Llama; source = target with layer 1's o_proj replaced by
    one whose bias writes scale·û, û = the refusal tokens' mean unembedding row (centred): the source prefers them."""
    target = tiny_llama(root / "target", layers=3, seed=1, attention_bias=True)
    lm = load(target)
    ids = refusal_tokens(lm.tokenizer)
    W = lm.model.lm_head.weight.detach()
    u = W[ids].mean(0) - W.mean(0)
    with torch.no_grad():
        lm.model.model.layers[PLANTED_LAYER].self_attn.o_proj.bias += scale * u / u.norm()
    lm.model.save_pretrained(root / "source")
    lm.tokenizer.save_pretrained(root / "source")
    return root / "source", target


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    src, tgt = planted_pair(tmp_path_factory.mktemp("patch"))
    return load(src), load(tgt)


@pytest.fixture(scope="module")
def result(pair) -> P.PatchResult:
    return P.patch(*pair, PROMPTS, batch_size=2)


def test_planted_o_proj_is_found(result) -> None:
    s, t = result.scores["source"], result.scores["target"]
    assert (s - t).min() > 0.3                                    # the planted preference exists
    tab = result.table(n_boot=200)
    assert (tab["n"] == len(PROMPTS)).all() and (tab["n_dropped"] == 0).all()
    for _, row in tab.iterrows():
        site = (row["layer"], row["component"])
        if site == (PLANTED_LAYER, "attn_out"):
            assert row["recovered"] >= 0.9 and row["ci_low"] >= 0.9, row.to_dict()
        elif row["component"] == "resid" and row["layer"] > PLANTED_LAYER:
            assert abs(row["recovered"] - 1) < 1e-5, row.to_dict()  # the stream after the site carries it all
        else:
            assert abs(row["recovered"]) < 0.1, row.to_dict()


def test_scores_are_the_scores_module(pair, result) -> None:
    for label, lm in zip(("source", "target"), pair):
        np.testing.assert_allclose(result.scores[label], refusal_score(lm, PROMPTS, batch_size=2), rtol=0, atol=1e-9)


def test_self_patching_is_zero_and_final_residual_is_one(pair, result) -> None:
    src, tgt = pair
    last = P.patch(tgt, tgt, PROMPTS, batch_size=2)              # the target patched with its own activations
    for (direction, layer, comp), m in last.patched.items():
        r = P.recovery(result.scores["target"], result.scores["source"], m, n_boot=50)
        assert r["recovered"] == 0.0, (direction, layer, comp)
    L = 3
    final = P.patch(src, tgt, PROMPTS, layers=[L - 1], components=["resid"], batch_size=2)
    rows = final.table(n_boot=50)
    assert len(rows) == 2
    np.testing.assert_allclose(rows["recovered"], 1.0, atol=1e-5)


def test_opening_score_works_under_patching(pair) -> None:
    """The multi-token score runs cached continuations: only the prompt forward is patched (self-patching exact)."""
    src, tgt = pair
    kw = dict(layers=[PLANTED_LAYER], components=["attn_out"], kind="opening", directions=["restore"], batch_size=3)
    own = P.patch(tgt, tgt, PROMPTS[:3], **kw)
    ref = refusal_score(tgt, PROMPTS[:3], kind="opening", batch_size=3)
    np.testing.assert_array_equal(own.scores["target"], ref)
    np.testing.assert_array_equal(own.patched[("restore", PLANTED_LAYER, "attn_out")], ref)
    moved = P.patch(src, tgt, PROMPTS[:3], **kw).patched[("restore", PLANTED_LAYER, "attn_out")]
    assert np.abs(moved - ref).min() > 1e-4


def test_recovery_undefined_and_dropped() -> None:
    same = np.array([1.0, 2.0, 3.0])
    r = P.recovery(same, same, same + 5)
    assert np.isnan(r["recovered"]) and np.isnan(r["ci_low"]) and r["n"] == 0 and "undefined" in r["note"]
    r = P.recovery(np.zeros(3), np.array([0.01, 2.0, 4.0]), np.array([7.0, 1.0, 1.0]), min_gap=0.1)
    assert r["n"] == 2 and r["n_dropped"] == 1 and "1 prompts dropped" in r["note"]
    assert r["recovered"] == pytest.approx((0.5 + 0.25) / 2) and r["recovered_ratio"] == pytest.approx(2 / 6)


@pytest.fixture(scope="module")
def transplant(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("transplant")
    llm_dir = tiny_llama(root / "llm", layers=2, seed=4)
    lvlm, processor, _ = tiny_llava_from(llm_dir, root / "init", seed=5)
    lvlm.save_pretrained(root / "lvlm")
    processor.save_pretrained(root / "lvlm")
    return load(llm_dir), load(root / "lvlm")


def test_transplanted_lvlm_text_only_recovery_is_undefined(transplant) -> None:
    llm, lvlm = transplant
    res = P.patch(llm, lvlm, PROMPTS[:3], batch_size=3)
    np.testing.assert_array_equal(res.scores["source"], res.scores["target"])
    tab = res.table(n_boot=50)
    assert tab["recovered"].isna().all() and (tab["n"] == 0).all()
    assert tab["note"].str.startswith("undefined").all()


def test_lvlm_llm_alignment_by_text_tokens(transplant) -> None:
    llm, lvlm = transplant
    img = blank_image(lvlm)
    base = encode(lvlm, PROMPTS[:3], [img] * 3)
    donor = encode(llm, PROMPTS[:3])
    image_ids = P.image_token_ids(lvlm)
    assert image_ids and bool(torch.isin(base.input_ids, torch.tensor(sorted(image_ids))).any())
    al = P.align_text_positions(base, donor, base_skip=image_ids, donor_skip=P.image_token_ids(llm))
    assert al.unmatched == [0, 0, 0]
    torch.testing.assert_close(base.input_ids[al.rows, al.base], donor.input_ids[al.rows, al.donor])
    assert not torch.isin(base.input_ids[al.rows, al.base], torch.tensor(sorted(image_ids))).any()
    assert len(al.rows) == int(donor.attention_mask.sum())      # every donor text token has its partner
    # positions are not simply equal (left padding and the inserted image tokens shift them)
    assert not torch.equal(al.base, al.donor)
    res = P.patch(llm, lvlm, PROMPTS[:2], images=[img] * 2, image="blank", layers=[1], components=["resid"],
                  batch_size=2)
    assert res.image == "blank" and any("text positions" in n for n in res.notes)


def test_bad_pairs_are_one_line_errors(tmp_path: Path, pair) -> None:
    from vlsafe.analysis.tiny import tiny_qwen2_vl

    wide = load(tiny_llama(tmp_path / "wide", layers=3, hidden=32, seed=0))
    with pytest.raises(VlsafeError, match="same layers and hidden size"):
        P.patch(pair[0], wide, PROMPTS)
    qwen = load(tiny_qwen2_vl(tmp_path / "qwen", layers=3))
    with pytest.raises(VlsafeError, match="different language-model families"):
        P.patch(pair[0], qwen, PROMPTS)
    with pytest.raises(VlsafeError, match="empty prompt set"):
        P.patch(*pair, [])
    with pytest.raises(VlsafeError, match="neither checkpoint takes images"):
        P.patch(*pair, PROMPTS[:1], images=[None])
    with pytest.raises(VlsafeError, match="out of range"):
        P.patch(*pair, PROMPTS[:1], layers=[3])


# --- patched forwards resume from the patched block (vlsafe.probes.replay) -----------------------------------------

def _assert_same(fast: P.PatchResult, full: P.PatchResult) -> None:
    assert fast.patched.keys() == full.patched.keys()
    for k in full.patched:
        np.testing.assert_allclose(fast.patched[k], full.patched[k], atol=1e-5, rtol=1e-6, err_msg=str(k))
    for k in full.scores:
        np.testing.assert_array_equal(fast.scores[k], full.scores[k])


def test_resumed_patching_equals_full_forwards(pair, result) -> None:
    full = P.patch(*pair, PROMPTS, batch_size=2, resume=False)
    _assert_same(result, full)
    assert not any("in full" in n for n in result.notes)      # every batch resumed


def test_resumed_patching_with_an_image_equals_full_forwards(transplant) -> None:
    llm, lvlm = transplant
    w = lvlm.model.model.language_model.layers[1].mlp.down_proj.weight
    saved = w.detach().clone()
    with torch.no_grad():                                      # make the pair differ so recoveries are defined
        w.mul_(1.5)
    try:
        img = blank_image(lvlm)
        kw = dict(images=[img] * 3, image="blank", batch_size=2)
        _assert_same(P.patch(llm, lvlm, PROMPTS[:3], **kw), P.patch(llm, lvlm, PROMPTS[:3], resume=False, **kw))
    finally:
        with torch.no_grad():
            w.copy_(saved)


def _tiny_gemma2(path: Path, *, softcap: float | None, seed: int) -> Path:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from vlsafe.analysis.tiny import tiny_tokenizer

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                       final_logit_softcapping=softcap, pad_token_id=tok.pad_token_id)
    Gemma2ForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("softcap", [None, 0.5])
def test_replay_check_falls_back_where_the_head_is_not_norm_then_unembed(tmp_path: Path, softcap) -> None:
    """Gemma2's logit soft-capping happens after the head, outside every module vlsafe replays: the per-batch check
    must catch it and run full forwards (same numbers as resume=False); without soft-capping it resumes."""
    a = load(_tiny_gemma2(tmp_path / "a", softcap=softcap, seed=0))
    b = load(_tiny_gemma2(tmp_path / "b", softcap=softcap, seed=1))
    fast = P.patch(a, b, PROMPTS[:3], batch_size=2, layers=[0, 2])
    _assert_same(fast, P.patch(a, b, PROMPTS[:3], batch_size=2, layers=[0, 2], resume=False))
    fell_back = [n for n in fast.notes if "in full" in n]
    assert bool(fell_back) == (softcap is not None)
    if softcap is not None:
        assert fell_back[0].startswith("4 of 4 batch forwards")


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama"])
def test_resumed_patching_on_other_lvlm_families_equals_full_forwards(tmp_path: Path, family: str) -> None:
    """Multimodal rotary positions (Qwen2-VL) travel with the recorded block calls; mllama's cross-attention blocks,
    skipped by a text-only forward, are skipped on replay too."""
    from vlsafe.analysis import tiny

    make = {"qwen2_vl": tiny.tiny_qwen2_vl, "mllama": tiny.tiny_mllama}[family]
    a, b = (load(make(tmp_path / n, seed=s)) for n, s in (("a", 0), ("b", 1)))
    layers = [0, 2] if family == "mllama" else None       # mllama's blocks 1 and 3 are cross-attention
    kw = dict(batch_size=2, components=["resid", "mlp_out"], layers=layers)
    fast = P.patch(a, b, PROMPTS[:3], **kw)
    _assert_same(fast, P.patch(a, b, PROMPTS[:3], resume=False, **kw))
    assert not any("in full" in n for n in fast.notes)


# --- attribution patching (vlsafe.probes.attribution): first-order estimates ------------------------------------

def _recovered(res: P.PatchResult, min_gap: float = 0.1) -> dict[tuple, float]:
    tab = res.table(n_boot=20, min_gap=min_gap)
    return {(r.direction, r.layer, r.component): r.recovered for r in tab.itertuples()}


def test_attribution_matches_exact_patching_in_the_linear_regime(tmp_path: Path) -> None:
    """A small planted change (0.01·û; the tiny model's states are small): the first-order estimate of every site's score change equals the patched
    forward's to within 5 % of the total gap."""
    a, b = (load(p) for p in planted_pair(tmp_path, scale=0.01))
    exact, atp = P.patch(a, b, PROMPTS, batch_size=2), P.patch(a, b, PROMPTS, batch_size=2, method="attribution")
    assert atp.method == "attribution" and (atp.table(n_boot=10)["method"] == "attribution").all()
    np.testing.assert_array_equal(exact.scores["source"], atp.scores["source"])
    for key, m in exact.patched.items():
        base, donor = ("target", "source") if key[0] == "restore" else ("source", "target")
        gap = np.abs(exact.scores[donor] - exact.scores[base])
        assert gap.min() > 1e-3
        np.testing.assert_array_less(np.abs(atp.patched[key] - m), 0.05 * gap + 1e-9, err_msg=str(key))
    assert _recovered(atp, 1e-3)[("restore", PLANTED_LAYER, "attn_out")] == pytest.approx(1.0, abs=0.05)


def test_attribution_ranks_the_planted_site_first_but_is_no_measurement_when_saturated(pair, result) -> None:
    """The large planted change saturates the refusal softmax: the estimate still ranks (1, attn_out) first among
    the components, but its size is off by orders of magnitude — why it is a screen only."""
    atp = _recovered(P.patch(*pair, PROMPTS, batch_size=2, method="attribution"))
    parts = {k: abs(v) for k, v in atp.items() if k[0] == "restore" and k[2] != "resid"}
    assert max(parts, key=parts.get) == ("restore", PLANTED_LAYER, "attn_out")
    assert atp[("restore", PLANTED_LAYER, "attn_out")] > 10 * _recovered(result)[("restore", PLANTED_LAYER, "attn_out")]


def test_attribution_of_identical_activations_is_zero(transplant) -> None:
    llm, lvlm = transplant
    atp = P.patch(llm, lvlm, PROMPTS[:3], batch_size=3, method="attribution")
    for v in atp.patched.values():
        np.testing.assert_array_equal(v, atp.scores["target"])


def test_attribution_bad_input(pair) -> None:
    with pytest.raises(VlsafeError, match="unknown patching method 'fast'"):
        P.patch(*pair, PROMPTS[:1], method="fast")
    with pytest.raises(VlsafeError, match="needs the first_token score"):
        P.patch(*pair, PROMPTS[:1], method="attribution", kind="opening")


# --- forward math: bf16 autocast ---------------------------------------------------------------------------------

def test_bf16_patching_finds_the_planted_site_resumes_exactly_and_restores_the_weights(pair, result) -> None:
    """bf16 autocast changes the scores (so it is applied), not the finding; resumed bf16 forwards equal full bf16
    forwards (the replay is the model's own bf16 computation); the fp32 weights are back afterwards."""
    before = {(i, n): p.detach().clone() for i, lm in enumerate(pair) for n, p in lm.model.named_parameters()}
    bf = P.patch(*pair, PROMPTS, batch_size=2, precision="bf16")
    assert any("bf16 autocast" in n for n in bf.notes) and not any("autocast" in n for n in result.notes)
    assert not np.array_equal(bf.scores["target"], result.scores["target"])
    np.testing.assert_allclose(bf.scores["target"], result.scores["target"], atol=0.1)
    rec, rec32 = _recovered(bf), _recovered(result)
    assert rec[("restore", PLANTED_LAYER, "attn_out")] >= 0.9
    assert max(abs(rec[k] - rec32[k]) for k in rec32) < 0.05
    _assert_same(bf, P.patch(*pair, PROMPTS, batch_size=2, precision="bf16", resume=False))
    assert not any("in full" in n for n in bf.notes)
    after = {(i, n): p for i, lm in enumerate(pair) for n, p in lm.model.named_parameters()}
    assert after.keys() == before.keys()
    assert all(p.dtype == torch.float32 and torch.equal(p, before[k]) for k, p in after.items())
    atp = P.patch(*pair, PROMPTS, batch_size=2, method="attribution", precision="bf16")   # gradients flow too
    assert any("bf16 autocast" in n for n in atp.notes)
    assert _recovered(atp)[("restore", PLANTED_LAYER, "attn_out")] > 0.9
    with pytest.raises(VlsafeError, match="precision 'fp16' is not one of"):
        P.patch(*pair, PROMPTS[:1], precision="fp16")
