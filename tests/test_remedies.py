"""Activation-level remedies (steer, calibrate, project, ablate): planted image shifts removed exactly, steering
equal to activation addition, the same edits under capture, generation and the KV-cache refusal score, one-line
errors on bad specs (docs/methods.md, "Activation-level remedies")."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from _remedy_helpers import (D, K, PROMPT, PROMPTS, _block_input, _direction_file, _logits, _noise_image, _one_line,
                             _plant, _planted, _shift_file, _spec, _vec)
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.tiny import tiny_llama, tiny_llava
from vlsafe.probes import models as M
from vlsafe.probes.behavior.generate import _until_eos, generate, stop_token_ids
from vlsafe.probes.capture import capture
from vlsafe.probes.interventions import ablate_direction, add_direction
from vlsafe.probes.models import load
from vlsafe.probes.remedies import apply_remedy, evaluate_remedy, project, steer
from vlsafe.probes.remedy_spec import RemedySpec
from vlsafe.probes.scores import _cache_of, refusal_score
from vlsafe.probes.shift import ShiftResult
from vlsafe.probes.templates import encode


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return load(tiny_llava(tmp_path_factory.mktemp("rem") / "llava", vision="clip", seed=1))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load(tiny_llama(tmp_path_factory.mktemp("rem") / "llama", seed=2))


# ---- planted image shift ---------------------------------------------------------------------------------------

def test_project_and_calibrate_remove_a_planted_image_shift(llava, tmp_path):
    u, w, c = _planted()
    batch = encode(llava, [PROMPT, PROMPT], [_noise_image(), None])          # mixed: image row, text row
    plant = lambda: _plant(llava, 0, c * u + w)                               # noqa: E731
    before = _block_input(llava, batch, 0, plant)
    gap = before[0, -K:] - before[1, -K:]
    torch.testing.assert_close(gap, (c * u + w).expand(K, D), atol=1e-6, rtol=0)   # the plant is there

    proj = _spec("project", tmp_path, direction={"file": _direction_file(tmp_path, u * 3)})
    with plant(), apply_remedy(llava, proj):
        after = _block_input(llava, batch, 0)
    gap = after[0, -K:] - after[1, -K:]
    assert (gap @ u).abs().max() < 1e-6                                        # along u: equal to the text-only row
    torch.testing.assert_close(gap, w.expand(K, D), atol=1e-6, rtol=0)         # w untouched
    torch.testing.assert_close(after[1], before[1], atol=0, rtol=0)            # text row unchanged

    cal = _spec("calibrate", tmp_path, shift={"file": _shift_file(tmp_path, c * u + w), "condition": "blank"})
    with plant(), apply_remedy(llava, cal):
        after = _block_input(llava, batch, 0)
    torch.testing.assert_close(after[0, -K:], after[1, -K:], atol=1e-6, rtol=0)
    torch.testing.assert_close(after[1], before[1], atol=0, rtol=0)


def test_project_at_a_later_layer_matches_the_text_only_forward(llava, tmp_path):
    """At layer 1 the natural image shift (attention over image tokens) is removed along r̂, and only along r̂."""
    batch = encode(llava, [PROMPT, PROMPTS[1]], [_noise_image(1), _noise_image(2)])
    text = _block_input(llava, encode(llava, [PROMPT, PROMPTS[1]]), 1)[:, -1]
    before = _block_input(llava, batch, 1)[:, -1]
    u = (before - text).sum(0) + 0.01 * _planted()[0]                         # mostly along the shifts
    u = u / u.norm()
    with project(llava, u * 5, layers=[1]):
        after = _block_input(llava, batch, 1)[:, -1]
    assert ((before - text) @ u).abs().min() > 1e-3                            # there was something to remove
    assert ((after - text) @ u).abs().max() < 1e-7
    torch.testing.assert_close(after - (after @ u)[:, None] * u, before - (before @ u)[:, None] * u,
                               atol=1e-6, rtol=0)


# ---- steering -------------------------------------------------------------------------------------------------

def test_steer_alpha_zero_is_identity_and_equals_activation_addition(llama, tmp_path):
    v = _vec(21, 2) * 2                                                        # [L, d]
    batch = encode(llama, PROMPTS)
    base = _logits(llama, batch)
    path = _direction_file(tmp_path, v, "layers.safetensors")
    with apply_remedy(llama, _spec("steer", tmp_path, layers=[1], alpha=0.0,
                                   direction={"file": path, "unit": False})):
        torch.testing.assert_close(_logits(llama, batch), base, atol=0, rtol=0)
    with apply_remedy(llama, _spec("steer", tmp_path, layers=[1], alpha=1.5,
                                   direction={"file": path, "unit": False})):
        steered = _logits(llama, batch)
    with add_direction(llama.model, v[1], 1, coeff=1.5):
        added = _logits(llama, batch)
    assert (steered - base).abs().max() > 1e-3
    torch.testing.assert_close(steered, added, atol=1e-6, rtol=1e-6)
    with steer(llama, v[1] / v[1].norm(), layers=[1], alpha=1.5):            # unit: true reads r̂
        unit = _logits(llama, batch)
        seen = capture(llama, PROMPTS, hooks="resid_pre", positions=[-1]).stack("resid_pre").double()
    plain = capture(llama, PROMPTS, hooks="resid_pre", positions=[-1]).stack("resid_pre").double()
    torch.testing.assert_close(seen[:, 1, 0] - plain[:, 1, 0], (1.5 * v[1] / v[1].norm()).expand(3, D),
                               atol=1e-6, rtol=0)                              # capture sees the edited stream
    with apply_remedy(llama, _spec("steer", tmp_path, layers=[1], alpha=1.5, direction={"file": path})):
        torch.testing.assert_close(_logits(llama, batch), unit, atol=1e-6, rtol=1e-6)


def test_hooks_are_removed_on_error(llama):
    with pytest.raises(RuntimeError, match="boom"):
        with steer(llama, _vec(24), layers=[0, 1]):
            assert sum(len(m._forward_pre_hooks) for m in llama.model.modules()) == 3
            raise RuntimeError("boom")
    assert not any(m._forward_pre_hooks for m in llama.model.modules())


def test_ablate_spec_reuses_ablate_direction_at_the_chosen_layers(llama, tmp_path):
    r = _vec(22)
    batch = encode(llama, PROMPTS)
    spec = _spec("ablate", tmp_path, layers=[0, 1], direction={"file": _direction_file(tmp_path, r)})
    with apply_remedy(llama, spec):
        both = _logits(llama, batch)
    with ablate_direction(llama.model, r):
        full = _logits(llama, batch)
    torch.testing.assert_close(both, full, atol=1e-6, rtol=1e-6)
    with apply_remedy(llama, spec.model_copy(update={"layers": [1]})):
        one = _logits(llama, batch)
    assert (one - full).abs().max() > 1e-4


# ---- under generation and the refusal score ------------------------------------------------------------------

def _manual_project(lm, batch, prompts, images_rows, r: torch.Tensor, alpha: float, layer: int):
    """A plain block pre-hook adding the per-row constant −α (Δ·r̂) r̂ (Δ from separate forwards)."""
    texts = encode(lm, prompts)
    delta = _block_input(lm, batch, layer)[:, -1] - _block_input(lm, texts, layer)[:, -1]
    coef = (delta @ r) * torch.tensor(images_rows, dtype=torch.float64)
    add = -alpha * coef[:, None, None] * r

    def hook(_m, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h = (h.double() + add[:h.shape[0]]).to(h.dtype)
        return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    return M.decoder_layers(lm.model)[layer].register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def project_case(llava):
    """(images, batch, r̂ along the image shifts at layer 1, α): a mixed batch and a project remedy that moves it."""
    imgs = [_noise_image(3), None, _noise_image(4)]
    batch = encode(llava, PROMPTS, imgs)
    r = (_block_input(llava, batch, 1)[:, -1] - _block_input(llava, encode(llava, PROMPTS), 1)[:, -1]).sum(0)
    return imgs, batch, r / r.norm(), 40.0


def _under(llava, case, ctx, fn):
    imgs, batch, r, alpha = case
    with ctx(llava, batch, r, alpha):
        return fn()


def _manual(llava, batch, r, alpha):
    handle = _manual_project(llava, batch, PROMPTS, [1, 0, 1], r, alpha, 1)
    return _hooks_removed(handle)


@contextlib.contextmanager
def _hooks_removed(handle):
    try:
        yield
    finally:
        handle.remove()


def _remedy(llava, batch, r, alpha):
    return project(llava, r, layers=[1], alpha=alpha)


def test_project_under_generate_matches_manual_hooks(llava, project_case):
    imgs, batch, r, alpha = project_case
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=stop_token_ids(llava),
              pad_token_id=llava.tokenizer.pad_token_id)

    def run():
        with torch.no_grad():
            return llava.model.generate(**batch.model_inputs(position_ids=False), **kw)[:, batch.input_ids.shape[1]:]

    plain, manual = run(), _under(llava, project_case, _manual, run)
    hooked = _under(llava, project_case, _remedy, run)
    texts = _under(llava, project_case, _remedy,
                   lambda: generate(llava, PROMPTS, images=imgs, max_new_tokens=6, cache=True, progress=False))
    assert not torch.equal(plain, manual)                                       # the remedy changes outputs
    assert torch.equal(hooked, manual)
    eos = stop_token_ids(llava)
    assert texts == [llava.tokenizer.decode(_until_eos(row, eos), skip_special_tokens=True).strip()
                     for row in hooked.tolist()]


@pytest.mark.parametrize("kind", ["first_token", "opening"])
def test_project_under_refusal_scores_matches_manual_hooks(llava, project_case, kind):
    """`opening` continues a KV cache: the continuation keeps the prompt's rows and scalars."""
    imgs = project_case[0]
    run = lambda: refusal_score(llava, PROMPTS, images=imgs, kind=kind, batch_size=3)   # noqa: E731
    plain, manual = run(), _under(llava, project_case, _manual, run)
    hooked = _under(llava, project_case, _remedy, run)
    assert np.abs(plain - manual).max() > 1e-4
    np.testing.assert_allclose(hooked, manual, atol=1e-7, rtol=0)
    assert hooked[1] == plain[1]                                                # the text row is untouched


