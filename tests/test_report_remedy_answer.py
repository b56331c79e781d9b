"""The remedies question answered from a planted pareto.csv: which targeted or weight-free points reach the whole-LM
merge on all four numbers, which are not told apart from it, and which points compete at all."""

from __future__ import annotations

import pandas as pd

from vlsafe.experiments.report.findings_remedy import MAX_LAYERS, candidates, remedy_answer, whole_merge

COLS = ("safety", "safety_image", "over_refusal", "helpfulness")


def _point(name: str, family: str, layers: str, values: tuple[float, float, float, float], *, half: float = 0.05,
           stage: str = "full") -> dict:
    row = {"point": name, "family": family, "layers": layers, "stage": stage}
    for c, v in zip(COLS, values):
        row.update({c: v, f"{c}_ci_low": v - half, f"{c}_ci_high": v + half})
    return row


def _table() -> pd.DataFrame:
    many = " ".join(map(str, range(MAX_LAYERS + 1)))
    return pd.DataFrame([
        _point("lvlm", "reference", "all", (0.55, 0.25, 0.10, 0.95)),
        _point("merge-0.5", "merge", "all", (0.80, 0.70, 0.08, 0.90)),
        _point("merge-1", "merge", "all", (0.88, 0.85, 0.08, 0.80)),          # the whole-LM merge: safest
        _point("gated", "gated", "20", (0.90, 0.95, 0.08, 0.85)),             # reaches it on all four
        _point("steer", "activation", "20", (0.95, 1.00, 0.38, 0.42)),        # worse apart: over-refusal, compliance
        _point("lora-3", "tuning", "3 4 5", (0.85, 0.82, 0.10, 0.82)),        # below on two, nothing apart
        _point("merge-many", "merge", many, (0.95, 0.95, 0.05, 0.95)),        # too many layers: not a candidate
        _point("steer-screened", "activation", "15", (0.99, 0.99, 0.0, 1.0), stage="screen"),  # not judged
    ])


def test_candidates_and_the_reference_merge():
    p = _table()
    full = p[p.stage == "full"]
    assert whole_merge(full)["point"] == "merge-1"
    assert list(candidates(full)["point"]) == ["gated", "steer", "lora-3"]


def test_answer_names_who_reaches_and_who_is_not_told_apart():
    (f,) = remedy_answer(_table())
    assert f.key == "remedy_vs_merge"
    assert f.values == {"n_candidates": 3, "n_reach": 1, "n_close": 1}
    assert f.text.startswith("Against the whole-LM merge merge-1 (text refusal 88% [83, 93], refusal with an image "
                             "85% [80, 90], over-refusal 8% [3, 13], compliance 80% [75, 85]; one run), of 3 judged")
    assert "1 reach it on all 4 by point estimate: gated (text refusal 90%" in f.text
    assert f.text.endswith("; 1 more are worse on none with disjoint intervals (lora-3).")


def test_none_reaches():
    p = _table()
    p = p[p.point != "gated"]
    (f,) = remedy_answer(p)
    assert "none reaches it on all 4 by point estimate; 1 more are worse on none" in f.text
    p = p[p.point != "lora-3"]
    (f,) = remedy_answer(p)
    assert f.text.endswith("none reaches it on all 4 by point estimate; every other one is worse on at least one "
                           "with disjoint intervals.")


def test_text_only_tables_and_missing_pieces():
    p = _table().drop(columns=["safety_image", "safety_image_ci_low", "safety_image_ci_high"])
    (f,) = remedy_answer(p)
    assert "on all 3 by point estimate" in f.text and "with an image" not in f.text
    assert remedy_answer(_table()[lambda d: d.family != "merge"]) == []   # no whole-LM merge judged
    assert remedy_answer(_table().drop(columns=["family"])) == []         # not a remedies table
