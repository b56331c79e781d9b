"""Tests for vlsafe.probes.behavior.metrics: Wilson intervals against an independent formulation, rate tables, summary."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.behavior.metrics import SUMMARY_COLUMNS, compliance_rate, rate_table, summarize, wilson_interval


def _wilson_by_quadratic(k: int, n: int, z: float) -> tuple[float, float]:
    """Independent formulation: the bounds are the roots in p of (k/n - p)^2 = z^2 p (1 - p) / n."""
    ph = k / n
    a, b, c = 1 + z * z / n, -(2 * ph + z * z / n), ph * ph
    roots = np.sort(np.real(np.roots([a, b, c])))
    return float(roots[0]), float(roots[1])


@pytest.mark.parametrize("k,n", [(1, 10), (5, 10), (9, 10), (37, 120), (3, 7), (250, 450), (1, 2)])
def test_wilson_matches_quadratic_roots(k: int, n: int) -> None:
    from scipy.stats import norm

    z = float(norm.ppf(0.975))
    lo, hi = wilson_interval(k, n, z)
    qlo, qhi = _wilson_by_quadratic(k, n, z)
    assert lo == pytest.approx(qlo, abs=1e-9) and hi == pytest.approx(qhi, abs=1e-9)
    assert lo < k / n < hi


def test_wilson_known_value_and_z() -> None:
    # 1/10 at z=1.96: textbook value (0.0179, 0.4042)
    lo, hi = wilson_interval(1, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.0179, 0.4042)
    lo99, hi99 = wilson_interval(1, 10, z=2.576)
    assert lo99 < lo and hi99 > hi


def test_wilson_edges() -> None:
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0 < hi < 0.2
    assert hi == pytest.approx(_wilson_by_quadratic(0, 20, 1.96)[1], abs=1e-9)
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and 0.8 < lo < 1
    assert lo == pytest.approx(1 - wilson_interval(0, 20)[1], abs=1e-12)  # symmetry
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(VlsafeError):
        wilson_interval(5, 3)


def _gens() -> pd.DataFrame:
    return pd.DataFrame({
        "checkpoint": ["llm"] * 6 + ["vl"] * 4,
        "prompt_set": ["harmful-test"] * 10,
        "category": ["cyber", "cyber", "drugs", "drugs", "drugs", ""] + ["cyber"] * 4,
        "refused": [1, 0, 1, 1, 0, 1, 0, 0, 0, 1],
    })


def test_rate_table_and_asr() -> None:
    t = rate_table(_gens(), ["checkpoint"], asr=True)
    llm = t.set_index("checkpoint").loc["llm"]
    assert llm["n"] == 6 and llm["refusals"] == 4 and llm["refusal_rate"] == pytest.approx(4 / 6)
    assert (llm["ci_low"], llm["ci_high"]) == pytest.approx(wilson_interval(4, 6))
    assert llm["asr"] == pytest.approx(2 / 6)
    assert llm["asr_ci_low"] == pytest.approx(1 - llm["ci_high"])
    overall = rate_table(_gens())
    assert overall.loc[0, "n"] == 10 and overall.loc[0, "refusal_rate"] == pytest.approx(0.5)


def test_rate_table_flags_and_missing() -> None:
    df = pd.DataFrame({"g": ["a"] * 4, "refused": ["1", "true", "", "0"]})
    t = rate_table(df, ["g"])
    assert t.loc[0, "n"] == 3 and t.loc[0, "refusal_rate"] == pytest.approx(2 / 3)
    with pytest.raises(VlsafeError, match="missing column.*'nope'.*available columns: g, refused"):
        rate_table(df, ["nope"])


def test_compliance_rate() -> None:
    c = compliance_rate(_gens(), ["checkpoint"]).set_index("checkpoint")
    assert c.loc["vl", "compliance_rate"] == pytest.approx(0.75)
    assert c.loc["vl", "over_refusal"] == pytest.approx(0.25)
    lo, hi = wilson_interval(1, 4)
    assert (c.loc["vl", "ci_low"], c.loc["vl", "ci_high"]) == pytest.approx((1 - hi, 1 - lo))


def test_summarize_columns_and_category_rows() -> None:
    s = summarize(_gens().assign(harmful=True), "vlsafe")
    assert list(s.columns)[: len(SUMMARY_COLUMNS)] == SUMMARY_COLUMNS and "asr" in s.columns
    overall = s[s["category"] == ""].set_index("checkpoint")
    assert overall.loc["llm", "n"] == 6 and overall.loc["vl", "refusal_rate"] == pytest.approx(0.25)
    drugs = s[(s["checkpoint"] == "llm") & (s["category"] == "drugs")].iloc[0]
    assert drugs["n"] == 3 and drugs["refusal_rate"] == pytest.approx(2 / 3)
    assert (s["judge"] == "vlsafe").all() and drugs["refusals"] == 2
    assert overall.loc["llm", "asr"] == pytest.approx(2 / 6)
    # overall row comes first within each (checkpoint, prompt_set)
    assert s.iloc[0]["category"] == "" and s.iloc[0]["checkpoint"] == "llm"


def test_summarize_judges_responses_when_unjudged() -> None:
    df = pd.DataFrame({"checkpoint": ["c"] * 4, "prompt_set": ["p"] * 4,
                       "response": ["I can't help with that.", "I'm sorry, but I cannot assist.",
                                    "Sure! Step 1: preheat the oven.", "Here is the code you asked for."]})
    s = summarize(df, "substring-rd")
    assert s.loc[0, "refusal_rate"] == pytest.approx(0.5) and s.loc[0, "judge"] == "substring-rd"
    assert "category" in s.columns and s.loc[0, "category"] == ""
    mixed = summarize(df.assign(label=[1, 1, 0, 0]), "substring-rd")
    assert mixed["asr"].isna().all()  # asr only for all-harmful groups
    with pytest.raises(VlsafeError, match="prompt_set"):
        summarize(df.drop(columns="prompt_set"), "vlsafe")
