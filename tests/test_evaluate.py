"""The one evaluation (`vlsafe.probes.behavior.evaluate.evaluate_model`): tidy rows against planted ground truth.

`planted_refuser` answers every prompt with a refusal; a random tiny Llama never refuses (see test_eval_cli).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pandas as pd
import pytest

from test_eval_cli import REFUSAL, planted_refuser
from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.behavior.datasets import load_prompts
from vlsafe.probes.behavior.evaluate import EvalSet, evaluate_model
from vlsafe.probes.behavior.metrics import ROW_COLUMNS, summarize, wilson_interval


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict:
    from vlsafe.probes.models import load

    return {"refuser": load(str(planted_refuser(tmp_path_factory.mktemp("refuser") / "refuser"))),
            "llama": load(str(tiny_llama_dir))}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLSAFE_CACHE", str(tmp_path / "cache"))


def _sets() -> list[EvalSet]:
    return [EvalSet(load_prompts("harmful-test", limit=5)),
            EvalSet(load_prompts("borderline-test", limit=3), metric="over_refusal"),
            EvalSet(load_prompts("harmless-test", limit=4), metric="compliance")]


@pytest.mark.parametrize("name,refuses", [("refuser", True), ("llama", False)])
def test_rates_follow_the_planted_behaviour(models: dict, name: str, refuses: bool) -> None:
    gens, rows = evaluate_model(models[name], _sets(), checkpoint=name, judge="substring-rd", max_new_tokens=12)
    assert list(rows.columns) == ROW_COLUMNS and (rows["checkpoint"] == name).all()
    assert (gens["response"] == REFUSAL).all() == refuses and gens["refused"].tolist() == [int(refuses)] * 12
    overall = rows[rows["category"] == ""].set_index("metric")
    want_k = {"refusal_rate": 5 * refuses, "over_refusal": 3 * refuses, "compliance": 4 * (not refuses)}
    for metric, k in want_k.items():
        r = overall.loc[metric]
        n = {"refusal_rate": 5, "over_refusal": 3, "compliance": 4}[metric]
        assert (r["n"], r["k"], r["rate"]) == (n, k, k / n)
        assert (r["ci_low"], r["ci_high"]) == wilson_interval(k, n)  # the interval of k itself, not 1 − the other
        assert r["judge"] == "substring-rd" and r["mode"] == "generate"
    assert bool(overall.loc["refusal_rate", "harmful"]) and not bool(overall.loc["compliance", "harmful"])
    per_cat = rows[(rows["category"] != "") & (rows["metric"] == "refusal_rate")]
    assert len(per_cat) and per_cat["n"].sum() == 5 and per_cat["k"].sum() == 5 * refuses


def test_logit_mode_scores_without_generating(models: dict) -> None:
    gens, rows = evaluate_model(models["refuser"], _sets()[:1], checkpoint="r", judge="logit")
    assert (gens["response"] == "").all() and (gens["judge"] == "logit-opening").all()
    r = rows[rows["category"] == ""].iloc[0]
    assert (r["k"], r["n"], r["mode"]) == (5, 5, "logit")


def test_accuracy_and_loglik_rows(models: dict) -> None:
    from vlsafe.probes.behavior.helpfulness import answer_loglik

    ps = load_prompts("harmless-test", limit=5)
    refs = ["Bread needs flour.", "Yes.", "The sea is blue.", "Two plus two is four.", "Hello there!"]
    sets = [EvalSet(ps, metric="accuracy", check=lambda i, resp: i in (0, 3) and resp == REFUSAL,
                    check_name="planted", max_new_tokens=12),
            EvalSet(ps, metric="answer_loglik", references=refs)]
    gens, rows = evaluate_model(models["refuser"], sets, checkpoint="r", max_new_tokens=1)
    overall = rows[rows["category"] == ""]
    assert overall["metric"].tolist() == ["accuracy", "answer_loglik"]
    acc, ll = overall.iloc[0], overall.iloc[1]
    assert (acc["metric"], acc["n"], acc["k"], acc["judge"]) == ("accuracy", 5, 2, "planted")
    assert (acc["ci_low"], acc["ci_high"]) == wilson_interval(2, 5)
    assert gens["correct"].tolist() == [True, False, False, True, False] and gens["refused"].isna().all()
    vals = answer_loglik(models["refuser"], ps, refs)
    half = 1.96 * statistics.stdev(vals) / math.sqrt(5)
    assert ll["n"] == 5 and pd.isna(ll["k"]) and ll["mode"] == "loglik"
    assert (ll["rate"], ll["ci_low"], ll["ci_high"]) == pytest.approx((vals.mean(), vals.mean() - half,
                                                                        vals.mean() + half), rel=1e-12)


def test_eval_summary_equals_summarize_of_the_generations(models: dict, tiny_llama_dir: Path) -> None:
    from vlsafe.probes.behavior.evaluate import evaluate

    gens, summary = evaluate({"refuser": models["refuser"], "llama": str(tiny_llama_dir)},
                             ["harmless-test", "harmful-test"], judge="substring-rd", max_new_tokens=12, limit=4,
                             progress=False)
    again = summarize(gens, "substring-rd")
    pd.testing.assert_frame_equal(summary, again)
    assert summary["asr"].notna().tolist() == (summary["prompt_set"] == "harmful-test").tolist()
    assert list(dict.fromkeys(zip(summary["checkpoint"], summary["prompt_set"]))) == \
        [("refuser", "harmless-test"), ("refuser", "harmful-test"), ("llama", "harmless-test"),
         ("llama", "harmful-test")]  # order of evaluation, each overall row first


def test_bad_sets_are_one_line_errors() -> None:
    ps = load_prompts("harmful-test", limit=2)
    with pytest.raises(VlsafeError, match="unknown metric 'nope'"):
        EvalSet(ps, metric="nope")
    with pytest.raises(VlsafeError, match="accuracy"):
        EvalSet(ps, metric="accuracy")
    with pytest.raises(VlsafeError, match="references"):
        EvalSet(ps, metric="answer_loglik")
    with pytest.raises(VlsafeError, match="3 images for 2 prompts"):
        EvalSet(ps, images=["blank"] * 3)
