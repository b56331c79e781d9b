"""Difference-in-means directions (planted ground truth), the direction file, refusal scores and selection."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from vlsafe.analysis.checkpoints import open_checkpoint
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.tiny import tiny_llama
from vlsafe.probes.capture import capture
from vlsafe.probes.directions import DirectionSet, load_directions, mean_diff, save_directions, select_direction
from vlsafe.probes.linear import probe_sets
from vlsafe.probes.models import decoder_layers, load, lm_head
from vlsafe.probes.scores import EPS, opening_logprobs, refusal_score, refusal_tokens
from vlsafe.probes.templates import format_chat

K, LAYERS = 3, 6          # planted layer and depth of the planted model
WORDS = ("bread sea poem child photosynthesis square circle star triangle fox dog colour image tips studying "
         "left right top bottom one two three four quick brown lazy answer request short blue red").split()


def _prompts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(4, 9)))).capitalize() + "?" for _ in range(n)]


def _direction(seed: int, norm: float = 1.0) -> torch.Tensor:
    v = torch.randn(64, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


@contextlib.contextmanager
def _plant(model, v: torch.Tensor, k: int, rows=None):
    """Add `v` to the residual stream entering block `k` (output of block k-1); `rows(input)` picks rows."""
    state = {}

    def top(_m, _a, kwargs):
        ids = kwargs.get("input_ids")
        state["rows"] = rows(ids) if rows is not None else None

    def out(_m, _a, h):
        m = state.get("rows")
        add = v.to(h.dtype) if m is None else v.to(h.dtype) * m.to(h.dtype)[:, None, None]
        return h + add

    handles = [model.register_forward_pre_hook(top, with_kwargs=True),
               decoder_layers(model)[k - 1].register_forward_hook(out)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path = tiny_llama(tmp_path_factory.mktemp("planted") / "m", layers=LAYERS, seed=1)
    lm = load(path)
    v = _direction(0, 4.0)
    harmful, harmless = _prompts(60, 1), _prompts(60, 2)
    kw = dict(hooks=("resid_pre",), positions="last", progress=False)
    with _plant(lm.model, v, K):
        acts_h = capture(lm, harmful, **kw)
    acts_b = capture(lm, harmless, **kw)
    return lm, v, acts_h, acts_b


def test_planted_direction_recovered(planted):
    lm, v, acts_h, acts_b = planted
    ds = DirectionSet.from_activations(acts_h, acts_b, checkpoint=lm.checkpoint)
    assert ds.raw.dtype == torch.float64 and tuple(ds.raw.shape) == (LAYERS, 1, 64)
    assert ds.layers == list(range(LAYERS)) and ds.positions == [-1] and ds.n_harmful == 60
    cos = torch.nn.functional.cosine_similarity(ds.raw[:, 0], v.double()[None], dim=-1)
    assert (cos[K:] > 0.99).all(), cos
    assert (cos[:K].abs() < 0.9).all(), cos
    assert ds.norms[K:, 0].min() > 5 * ds.norms[:K, 0].max()
    torch.testing.assert_close(mean_diff(acts_h, acts_b, normalize=True), ds.unit)
    # layer 0 at the last position is the same template token for every prompt: a zero direction stays zero
    assert float(ds.norms[0, 0]) == 0 and float(ds.unit[0, 0].norm()) == 0
    torch.testing.assert_close(ds.unit[1:, 0].norm(dim=-1), torch.ones(LAYERS - 1, dtype=torch.float64))


def test_probe_accuracy_jumps_at_planted_layer(planted):
    _, _, acts_h, acts_b = planted
    df = probe_sets(acts_h, acts_b, progress=False).set_index("layer")
    before, after = df.loc[: K - 1, "probe_accuracy"], df.loc[K:, "probe_accuracy"]
    assert (after >= 0.95).all(), df
    assert before.mean() < 0.7 and before.max() < 0.8, df
    assert (df["control_accuracy"] < 0.8).all()
    assert df.loc[K:, "d_prime"].min() > 3 * df.loc[: K - 1, "d_prime"].abs().max()


def test_streaming_means_match_tensor_means(planted):
    lm, v, _, _ = planted
    harmful, harmless = _prompts(20, 3), _prompts(20, 4)
    with _plant(lm.model, v, K):
        full_h = capture(lm, harmful, positions=[-2, -1], progress=False, batch_size=4)
        acc_h = capture(lm, harmful, positions=[-2, -1], progress=False, batch_size=4, accumulate=True)
    full_b = capture(lm, harmless, positions=[-2, -1], progress=False, batch_size=4)
    acc_b = capture(lm, harmless, positions=[-2, -1], progress=False, batch_size=4, accumulate=True)
    a, b = mean_diff(full_h, full_b), mean_diff(acc_h, acc_b)
    assert tuple(a.shape) == (LAYERS, 2, 64)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    manual = full_h.stack("resid_pre").double().mean(0) - full_b.stack("resid_pre").double().mean(0)   # [L, P, d]
    torch.testing.assert_close(a, manual)


def test_direction_file_round_trip_and_model_checks(planted, tmp_path, tiny_llama_dir):
    lm, _, acts_h, acts_b = planted
    ds = DirectionSet.from_activations(acts_h, acts_b, checkpoint=lm.checkpoint)
    path = save_directions(tmp_path / "directions.safetensors", {"base": ds, "copy": ds})
    sets = load_directions(path, checkpoint=lm.checkpoint)
    assert list(sets) == ["base", "copy"]
    torch.testing.assert_close(sets["base"].raw, ds.raw, atol=0, rtol=0)
    assert sets["base"].metadata() == ds.metadata()
    assert DirectionSet.load(path, checkpoint=lm.checkpoint, label="copy").layers == ds.layers
    other = open_checkpoint(tiny_llama_dir)                    # same hidden size, different weights
    with pytest.raises(VlsafeError, match="hash"):
        load_directions(path, checkpoint=other)
    assert load_directions(path, checkpoint=other, allow_other_model=True)["base"].hidden_size == 64
    wide = open_checkpoint(tiny_llama(tmp_path / "wide", hidden=32, layers=1))
    with pytest.raises(VlsafeError, match="hidden size 64 but .* has 32"):
        load_directions(path, checkpoint=wide, allow_other_model=True)
    with pytest.raises(VlsafeError, match="holds 2 direction sets"):
        DirectionSet.load(path)
    with pytest.raises(VlsafeError, match="not a vlsafe direction file"):
        load_directions(tiny_llama_dir / "model.safetensors")
    with pytest.raises(VlsafeError, match="no layer 9"):
        ds.get(9)


def test_bad_direction_inputs(planted):
    lm, _, acts_h, acts_b = planted
    with pytest.raises(VlsafeError, match="empty"):
        mean_diff(torch.zeros(0, LAYERS, 1, 64), torch.zeros(3, LAYERS, 1, 64))
    with pytest.raises(VlsafeError, match="layer"):
        mean_diff(acts_h, acts_b, layers=[LAYERS + 2])
    with pytest.raises(VlsafeError, match="do not match"):
        DirectionSet.from_activations(torch.zeros(3, LAYERS, 1, 64), torch.zeros(3, LAYERS, 1, 32))


# ---- refusal scores ---------------------------------------------------------------------------------------

def test_refusal_tokens_come_from_the_tokenizer(tiny_llama_dir):
    tok = load(tiny_llama_dir).tokenizer
    ids = refusal_tokens(tok)
    assert len(ids) == len(set(ids))
    words = [tok.decode([i]) for i in ids]
    openings = ("I'm sorry", "I cannot", "I can't", "I am sorry", "As an AI", "I apologize", "Sorry")
    assert all(any(o.startswith(w) for o in openings) for w in words), words
    assert refusal_tokens(tok, ["I'm sorry"]) == refusal_tokens(tok, ["I cannot"])   # both start with "I"
    assert len(ids) < len(openings)
    assert refusal_tokens(tok, ["Sorry"])[0] == tok("Sorry", add_special_tokens=False)["input_ids"][0]


@pytest.mark.smollm2
def test_refusal_tokens_differ_across_tokenizers(tiny_llama_dir, smollm2_dir):
    from transformers import AutoTokenizer

    tiny, smol = load(tiny_llama_dir).tokenizer, AutoTokenizer.from_pretrained(str(smollm2_dir))
    a, b = refusal_tokens(tiny), refusal_tokens(smol)
    assert a != b
    assert [tiny.decode([i]) for i in a][:1] == [smol.decode([i]) for i in b][:1] == ["I"]


def test_first_token_score_matches_reference_formula(planted):
    lm, _, _, _ = planted
    prompts = _prompts(5, 9)
    ids = refusal_tokens(lm.tokenizer)
    batched = refusal_score(lm, prompts, kind="first_token", batch_size=5)
    for p, got in zip(prompts, batched):
        enc = lm.tokenizer(format_chat(lm.tokenizer, p), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            z = lm.model(**enc).logits[0, -1].double()
        prob = torch.softmax(z, -1)[ids].sum().item()
        assert got == pytest.approx(math.log(prob + EPS) - math.log(1 - prob + EPS), abs=1e-5)


def test_opening_logprob_matches_teacher_forcing(planted):
    lm, _, _, _ = planted
    prompts, openings = _prompts(4, 10), ["I'm sorry, but I can", "Sure, here is"]
    got, kept = opening_logprobs(lm, prompts, openings, batch_size=3)
    assert kept == openings and got.shape == (4, 2)
    tok = lm.tokenizer
    for i, p in enumerate(prompts):
        head = tok(format_chat(tok, p), add_special_tokens=False)["input_ids"]
        for j, o in enumerate(openings):
            full = tok(format_chat(tok, p) + o, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(lm.model(torch.tensor([full])).logits[0].double(), -1)
            want = sum(lp[t - 1, full[t]].item() for t in range(len(head), len(full)))
            assert got[i, j] == pytest.approx(want, abs=1e-5)
    # an opening that extends another is dropped (its probability is inside the shorter one's)
    _, kept = opening_logprobs(lm, prompts[:1], ["I'm sorry", "I'm sorry, but I can"])
    assert kept == ["I'm sorry"]
    with pytest.raises(VlsafeError, match="kind"):
        refusal_score(lm, prompts, kind="logit")
    with pytest.raises(VlsafeError, match="empty"):
        refusal_score(lm, [])


# ---- selection --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def refusing(tmp_path_factory):
    """A tiny model that 'refuses' (puts its mass on refusal first tokens) exactly when a marker token is in the
    prompt: the marker plants v at block K's input, and the head reads v into the refusal tokens."""
    path = tiny_llama(tmp_path_factory.mktemp("refusing") / "m", layers=LAYERS, seed=2)
    lm = load(path)
    marker = lm.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    v = _direction(5, 2.0)
    with _plant(lm.model, v, K, rows=lambda ids: (ids == marker).any(1)):
        yield lm, v, lm_head(lm.model).weight.detach().clone()


