"""The report shows the judge's own error: the corrected safety interval on the remedies figures, in the key and
the tooltips, and one caption sentence naming the calibration (judge, Se, Sp with their n, source) it comes from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from vlsafe.analysis.errors import VlsafeError
from vlsafe.experiments.report import build_report
from vlsafe.experiments.report.judge_note import calibration_sentence
from vlsafe.experiments.report.plots_pareto import MARKERS, pareto, pareto_key, pareto_tips
from vlsafe.probes.behavior.calibration import JudgeCalibration, shipped_calibration
from test_report import CAL, _make_run

SENTENCE = re.compile(r"Corrected rates: (\S+) judge, sensitivity ([\d.]+) \(n = (\d+)\), specificity ([\d.]+) "
                      r"\(n = (\d+)\), measured on (\S+); Rogan–Gladen with a parametric-bootstrap interval\.")


def _pct(x: float) -> str:
    return f"{100 * x:.0f}"


def _drawn(fig: plt.Figure) -> dict[str, object]:
    """The corrected marks of a Pareto figure by SVG id, and its legend texts."""
    ax = fig.axes[0]
    arts = {a.get_gid(): a for a in [*ax.collections, *ax.lines] if str(a.get_gid()).startswith("judge-corrected")}
    return {**arts, "legend": [t.get_text() for t in ax.get_legend().get_texts()]}


def _tips(page: str) -> dict[str, str]:
    return json.loads(re.search(r'id="vlsafe-tips">(.*?)</script>', page).group(1))["points"]


def _strip(root: Path, *, sweep_record: bool = True, eval_record: bool = True, corrected: bool = True) -> None:
    """Rewrite the planted run without the corrected columns and/or without the recorded calibrations."""
    for run, table, rec_key in (("sweep", "pareto.csv", sweep_record), ("eval", "summary.csv", eval_record)):
        if not corrected:
            df = pd.read_csv(root / run / table)
            df.drop(columns=[c for c in df.columns if "corrected" in c]).to_csv(root / run / table, index=False)
        if not rec_key:
            rj = root / run / "run.json"
            rec = json.loads(rj.read_text())
            rec.pop("judge_calibration", None)
            rec["config"].pop("judge_calibration", None)
            rj.write_text(json.dumps(rec))


@pytest.mark.parametrize("safety", ["safety", "safety_image"])
def test_corrected_interval_is_drawn_beside_each_judged_point(tmp_path: Path, safety: str) -> None:
    _make_run(tmp_path)
    p = pd.read_csv(tmp_path / "sweep" / "pareto.csv")
    fig = pareto(p, safety=safety)
    drawn = _drawn(fig)
    judged = p[p[f"{safety}_corrected"].notna()]                  # screened e (and d without an image) have none
    bars, ticks = drawn["judge-corrected-bars"], drawn["judge-corrected"]
    spans = np.array([sorted(seg[:, 1]) for seg in bars.get_segments()])
    np.testing.assert_allclose(spans, judged[[f"{safety}_corrected_low", f"{safety}_corrected_high"]].to_numpy())
    assert list(ticks.get_ydata()) == pytest.approx(list(judged[f"{safety}_corrected"]))
    assert list(ticks.get_xdata()) == pytest.approx(list(judged["helpfulness"]))
    assert ticks.get_marker() not in MARKERS                      # a mark no family uses
    assert drawn["legend"][-1] == "corrected for judge error"
    lo, hi = fig.axes[0].get_ylim()                                # the whole interval is inside the axes
    assert lo <= judged[f"{safety}_corrected_low"].min() and judged[f"{safety}_corrected_high"].max() <= hi
    plt.close(fig)


def test_key_and_tooltips_give_the_corrected_rate_and_interval(tmp_path: Path) -> None:
    _make_run(tmp_path)
    p = pd.read_csv(tmp_path / "sweep" / "pareto.csv")
    key, tips = pareto_key(p), pareto_tips(p)
    for i, r in p.iterrows():
        for safety, label, prefix in (("safety", "safety", "pareto-pt"),
                                      ("safety_image", "safety (image)", "pareto-image-pt")):
            col = f"{label}, corrected for judge error"
            if pd.isna(r[f"{safety}_corrected"]):
                assert key.loc[i, col] == "" and col not in tips.get(f"{prefix}-{i + 1}", "")
                continue
            want = (f"{_pct(r[f'{safety}_corrected'])}% [{_pct(r[f'{safety}_corrected_low'])}, "
                    f"{_pct(r[f'{safety}_corrected_high'])}]")
            assert key.loc[i, col] == want
            assert f"{col}: {want}\n" in tips[f"{prefix}-{i + 1}"]
    page = build_report(tmp_path).read_text()
    assert _tips(page)["pareto-pt-1"] == tips["pareto-pt-1"] and "safety, corrected for judge error: 86% [75, 95]" \
        in _tips(page)["pareto-pt-1"]
    assert page.count('id="judge-corrected-bars"') == 2               # both fronts


def test_caption_sentence_numbers_are_the_recorded_calibrations(tmp_path: Path) -> None:
    _make_run(tmp_path)
    page = build_report(tmp_path).read_text()
    found = SENTENCE.findall(page)
    assert len(found) == 3                                            # the eval table and both fronts
    for judge, se, n_pos, sp, n_neg, source in found:
        assert (judge, int(n_pos), int(n_neg), source) == (CAL.judge, CAL.n_pos, CAL.n_neg, CAL.source)
        assert float(se) == pytest.approx(CAL.tp / CAL.n_pos, abs=0.005)
        assert float(sp) == pytest.approx(CAL.tn / CAL.n_neg, abs=0.005)
    caps = re.findall(r'<figure id="(tab-eval|fig-pareto|fig-pareto-image)">.*?<figcaption>(.*?)</figcaption>', page,
                      re.S)
    assert [a for a, c in caps if SENTENCE.search(c)] == ["tab-eval", "fig-pareto", "fig-pareto-image"]
    # the shipped default judge's calibration, as `vlsafe eval` records it
    shipped = shipped_calibration("vlsafe")
    rec = json.loads((tmp_path / "eval" / "run.json").read_text())
    rec["config"]["judge_calibration"] = shipped.to_dict()
    (tmp_path / "eval" / "run.json").write_text(json.dumps(rec))
    page = build_report(tmp_path).read_text()
    eval_caption = re.search(r'<figure id="tab-eval">.*?<figcaption>(.*?)</figcaption>', page, re.S).group(1)
    assert SENTENCE.findall(eval_caption) == [("vlsafe", f"{shipped.sensitivity:.2f}", str(shipped.n_pos),
                                               f"{shipped.specificity:.2f}", str(shipped.n_neg), shipped.source)]
    assert shipped.source == "tests/data/judge_holdout.jsonl" and shipped.n_pos == 134


def test_without_corrected_columns_nothing_extra(tmp_path: Path) -> None:
    _make_run(tmp_path)
    _strip(tmp_path, corrected=False)                                 # calibrations still recorded
    p = pd.read_csv(tmp_path / "sweep" / "pareto.csv")
    for safety in ("safety", "safety_image"):
        fig = pareto(p, safety=safety)
        drawn = _drawn(fig)
        assert set(drawn) == {"legend"} and "corrected for judge error" not in drawn["legend"]
        assert len(fig.axes[0].collections) == (5 if safety == "safety" else 4)  # the points only
        plt.close(fig)
    assert not [c for c in pareto_key(p).columns if "corrected" in c]
    page = build_report(tmp_path).read_text()
    assert "Corrected rates:" not in page and "judge-corrected" not in page and "Grey dashed bar" not in page
    assert not any("corrected" in t for t in _tips(page).values())


def test_corrected_columns_without_a_recorded_calibration_invent_no_numbers(tmp_path: Path) -> None:
    _make_run(tmp_path)
    _strip(tmp_path, sweep_record=False, eval_record=False)
    page = build_report(tmp_path).read_text()
    assert "Corrected rates:" not in page and not re.search(r"sensitivity [\d.]", page)
    assert page.count('id="judge-corrected-bars"') == 2               # the numbers the table has are still drawn
    _make_run(tmp_path)                                               # only the sweep recorded one
    _strip(tmp_path, eval_record=False)
    assert len(SENTENCE.findall(build_report(tmp_path).read_text())) == 2


def test_sentence_without_source_and_a_malformed_record(tmp_path: Path) -> None:
    cal = JudgeCalibration(judge="substring-rd", tp=40, n_pos=50, tn=45, n_neg=50)
    assert calibration_sentence(cal) == ("Corrected rates: substring-rd judge, sensitivity 0.80 (n = 50), specificity "
                                         "0.90 (n = 50); Rogan–Gladen with a parametric-bootstrap interval.")
    _make_run(tmp_path)
    rj = tmp_path / "sweep" / "run.json"
    rj.write_text(json.dumps({**json.loads(rj.read_text()), "judge_calibration": {"judge": "vlsafe", "tp": 3}}))
    with pytest.raises(VlsafeError, match=r"sweep/run\.json: judge_calibration: not a judge calibration record") as e:
        build_report(tmp_path)
    assert "\n" not in str(e.value)


def _with_wilson(p: pd.DataFrame) -> pd.DataFrame:
    """The planted table with raw interval columns (distinct widths per row, so a swapped column shows)."""
    w = np.linspace(0.05, 0.09, len(p))
    return p.assign(safety_ci_low=p["safety"] - w, safety_ci_high=p["safety"] + w / 2,
                    helpfulness_ci_low=p["helpfulness"] - w / 3, helpfulness_ci_high=p["helpfulness"] + w,
                    safety_image_ci_low=p["safety_image"] - w, safety_image_ci_high=p["safety_image"] + w / 2)


@pytest.mark.parametrize("safety", ["safety", "safety_image"])
def test_raw_wilson_intervals_are_drawn_through_each_judged_point(tmp_path: Path, safety: str) -> None:
    _make_run(tmp_path)
    p = _with_wilson(pd.read_csv(tmp_path / "sweep" / "pareto.csv"))
    fig = pareto(p, safety=safety)
    ax = fig.axes[0]
    arts = {a.get_gid(): a for a in ax.collections if str(a.get_gid()).startswith("wilson-")}
    judged = p[(p["stage"] == "full") & p[safety].notna()]        # screened e (and d without an image) have none
    vert = np.array([[seg[0, 0], *sorted(seg[:, 1])] for seg in arts["wilson-safety"].get_segments()])
    np.testing.assert_allclose(vert, judged[["helpfulness", f"{safety}_ci_low", f"{safety}_ci_high"]].to_numpy())
    horiz = np.array([[seg[0, 1], *sorted(seg[:, 0])] for seg in arts["wilson-helpfulness"].get_segments()])
    np.testing.assert_allclose(horiz, judged[[safety, "helpfulness_ci_low", "helpfulness_ci_high"]].to_numpy())
    assert "95 % Wilson interval (judged points)" in [t.get_text() for t in ax.get_legend().get_texts()]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()             # every interval inside the axes
    assert y0 <= judged[f"{safety}_ci_low"].min() and judged[f"{safety}_ci_high"].max() <= y1
    assert x0 <= judged["helpfulness_ci_low"].min() and judged["helpfulness_ci_high"].max() <= x1
    plt.close(fig)
    plain = pareto(p.drop(columns=[c for c in p.columns if "_ci_" in c]), safety=safety)   # no columns: no bars
    assert not any(str(a.get_gid()).startswith("wilson-") for a in plain.axes[0].collections)
    plt.close(plain)
