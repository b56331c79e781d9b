"""Judging stored generations again (`vlsafe.probes.behavior.evaluate.rejudge`): the same frames and rows as
generating with the new judge, prompts passed to prompt-aware judges, bad stored input refused."""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import pytest

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.behavior.datasets import load_prompts
from vlsafe.probes.behavior.evaluate import EvalSet, evaluate_model, rejudge
from vlsafe.probes.behavior.judge_base import Judge, JudgeResult


class LengthJudge(Judge):
    """Refused ⇔ the response has an even number of characters (ignores the prompt)."""

    name = "even-length"

    def judge(self, responses: Sequence[str], prompts: Sequence[str] | None = None) -> list[JudgeResult]:
        return [JudgeResult(len(r) % 2 == 0, float(len(r) % 2 == 0)) for r in responses]


class PromptJudge(Judge):
    """Refused ⇔ the prompt has an odd number of words (needs the prompts)."""

    name = "odd-prompt"

    def judge(self, responses: Sequence[str], prompts: Sequence[str] | None = None) -> list[JudgeResult]:
        assert prompts is not None, "rejudge must pass the prompts"
        return [JudgeResult(len(p.split()) % 2 == 1, 0.5) for p in prompts]


def _sets() -> list[EvalSet]:
    return [EvalSet(load_prompts("harmful-val", limit=6)),
            EvalSet(load_prompts("harmful-val+blank", limit=4)),
            EvalSet(load_prompts("harmless-val", limit=5), metric="compliance"),
            EvalSet(load_prompts("borderline-val", limit=3), metric="accuracy", check=lambda i, r: i % 2 == 0)]


@pytest.fixture(scope="module")
def generated(tiny_llava_dir):
    from vlsafe.probes.models import load

    lm = load(tiny_llava_dir)
    kw = dict(max_new_tokens=6, batch_size=4, cache=False)
    return {name: evaluate_model(lm, _sets(), judge=judge, **kw)
            for name, judge in [("length", LengthJudge()), ("prompt", PromptJudge()), ("default", "default")]}


@pytest.mark.parametrize("new", ["prompt", "default"])
def test_rejudged_equals_generated_with_the_new_judge(generated, new):
    old_gens, old_rows = generated["length"]
    want_gens, want_rows = generated[new]
    gens, rows = rejudge(old_gens, _sets(), checkpoint="model", judge=PromptJudge() if new == "prompt" else new)
    pd.testing.assert_frame_equal(gens, want_gens)
    pd.testing.assert_frame_equal(rows, want_rows)
    if new == "prompt":  # planted: the two judges disagree, so equality is not a copy of the old labels
        assert not old_rows["k"].equals(rows["k"])
    else:                # the calibrated default judge: corrected columns come back too
        assert rows["rate_corrected"].notna().any()


def test_bad_stored_generations_are_one_line_errors(generated):
    gens, _ = generated["length"]
    with pytest.raises(VlsafeError, match="17 stored generations for 18 prompts"):
        rejudge(gens.iloc[:-1], _sets())
    swapped = gens.copy()
    swapped.loc[7, "prompt"] = "something else"
    with pytest.raises(VlsafeError, match=r"stored generation 7 \(set harmful-val\+blank, prompt .*\) is for another"):
        rejudge(swapped, _sets())
    with pytest.raises(VlsafeError, match="logit judge"):
        rejudge(gens, _sets(), judge="logit")
    from vlsafe.probes.behavior.logit_judge import LogitJudge

    with pytest.raises(VlsafeError, match="logit judge"):  # an instance would score the prompts, not the responses
        rejudge(gens, _sets(), judge=LogitJudge(None))
    loglik = [EvalSet(load_prompts("harmless-val", limit=2), metric="answer_loglik", references=["a", "b"])]
    with pytest.raises(VlsafeError, match="nothing to re-judge"):
        rejudge(gens.iloc[:2], loglik)
