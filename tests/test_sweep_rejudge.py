"""A sweep rerun whose only change is the judge judges each point's stored generations again instead of generating:
the same pareto.csv as a fresh sweep with that judge; evaluations written before `eval.json` existed count too."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from vlsafe.experiments import sweep as S
from vlsafe.experiments.sweep import load_sweep, run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

NUMBERS = ["point", "safety", "safety_ci_low", "over_refusal", "helpfulness", "safety_image", "safety_image_ci_high",
           "n_harmful", "n_harmful_image", "is_pareto", "is_pareto_image"]


def _config(tmp: Path, judge: str) -> Path:
    d = {"inputs": {"lvlm": {"tiny": "llava", "seed": 0}, "other": {"tiny": "llava", "seed": 1}},
         "eval": {"mode": "full", "judge": judge, "limit": 4, "max_new_tokens": 4, "batch_size": 4,
                  "harmful_image": "harmful-val+blank"},
         "grid": [{"name": "as-is", "method": "checkpoint", "config": "${lvlm}"},
                  {"name": "other", "method": "checkpoint", "config": "${other}"}]}
    path = tmp / f"sweep-{len(list(tmp.glob('sweep-*')))}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def _sweep(tmp: Path, judge: str, out: Path, **kw) -> pd.DataFrame:
    cfg, base = load_sweep(_config(tmp, judge))
    return run_sweep(cfg, out, base_dir=base, progress=False, **kw)


def _no_generation(*a, **k):
    raise AssertionError("generated although only the judge changed")


def test_a_new_judge_rejudges_stored_generations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = tmp_path / "planted.txt"
    planted.write_text("e\na\n")  # a substring list that calls most tiny outputs refusals: the numbers must move
    first = _sweep(tmp_path, "substring-rd", tmp_path / "run")
    want = _sweep(tmp_path, f"substring:{planted}", tmp_path / "fresh")
    with monkeypatch.context() as m:
        m.setattr(S, "evaluate_point", _no_generation)
        got = _sweep(tmp_path, f"substring:{planted}", tmp_path / "run", resume=True)
    pd.testing.assert_frame_equal(got[NUMBERS], want[NUMBERS])
    assert not first["safety"].equals(got["safety"]) and got["n_harmful_image"].eq(4).all()
    for p in got["hash"]:
        new, = [d for d in (tmp_path / "run" / "points" / p).glob("eval-*")
                if json.loads((d / "eval.json").read_text())["rejudged_from"]]
        fresh = tmp_path / "fresh" / "points" / p / new.name
        assert (new / "generations.jsonl").read_text() == (fresh / "generations.jsonl").read_text()
    more = _config(tmp_path, "substring-rd")
    d = yaml.safe_load(more.read_text())
    d["eval"]["max_new_tokens"] = 5  # another generation setting: generates
    more.write_text(yaml.safe_dump(d))
    cfg, base = load_sweep(more)
    with monkeypatch.context() as m, pytest.raises(AssertionError, match="generated although"):
        m.setattr(S, "evaluate_point", _no_generation)
        run_sweep(cfg, tmp_path / "run", base_dir=base, progress=False, resume=True)


def test_evaluations_from_before_eval_json_are_rejudged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An evaluation folder without `eval.json` whose name is the key an unversioned judge gave is reused after
    the default judge is retrained (its version enters the key)."""
    from vlsafe.probes.behavior import judge_vlsafe, judges

    with monkeypatch.context() as m:  # written when the shipped judge was the unversioned one
        m.setattr(judges, "UNKEYED_FINGERPRINT", judges.judge_fingerprint())
        before = _sweep(tmp_path, "default", tmp_path / "run")
    for f in (tmp_path / "run" / "points").glob("*/eval-*/eval.json"):
        f.unlink()
    w = json.loads(judge_vlsafe.WEIGHTS_PATH.read_text())
    w["intercept"] = 50.0  # planted: a judge that calls (nearly) everything a refusal
    (tmp_path / "w.json").write_text(json.dumps(w))
    monkeypatch.setattr(judge_vlsafe, "WEIGHTS_PATH", tmp_path / "w.json")
    monkeypatch.setattr(S, "evaluate_point", _no_generation)
    after = _sweep(tmp_path, "default", tmp_path / "run", resume=True)
    assert (after["safety"] > before["safety"]).all() and (after["helpfulness"] < before["helpfulness"]).all()


def test_stored_generations_for_other_prompts_are_generated_again(tmp_path: Path) -> None:
    """A stored generations file whose prompts are not the eval's (a prompt file changed since) is not re-judged."""
    _sweep(tmp_path, "substring-rd", tmp_path / "run")
    for f in (tmp_path / "run" / "points").glob("*/eval-*/generations.jsonl"):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        rows[0]["prompt"] = "a prompt the eval set no longer has"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    want = _sweep(tmp_path, "default", tmp_path / "fresh")
    got = _sweep(tmp_path, "default", tmp_path / "run", resume=True)
    pd.testing.assert_frame_equal(got[NUMBERS], want[NUMBERS])
    for p in got["hash"]:
        records = [json.loads((d / "eval.json").read_text()) for d in (tmp_path / "run" / "points" / p).glob("eval-*")]
        assert len(records) == 2 and all(r["rejudged_from"] is None for r in records)