def _set_refusal_head(lm, v, on: bool, original):
    w = lm_head(lm.model).weight
    with torch.no_grad():
        w.copy_(original)
        if on:
            for t in refusal_tokens(lm.tokenizer):
                w[t] += 1.0 * v / v.norm()


def test_select_direction_finds_planted_refusal_direction(refusing):
    lm, v, original = refusing
    _set_refusal_head(lm, v, True, original)
    harm = [p + " <|endoftext|>" for p in _prompts(40, 20)]
    safe = _prompts(40, 21)
    kw = dict(positions="last", progress=False)
    ds = DirectionSet.from_activations(capture(lm, harm[:30], **kw), capture(lm, safe[:30], **kw),
                                       checkpoint=lm.checkpoint)
    base_h, base_b = refusal_score(lm, harm[30:]).mean(), refusal_score(lm, safe[30:]).mean()
    assert base_h > 0 > base_b
    sel = select_direction(lm, ds, harm[30:], safe[30:], progress=False)
    t = sel.table.set_index("layer")
    assert len(t) == LAYERS and t["chosen"].sum() == 1
    assert set(t.index[t["reason"].str.startswith("layer")]) == {4, 5}         # ℓ ≥ int(0.8 · 6)
    assert K <= sel.layer < int(0.8 * LAYERS)
    assert float(torch.nn.functional.cosine_similarity(sel.direction, v.double(), dim=0)) > 0.99
    assert t.loc[sel.layer, "bypass_score"] < 0 < t.loc[sel.layer, "induce_score"]
    assert t.loc[sel.layer, "kl"] <= 0.1
    assert t.loc[0, "reason"] == "nan"                                        # zero direction (same last token)
    assert (t.loc[1: K - 1, "induce_score"] < 0).all()                        # early candidates do not induce
    assert sel.baseline_harmful == pytest.approx(base_h)