def _prefill_and_step(lm, batch, layer: int) -> list[torch.Tensor]:
    """Block `layer`'s inputs of a prefill and of a two-token cached continuation (fp64)."""
    seen = []
    hook = M.decoder_layers(lm.model)[layer].register_forward_pre_hook(
        lambda _m, a, k: seen.append((a[0] if a else k["hidden_states"]).detach().double()), with_kwargs=True)
    try:
        with torch.no_grad():
            out = lm.model(**batch.model_inputs(), use_cache=True)
            nxt = torch.full((len(batch), 2), 5, dtype=batch.input_ids.dtype)
            mask = torch.cat([batch.attention_mask, torch.ones_like(nxt)], 1)
            key, cache = _cache_of(out)
            lm.model(input_ids=nxt, attention_mask=mask, position_ids=batch.position_ids[:, -1:] + torch.arange(1, 3),
                     **{key: cache}, use_cache=True)
    finally:
        hook.remove()
    return seen


def test_positions_last_edits_the_last_prompt_position_and_every_continuation(llama):
    """Block 1's input in a continuation depends only on layer 0's cache, which an edit at block 1 leaves alone."""
    v = _vec(23)
    batch = encode(llama, PROMPTS)
    plain = _prefill_and_step(llama, batch, 1)
    with steer(llama, v, layers=[1], alpha=0.5, positions="last"):
        last = _prefill_and_step(llama, batch, 1)
    assert [t.shape[1] for t in last] == [batch.input_ids.shape[1], 2]
    torch.testing.assert_close(last[0][:, :-1], plain[0][:, :-1], atol=0, rtol=0)
    torch.testing.assert_close(last[0][:, -1], plain[0][:, -1] + 0.5 * v, atol=1e-6, rtol=0)
    torch.testing.assert_close(last[1], plain[1] + 0.5 * v, atol=1e-6, rtol=0)


