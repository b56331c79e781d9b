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


def planted_pair(root: Path) -> tuple[Path, Path]:
    """(source, target) dirs: target is a random 3-layer Llama; source = target with layer 1's o_proj replaced by
    one whose bias writes 20·û, û = the refusal tokens' mean unembedding row (centred): the source prefers them."""
    target = tiny_llama(root / "target", layers=3, seed=1, attention_bias=True)
    lm = load(target)
    ids = refusal_tokens(lm.tokenizer)
    W = lm.model.lm_head.weight.detach()
    u = W[ids].mean(0) - W.mean(0)
    with torch.no_grad():
        lm.model.model.layers[PLANTED_LAYER].self_attn.o_proj.bias += 20 * u / u.norm()
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
    image_ids = P._image_ids(lvlm)
    assert image_ids and bool(torch.isin(base.input_ids, torch.tensor(sorted(image_ids))).any())
    al = P.align_text_positions(base, donor, base_skip=image_ids, donor_skip=P._image_ids(llm))
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
