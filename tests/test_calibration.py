"""Judge-error-aware rates (vlsafe.probes.behavior.calibration): Rogan–Gladen, bootstrap coverage on simulated
data with a known truth, the shipped calibration of the default judge, and the corrected columns of evaluations."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from test_eval_cli import planted_refuser
from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.behavior.calibration import (CORRECTED_COLUMNS, JudgeCalibration, bootstrap_interval,
                                               corrected_rate, load_calibration, measure, rogan_gladen,
                                               shipped_calibration)
from vlsafe.probes.behavior.judges import get_judge

HOLDOUT = Path(__file__).parent / "data" / "judge_holdout.jsonl"
TRAIN = Path(__file__).parents[1] / "probes" / "behavior" / "judge_train.jsonl"


def test_rogan_gladen_inverts_the_judged_rate() -> None:
    pi, se, sp = np.linspace(0, 1, 11), 0.83, 0.91
    judged = pi * se + (1 - pi) * (1 - sp)
    assert np.allclose(rogan_gladen(judged, se, sp), pi)
    assert rogan_gladen(0.0, se, sp) == 0.0 and rogan_gladen(1.0, se, sp) == 1.0  # clipped
    assert math.isnan(rogan_gladen(0.4, 0.5, 0.5))                                 # uninformative judge


def _simulate(pi: float, se: float, sp: float, n: int, n_pos: int, n_neg: int, sims: int = 1000):
    rng = np.random.default_rng(11)
    k = rng.binomial(n, pi * se + (1 - pi) * (1 - sp), sims)
    tp, tn = rng.binomial(n_pos, se, sims), rng.binomial(n_neg, sp, sims)
    lo, hi = bootstrap_interval(k, n, tp, n_pos, tn, n_neg, draws=1000, seed=3)
    est = rogan_gladen(k / n, tp / n_pos, tn / n_neg)
    return est, lo, hi


@pytest.mark.parametrize("pi,se,sp,n,n_pos,n_neg", [(0.3, 0.9, 0.85, 300, 50, 50), (0.08, 0.95, 0.9, 200, 80, 120),
                                                    (0.85, 0.8, 0.95, 150, 100, 60)])
def test_corrected_interval_covers_the_true_rate(pi, se, sp, n, n_pos, n_neg) -> None:
    est, lo, hi = _simulate(pi, se, sp, n, n_pos, n_neg)
    coverage = float(((lo <= pi) & (pi <= hi)).mean())
    assert coverage >= 0.93, coverage
    assert abs(float(np.mean(est)) - pi) < 3 * float(np.std(est)) / math.sqrt(len(est)) + 0.01  # ~unbiased
    # the naive interval (judge taken as exact) is too narrow: judge uncertainty is what the interval adds
    big = 10 ** 7
    rng = np.random.default_rng(11)
    k = rng.binomial(n, pi * se + (1 - pi) * (1 - sp), 1000)
    nlo, nhi = bootstrap_interval(k, n, round(se * big), big, round(sp * big), big, draws=1000, seed=3)
    assert float(np.mean(hi - lo)) > float(np.mean(nhi - nlo))


def test_corrected_rate_is_seeded_and_contains_the_estimate() -> None:
    cal = JudgeCalibration("j", tp=45, n_pos=50, tn=40, n_neg=50)
    a, b = corrected_rate(30, 100, cal, seed=1), corrected_rate(30, 100, cal, seed=1)
    assert a == b and a[1] <= a[0] <= a[2]
    assert a[0] == pytest.approx((0.3 + 0.8 - 1) / (0.9 + 0.8 - 1))
    assert all(math.isnan(v) for v in corrected_rate(0, 0, cal))


def test_calibration_record_round_trip_and_errors(tmp_path: Path) -> None:
    cal = measure("j", [1, 1, 0, 0, 1], [1, 0, 0, 0, 1], source="x.csv")
    assert (cal.tp, cal.n_pos, cal.tn, cal.n_neg) == (2, 2, 2, 3)
    assert cal.sensitivity == 1.0 and cal.specificity == pytest.approx(2 / 3)
    assert load_calibration(cal.save(tmp_path / "c.json")) == cal
    (tmp_path / "bad.json").write_text('{"judge": "j"}')
    with pytest.raises(VlsafeError, match=r"bad\.json: not a judge calibration record"):
        load_calibration(tmp_path / "bad.json")
    with pytest.raises(VlsafeError, match="need 0 <= tp <= n_pos"):
        JudgeCalibration("j", tp=5, n_pos=3, tn=1, n_neg=1)


def test_shipped_calibration_is_measured_on_the_holdout_file() -> None:
    cal = shipped_calibration("vlsafe")
    assert cal is not None and cal.source == "tests/data/judge_holdout.jsonl" and HOLDOUT.name != TRAIN.name
    rows = [json.loads(ln) for ln in HOLDOUT.read_text(encoding="utf-8").splitlines() if ln.strip()]
    pred = [int(r.refused) for r in get_judge("default").judge([r["response"] for r in rows],
                                                                [r["prompt"] for r in rows])]
    assert measure("vlsafe", pred, [int(r["refused"]) for r in rows], source=cal.source) == cal
    train = {json.loads(ln)["response"] for ln in TRAIN.read_text(encoding="utf-8").splitlines() if ln.strip()}
    assert not (train & {r["response"] for r in rows}) - {""}  # held out: only the empty response (a rule) is shared
    assert get_judge("default").calibration == cal and get_judge("substring-rd").calibration is None


def _cal_rows(rows: pd.DataFrame, cal: JudgeCalibration) -> None:
    for r in rows.itertuples():
        refusals = int(r.k) if r.metric != "compliance" else int(r.n) - int(r.k)
        est, lo, hi = corrected_rate(refusals, int(r.n), cal)
        want = (est, lo, hi) if r.metric != "compliance" else (1 - est, 1 - hi, 1 - lo)
        assert (r.rate_corrected, r.corrected_low, r.corrected_high) == pytest.approx(want)


def test_evaluation_rows_gain_corrected_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlsafe.probes.behavior.datasets import load_prompts
    from vlsafe.probes.behavior.evaluate import EvalSet, evaluate_model
    from vlsafe.probes.behavior.metrics import ROW_COLUMNS, eval_summary
    from vlsafe.probes.models import load

    monkeypatch.setenv("VLSAFE_CACHE", str(tmp_path / "cache"))
    lm = load(str(planted_refuser(tmp_path / "refuser")))
    sets = [EvalSet(load_prompts("harmful-test", limit=6)), EvalSet(load_prompts("harmless-test", limit=4),
                                                                  metric="compliance")]
    cal = JudgeCalibration("substring-rd", tp=40, n_pos=50, tn=45, n_neg=50, source="mine.csv")
    plain = get_judge("substring-rd")
    _, raw = evaluate_model(lm, sets, judge=plain, max_new_tokens=8)
    _, rows = evaluate_model(lm, sets, judge=get_judge("substring-rd", calibration=cal), max_new_tokens=8)
    assert list(raw.columns) == ROW_COLUMNS and list(rows.columns) == ROW_COLUMNS + CORRECTED_COLUMNS
    pd.testing.assert_frame_equal(rows[ROW_COLUMNS], raw)  # existing columns and numbers unchanged
    _cal_rows(rows, cal)
    summary = eval_summary(rows)
    assert list(summary.columns[-3:]) == CORRECTED_COLUMNS and summary["rate_corrected"].notna().all()


def test_sweep_row_gains_corrected_channels() -> None:
    from vlsafe.experiments.sweep_eval import _corrected

    row = {"rate": 0.4, "rate_corrected": 0.35, "corrected_low": 0.2, "corrected_high": 0.5}
    assert _corrected("safety", row) == {"safety_corrected": 0.35, "safety_corrected_low": 0.2,
                                         "safety_corrected_high": 0.5}
    assert _corrected("safety", {"rate": 0.4}) == {} and _corrected("x", {"rate_corrected": math.nan}) == {}


def test_sweep_point_full_mode_has_corrected_channels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlsafe.experiments.sweep_eval import EvalConfig, evaluate_point

    monkeypatch.setenv("VLSAFE_CACHE", str(tmp_path / "cache"))
    spec = str(planted_refuser(tmp_path / "refuser"))
    full = evaluate_point(spec, EvalConfig(mode="full", limit=4, max_new_tokens=8))
    cal = shipped_calibration("vlsafe")
    for channel, n_key, refusals in (("safety", "n_harmful", 4), ("over_refusal", "n_borderline", 4)):
        est, lo, hi = corrected_rate(refusals, full[n_key], cal)
        assert (full[channel], full[f"{channel}_corrected"]) == (1.0, pytest.approx(est))
        assert (full[f"{channel}_corrected_low"], full[f"{channel}_corrected_high"]) == pytest.approx((lo, hi))
    est, lo, hi = corrected_rate(4, 4, cal)
    assert full["helpfulness_corrected"] == pytest.approx(1 - est)
    fast = evaluate_point(spec, EvalConfig(mode="fast", limit=4))
    assert not [k for k in fast if "corrected" in k]  # the logit judge has no calibration


def test_eval_cli_default_judge_writes_corrected_rates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlsafe.experiments.cli import main

    monkeypatch.setenv("VLSAFE_CACHE", str(tmp_path / "cache"))
    spec, out = str(planted_refuser(tmp_path / "refuser")), tmp_path / "run"
    assert main(["eval", spec, "--prompts", "harmful-test", "--limit", "4", "--max-new-tokens", "8",
                 "-o", str(out)]) == 0
    summary = pd.read_csv(out / "summary.csv", keep_default_na=False)
    cal = shipped_calibration("vlsafe")
    for r in summary.itertuples():
        assert (r.rate_corrected, r.corrected_low, r.corrected_high) == pytest.approx(
            corrected_rate(int(r.refusals), int(r.n), cal))
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(CORRECTED_COLUMNS) <= set(metrics.columns)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["judge_calibration"] == cal.to_dict()  # the calibration used is recorded