def test_evaluate_remedy_scores_the_remedied_model(llama, tmp_path, monkeypatch):
    from vlsafe.probes.behavior.datasets import load_prompts
    from vlsafe.probes.behavior.evaluate import EvalSet

    monkeypatch.setenv("VLSAFE_CACHE", str(tmp_path / "cache"))
    ps = load_prompts("harmful-test", limit=3)
    spec = _spec("steer", tmp_path, layers=[1], alpha=8.0, direction={"file": _direction_file(tmp_path, _vec(71))})
    gens, rows = evaluate_remedy(llama, spec, [EvalSet(ps)], judge="logit-first_token")
    with apply_remedy(llama, spec):
        want = refusal_score(llama, ps.prompts, kind="first_token")
    assert np.abs(want - refusal_score(llama, ps.prompts, kind="first_token")).max() > 1e-3
    np.testing.assert_allclose(gens["judge_score"].to_numpy(float), 1 / (1 + np.exp(-want)), rtol=1e-9)   # P(refuse)
    assert set(rows["checkpoint"]) == {f"remedy-{spec.key()}"}
    assert not any(m._forward_pre_hooks for m in llama.model.modules())


# ---- the spec -------------------------------------------------------------------------------------------------

def test_spec_yaml_paths_and_key(tmp_path):
    (tmp_path / "a").mkdir()
    _direction_file(tmp_path / "a", _vec(41))
    (tmp_path / "a" / "spec.yaml").write_text("kind: steer\nlayers: [1]\nalpha: 2e-1\n"
                                              "direction: {file: dir.safetensors, unit: false}\n")
    spec = RemedySpec.from_yaml(tmp_path / "a" / "spec.yaml")
    assert spec.alpha == 0.2                                                    # YAML reads 2e-1 as a string
    assert spec.direction.file == str(tmp_path / "a" / "dir.safetensors") and not spec.needs_images
    key = spec.key()
    assert spec.model_copy(update={"alpha": 3.0}).key() != key
    _direction_file(tmp_path / "a", _vec(42))                                   # same path, new content
    assert spec.key() != key

