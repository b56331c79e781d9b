"""Cached judged metrics key on the judge's version: a retrained default judge re-judges, the version every earlier
cache was judged by keeps its caches, judges without a version and fast (logit) screens are not affected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from vlsafe.analysis.errors import VlsafeError
from vlsafe.experiments.organism import metrics as OM
from vlsafe.experiments.organism.config import load_config
from vlsafe.experiments.sweep_eval import EvalConfig
from vlsafe.probes.behavior import judge_vlsafe, judges


SHIPPED = Path(judges.__file__).with_name("judge_weights.json")


@pytest.fixture
def retrained(tmp_path: Path) -> Path:
    """The shipped weights with one coefficient changed."""
    w = json.loads(SHIPPED.read_text())
    w["coef"][0] += 0.5
    path = tmp_path / "judge_weights.json"
    path.write_text(json.dumps(w))
    return path


def test_fingerprint_follows_the_weights_and_names_only_the_default_judge(tmp_path: Path, retrained: Path) -> None:
    shipped = judges.judge_fingerprint("default")
    assert shipped == judges.judge_fingerprint("vlsafe") == judges.judge_fingerprint(f"vlsafe:{SHIPPED}")
    assert judges.judge_fingerprint(f"vlsafe:{retrained}") not in (None, shipped)
    assert judges.judge_fingerprint("substring-rd") is None and judges.keyed_fingerprint("substring-rd") is None
    with pytest.raises(VlsafeError, match="cannot read"):
        judges.judge_fingerprint(f"vlsafe:{tmp_path / 'missing.json'}")


def _versions(monkeypatch: pytest.MonkeyPatch, key: "Callable[[], object]", retrained: Path) -> tuple:
    """`key()` with no fingerprint keyed, with the shipped judge as the unkeyed version, and with a retrained
    default judge installed."""
    with monkeypatch.context() as m:
        m.setattr(judges, "keyed_fingerprint", lambda name: None)
        legacy = key()
    with monkeypatch.context() as m:
        m.setattr(judges, "UNKEYED_FINGERPRINT", judges.judge_fingerprint())
        unkeyed = key()
    with monkeypatch.context() as m:
        m.setattr(judge_vlsafe, "WEIGHTS_PATH", retrained)
        new = key()
    return legacy, unkeyed, new


def test_sweep_eval_key_changes_with_a_retrained_judge(monkeypatch: pytest.MonkeyPatch, retrained: Path) -> None:
    cfg = EvalConfig(mode="two-stage", judge="default")
    keys = lambda: (cfg.key(), cfg.stage_config("screen").key(), cfg.stage_config("full").key())  # noqa: E731
    legacy, unkeyed, new = _versions(monkeypatch, keys, retrained)
    assert unkeyed == legacy                                  # the unkeyed version keeps the caches written before
    assert new[0] != legacy[0] and new[2] != legacy[2]        # two-stage and full keys see the judge
    assert new[1] == legacy[1]                                # the fast screen does not use it
    sub = EvalConfig(mode="full", judge="substring-rd")
    assert len(set(_versions(monkeypatch, sub.key, retrained))) == 1   # a substring judge has no version


def test_organism_metrics_key_changes_with_a_retrained_judge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             retrained: Path) -> None:
    (tmp_path / "stage.json").write_text(json.dumps({"hash": "abc"}))
    cfg = load_config("tiny")
    legacy, unkeyed, new = _versions(monkeypatch, lambda: OM._key(cfg, tmp_path), retrained)
    assert unkeyed == legacy and new != legacy
    sub = load_config("tiny", overrides={"eval.judge": "substring-rd"})
    assert len(set(_versions(monkeypatch, lambda: OM._key(sub, tmp_path), retrained))) == 1


def test_demo_judged_stages_key_on_the_judge_version(monkeypatch: pytest.MonkeyPatch, retrained: Path) -> None:
    from vlsafe.experiments.demo import _content_key

    argv = ["eval", "x", "--prompts", "harmful-test"]
    legacy, unkeyed, new = _versions(monkeypatch, lambda: _content_key(argv, [], judged=True), retrained)
    assert unkeyed == legacy and new != legacy          # the demo's eval stages re-run for a retrained judge
    assert len(set(_versions(monkeypatch, lambda: _content_key(argv, []), retrained))) == 1  # probes etc. do not


def test_weights_rewritten_in_place_are_read_again(retrained: Path) -> None:
    first = judge_vlsafe.load_weights(str(retrained))
    assert judge_vlsafe.load_weights(str(retrained)) is first  # cached while the file is unchanged
    w = json.loads(retrained.read_text())
    w["intercept"] += 1.0
    retrained.write_text(json.dumps(w) + " ")  # retrained in place (another size, so another version)
    assert judge_vlsafe.load_weights(str(retrained))["intercept"] == pytest.approx(first["intercept"] + 1.0)