def test_select_direction_on_a_model_that_never_refuses(refusing):
    lm, v, original = refusing
    _set_refusal_head(lm, v, False, original)
    harm = [p + " <|endoftext|>" for p in _prompts(16, 30)]
    safe = _prompts(16, 31)
    ds = DirectionSet.from_activations(capture(lm, harm, progress=False), capture(lm, safe, progress=False))
    with pytest.raises(VlsafeError, match=r"all 6 candidate directions were filtered out"):
        select_direction(lm, ds, harm[:6], safe[:6], progress=False)
    sel = select_direction(lm, ds, harm[:6], safe[:6], progress=False, on_empty="flag")
    assert sel.filtered_all and sel.direction is None and not sel.table["chosen"].any()
    with pytest.raises(VlsafeError, match="empty"):
        select_direction(lm, ds, [], safe, progress=False)


# ---- across checkpoints -----------------------------------------------------------------------------------

def test_compare_directions_and_drift(planted):
    from vlsafe.probes.compare import direction_cosines, direction_similarity, projection_drift, transfer

    lm, v, acts_h, acts_b = planted
    ds = DirectionSet.from_activations(acts_h, acts_b)
    rotated = DirectionSet(ds.raw.flip(-1), ds.layers, ds.positions, 64, LAYERS)
    sim = direction_similarity({"a": ds, "b": ds, "c": rotated})
    assert list(sim.columns) == ["layer", "position", "checkpoint_a", "checkpoint_b", "direction_cosine"]
    assert len(sim) == 3 * LAYERS
    ab = sim[(sim.checkpoint_a == "a") & (sim.checkpoint_b == "b") & (sim.layer > 0)]
    np.testing.assert_allclose(ab["direction_cosine"], 1.0, atol=1e-12)
    ac = sim[(sim.checkpoint_a == "a") & (sim.checkpoint_b == "c") & (sim.layer >= K)]
    assert (ac["direction_cosine"].abs() < 0.6).all()
    narrow = DirectionSet(torch.ones(2, 1, 32), [0, 1], [-1], 32, 2)
    with pytest.raises(VlsafeError, match="hidden size 64.*hidden size 32"):
        direction_cosines(ds, narrow, label_a="a", label_b="narrow")
    drift = projection_drift(ds, acts_h, acts_b).set_index("layer")
    assert (drift.loc[K:, "harmful_mean"] - drift.loc[K:, "harmless_mean"]).min() > 3.5   # |v| = 4 along r̂
    assert (drift.loc[K:, "d_prime"] > 5).all()
    tr = transfer((acts_h, acts_b), (acts_h, acts_b), label_a="a", label_b="a").set_index("layer")
    assert (tr.loc[K:, "transfer_accuracy"] == 1.0).all() and tr["position"].eq("-1").all()
    with pytest.raises(VlsafeError, match="hidden size"):
        projection_drift(narrow, acts_h, acts_b)


def test_opening_logprob_with_an_image_uses_the_cache_correctly(tiny_llava_dir):
    from vlsafe.probes.scores import _opening_logprobs_full, opening_sequences
    from vlsafe.probes.templates import blank_image, encode

    lm = load(tiny_llava_dir)
    prompts, openings = ["What is this?", "Describe the picture in detail please"], ["I'm sorry, but I can", "Sure"]
    images = [blank_image(lm), blank_image(lm, color=(200, 10, 10))]
    got, _ = opening_logprobs(lm, prompts, openings, images=images)
    full = _opening_logprobs_full(lm.model, encode(lm, prompts, images), opening_sequences(lm.processor, openings))
    np.testing.assert_allclose(got, full.numpy(), atol=1e-5)
    text_only, _ = opening_logprobs(lm, prompts, openings)
    assert np.abs(text_only - got).max() > 1e-4                     # the image matters
