"""The gate's condition (`vlsafe.probes.gate`): planted harmful rows carry +c·u at the condition layer's input;
the fitted condition finds u, its threshold is the smallest with ≤ max_fpr false positives on harmless-val, and
it fires exactly on the planted rows; files round-trip; bad input gives one-line errors and writes nothing."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.gate import Condition, choose_threshold, condition_scores, fit_condition
from vlsafe.probes.models import block, load

MARK = "@"   # a byte the tiny tokenizer never merges: a prompt containing it is a planted "harmful" prompt
_WORDS = ["bake bread", "poem about the sea", "photosynthesis", "the red circle", "three tips for studying",
          "the quick brown fox", "a blue background", "the lazy dog", "triangle and square", "one two three"]


def texts(n: int, *, start: int, marked: bool) -> list[str]:
    """`n` distinct prompts (each marked with MARK when `marked`)."""
    out = []
    for i in range(start, start + n):
        body = f"Tell me about {_WORDS[i % len(_WORDS)]} and {_WORDS[(3 * i + 1) % len(_WORDS)]}, {i}."
        out.append(f"{MARK} {body}" if marked else body)
    return out


def unit_vector(d: int, seed: int = 5) -> torch.Tensor:
    u = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return u / u.norm()


@contextlib.contextmanager
def planted(lm, *, layer: int, u: torch.Tensor, c: float):
    """Add c·u to the input of block `layer` (every position) on the rows whose prompt contains MARK."""
    mark = lm.tokenizer.convert_tokens_to_ids(MARK)
    rows: dict[str, torch.Tensor] = {}

    def read_ids(_m, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows["m"] = (ids == mark).any(-1).to(torch.float32)

    def add(_m, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h = h + c * rows["m"][:, None, None] * u.to(h.dtype)
        return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    handles = [lm.model.register_forward_pre_hook(read_ids, with_kwargs=True),
               block(lm.model, layer).module.register_forward_pre_hook(add, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    return load(tiny_llama_dir)


SETS = dict(harmful_train=texts(12, start=0, marked=True), harmless_train=texts(12, start=100, marked=False),
            harmless_val=texts(20, start=200, marked=False), harmful_val=texts(8, start=300, marked=True))
TEST = [t for pair in zip(texts(6, start=400, marked=True), texts(6, start=500, marked=False)) for t in pair]
TEST_PLANTED = torch.tensor([MARK in t for t in TEST])


@pytest.mark.parametrize("kind", ["direction", "probe"])
def test_condition_fires_exactly_on_planted_rows(lm, kind):
    # at block 0's input the last prompt position holds the same token's embedding for every prompt, so every
    # unplanted state is identical and the planted ones differ by exactly c·u
    u = unit_vector(64)
    with planted(lm, layer=0, u=u, c=5.0):
        cond = fit_condition(lm, layer=0, kind=kind, max_fpr=0.05, **SETS)
        got = condition_scores(lm, TEST, condition=cond, batch_size=5)
    assert torch.equal(got.fired, TEST_PLANTED)
    assert cond.provenance["val_fpr"] == 0.0 and cond.provenance["val_tpr"] == 1.0
    if kind == "direction":
        assert float(cond.weight @ u) > 1 - 1e-9
        torch.testing.assert_close(got.score[TEST_PLANTED] - cond.threshold,
                                   torch.full((6,), 5.0, dtype=torch.float64), atol=1e-5, rtol=0)
    without = condition_scores(lm, TEST, condition=cond)     # no plant: nothing is harmful
    assert not without.fired.any()


def test_threshold_is_smallest_with_at_most_max_fpr_on_val(lm):
    # block 1's input varies from prompt to prompt: distinct harmless-val scores
    u = unit_vector(64, seed=9)
    with planted(lm, layer=1, u=u, c=50.0):
        cond = fit_condition(lm, layer=1, kind="direction", max_fpr=0.1, **SETS)
        val = condition_scores(lm, SETS["harmless_val"], condition=cond)
        test = condition_scores(lm, TEST, condition=cond)
    assert float(cond.weight @ u) > 0.99
    allowed = math.floor(0.1 * 20)
    assert int(val.fired.sum()) == allowed == 2                    # ≤ max_fpr, and no ties among the scores
    assert int((val.score >= cond.threshold).sum()) == allowed + 1  # any lower threshold adds a false positive
    assert cond.provenance["val_fpr"] == pytest.approx(allowed / 20)
    assert test.fired[TEST_PLANTED].all()
    prov = cond.provenance
    assert prov["fitted_on"] == {"harmful_train": "<12 prompts>", "harmless_train": "<12 prompts>"}
    assert prov["threshold_from"] == "<20 prompts>" and prov["n"]["harmful_val"] == 8 and prov["max_fpr"] == 0.1


def test_choose_threshold_counts():
    s = [0.5, 3.0, -1.0, 2.0, 1.0]
    assert choose_threshold(s, 0.0) == 3.0              # nothing above
    assert choose_threshold(s, 0.2) == 2.0              # one of five above
    assert choose_threshold(s, 0.39) == 2.0
    assert choose_threshold(s, 0.4) == 1.0


def test_probe_condition_folds_the_sklearn_pipeline(lm):
    from vlsafe.probes.capture import capture
    from vlsafe.probes.linear import classifier

    cond = fit_condition(lm, layer=1, kind="probe", **{k: v for k, v in SETS.items() if k != "harmful_val"})
    h = lambda p: capture(lm, p, layers=[1], progress=False).get("resid_pre", 1)[:, 0].double().numpy()  # noqa: E731
    x, y = [h(SETS["harmful_train"]), h(SETS["harmless_train"])], [1] * 12 + [0] * 12
    import numpy as np

    clf = classifier().fit(np.concatenate(x), y)
    test = h(TEST)
    np.testing.assert_allclose(condition_scores(lm, TEST, condition=cond).score.numpy(),
                               clf.decision_function(test), rtol=1e-9, atol=1e-9)
    assert "harmful_val" not in cond.provenance["n"] and "val_tpr" not in cond.provenance


def test_save_load_round_trip(lm, tmp_path):
    with planted(lm, layer=1, u=unit_vector(64), c=20.0):
        cond = fit_condition(lm, layer=1, kind="probe", **SETS)
    path = cond.save(tmp_path / "gate" / "cond.json")
    rec = json.loads(path.read_text())
    assert rec["format"] == "vlsafe.condition/1" and rec["weights"] == "cond.safetensors"
    assert (rec["kind"], rec["layer"], rec["position"], rec["hidden_size"]) == ("probe", 1, -1, 64)
    back = Condition.load(path)
    assert back == cond and torch.equal(back.weight, cond.weight)
    assert torch.equal(condition_scores(lm, TEST, condition=back).score, condition_scores(lm, TEST, condition=cond).score)
    never, always = back.with_threshold(math.inf), back.with_threshold(-math.inf)
    assert not condition_scores(lm, TEST, condition=never).fired.any()
    assert condition_scores(lm, TEST, condition=always).fired.all()
    assert Condition.load(never.save(tmp_path / "never.json")).threshold == math.inf


def _one_line(excinfo, *needles: str) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


def test_bad_conditions_are_one_line_errors(lm, tmp_path):
    w = unit_vector(64)
    with pytest.raises(VlsafeError) as e:
        Condition("direction", 0, w, threshold="x")
    _one_line(e, "threshold 'x' is not a number")
    with pytest.raises(VlsafeError) as e:
        Condition("direction", 2, w, threshold=0.0, num_layers=2)
    _one_line(e, "layer 2 out of range", "0..1")
    with pytest.raises(VlsafeError) as e:
        Condition("angle", 0, w, threshold=0.0)
    _one_line(e, "kind 'angle'")
    with pytest.raises(VlsafeError) as e:
        condition_scores(lm, TEST, condition=Condition("direction", 0, unit_vector(32), threshold=0.0))
    _one_line(e, "32 entries", "hidden size is 64")
    with pytest.raises(VlsafeError) as e:
        condition_scores(lm, TEST, condition=Condition("probe", 7, w, threshold=0.0))
    _one_line(e, "layer 7 out of range", "0..1")
    for bad in (dict(layer=2), dict(layer=0, harmful_train="harmful-test"), dict(layer=0, max_fpr=1.5),
                dict(layer=0, kind="angle")):
        with pytest.raises(VlsafeError) as e:
            fit_condition(lm, **{**SETS, "kind": "probe", **bad})
        assert "\n" not in str(e.value)
    assert "-test" in str(pytest.raises(VlsafeError, fit_condition, lm, layer=0, **{**SETS, "harmless_val":
                                                                                     "harmless-test"}).value)
    assert list(tmp_path.iterdir()) == []


def test_bad_condition_files_name_the_file(tmp_path):
    good = Condition("direction", 1, unit_vector(64), threshold=0.5, num_layers=2)
    path = good.save(tmp_path / "cond.json")
    rec = json.loads(path.read_text())
    cases = {"threshold": "x", "layer": 9}
    for key, value in cases.items():
        bad = tmp_path / f"bad_{key}.json"
        bad.write_text(json.dumps({**rec, key: value}))
        with pytest.raises(VlsafeError) as e:
            Condition.load(bad)
        _one_line(e, str(bad))
    save_file({"weight": unit_vector(32)}, str(tmp_path / "narrow.safetensors"))
    (tmp_path / "narrow.json").write_text(json.dumps({**rec, "weights": "narrow.safetensors"}))
    with pytest.raises(VlsafeError) as e:
        Condition.load(tmp_path / "narrow.json")
    _one_line(e, "narrow.safetensors", "32 entries", "hidden size 64")
    with pytest.raises(VlsafeError) as e:
        good.save(tmp_path / "cond.txt")
    _one_line(e, ".json")
    assert not (tmp_path / "cond.txt").exists() and load_file(str(tmp_path / "cond.safetensors"))["weight"].shape == (64,)