def test_vectors_read_probe_and_locate_files(llama, tmp_path):
    """`directions.safetensors` by checkpoint label, layer and position; `shift_vectors` defaults to
    `refusal_direction`; `layer: 1` pins one layer's direction for every remedy layer."""
    from vlsafe.probes.directions import DirectionSet, save_directions
    from vlsafe.probes.remedy_spec import vectors

    raw = {lab: _vec(seed, 2, 3) for lab, seed in (("a", 81), ("b", 82))}          # [L, P, d]
    sets = {lab: DirectionSet(t, [0, 1], [-3, -2, -1], D, 2) for lab, t in raw.items()}
    path = str(save_directions(tmp_path / "directions.safetensors", sets))
    got = vectors(_spec("steer", tmp_path, layers=[0, 1], direction={"file": path, "key": "b", "position": -2,
                                                                       "unit": False}), llama)
    torch.testing.assert_close(got[0], raw["b"][0, 1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], raw["b"][1, 1], atol=1e-6, rtol=1e-6)
    got = vectors(_spec("steer", tmp_path, layers=[0, 1], direction={"file": path, "key": "a", "layer": 1}), llama)
    torch.testing.assert_close(got[0], raw["a"][1, -1] / raw["a"][1, -1].norm(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], got[0])
    cond = ("blank", "harmful")
    shift = ShiftResult([0, 1], [-1], {cond: _vec(83, 2, 1)}, {cond: torch.ones(2, 1)}, {"harmful": 1},
                        direction=_vec(84, 2, 1))
    spath = str(shift.save(tmp_path / "shift_vectors.safetensors"))
    got = vectors(_spec("steer", tmp_path, layers=[1], direction={"file": spath, "unit": False}), llama)
    torch.testing.assert_close(got[1], _vec(84, 2, 1)[1, 0].float().double())
    with pytest.raises(VlsafeError, match="labels: a, b") as e:
        vectors(_spec("steer", tmp_path, layers=[0], direction={"file": path, "key": "c"}), llama)
    _one_line(e)


@pytest.mark.parametrize("raw, match", [
    ({"kind": "steer", "layers": [0], "alpha": "x", "direction": {"file": "d"}}, "alpha: must be a number"),
    ({"kind": "steer", "layers": [0], "direction": {"file": "d"}, "extra": 1}, "extra"),
    ({"kind": "calibrate", "layers": [0], "direction": {"file": "d"}}, "calibrate reads a 'shift:'"),
    ({"kind": "ablate", "layers": [0], "alpha": 2, "direction": {"file": "d"}}, "alpha must be 1"),
    ({"kind": "steer", "layers": [], "direction": {"file": "d"}}, "layers"),
])
def test_bad_specs_are_one_line_errors(raw, match):
    with pytest.raises(VlsafeError, match=match) as e:
        RemedySpec.parse(raw, "spec.yaml")
    assert _one_line(e).startswith("spec.yaml: ")


def test_bad_input_against_the_model(llama, llava, tmp_path):
    d = _direction_file(tmp_path, _vec(51))
    narrow = _direction_file(tmp_path, torch.ones(8), "narrow.safetensors")
    cases = [
        (llama, {"kind": "project", "layers": [0], "direction": {"file": d}}, "takes no images"),
        (llama, {"kind": "steer", "layers": [5], "direction": {"file": d}}, "5 out of range"),
        (llama, {"kind": "steer", "layers": [0], "direction": {"file": narrow}},
         "width 8 but the model's hidden size is 64"),
        (llava, {"kind": "calibrate", "layers": [0], "shift": {"file": _shift_file(tmp_path, _vec(52)),
                                                               "condition": "noise"}}, r"conditions: blank"),
    ]
    for lm, raw, match in cases:
        with pytest.raises(VlsafeError, match=match) as e:
            with apply_remedy(lm, RemedySpec.parse(raw, "spec.yaml")):
                pass
        _one_line(e)
    assert not any(m._forward_pre_hooks for m in llama.model.modules())       # nothing left behind
    with pytest.raises(VlsafeError, match="takes no images"):
        project(llama, _vec(53), layers=[0])
