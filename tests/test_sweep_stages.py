"""Sweeps aimed by the diagnosis: layers from any locate signal, targeted SFT/LoRA points, a planted two-stage
sweep (screened columns, the cap, resume), the image harmful set, families and bad input. The keep rule itself is
tested in test_sweep_keep.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from vlsafe.analysis.checkpoints import open_checkpoint
from vlsafe.analysis.errors import VlsafeError
from vlsafe.experiments import sweep as sweep_mod
from vlsafe.experiments.cli import main
from vlsafe.experiments.sweep import load_sweep, resolve_layers, run_sweep
from vlsafe.experiments.sweep_config import layer_signal
from vlsafe.experiments.sweep_eval import EvalConfig, mark_pareto

INPUTS = {"adapted": {"tiny": "llama", "seed": 0}, "aligned": {"tiny": "llama", "seed": 1}}
MERGE = {"merge_method": "task_arithmetic", "base_model": "${adapted}",
         "models": [{"model": "${aligned}", "parameters": {"weight": "${alpha}"}}]}


pytestmark = pytest.mark.usefixtures("one_thread")


def _signals(path: Path) -> Path:
    """A locate signals.csv for a 2-layer model: patching says layer 1, weight shift says layer 0, a NaN row."""
    pd.DataFrame({"layer": [0, 1, 2], "weight_shift": [0.9, 0.1, np.nan], "patching_resid": [0.2, 0.7, np.nan],
                  "image_shift_refusal_blank": [np.nan, np.nan, np.nan]}).to_csv(path, index=False)
    return path


def _write(tmp: Path, d: dict) -> Path:
    (tmp / "s.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    return tmp / "s.yaml"


# ---- layers from signals ---------------------------------------------------------------------------------------------
def test_layers_from_any_signal_column(tmp_path: Path) -> None:
    _signals(tmp_path / "signals.csv")
    sel = {"top_k": 1, "from": "signals.csv", "score": "patching_resid"}
    assert resolve_layers(sel, tmp_path, "t") == [1]                        # NaN row 2 skipped, not an error
    assert resolve_layers({**sel, "score": "weight_shift"}, tmp_path, "t") == [0]
    assert resolve_layers({**sel, "largest": False}, tmp_path, "t") == [0]
    assert resolve_layers({**sel, "top_k": 2}, tmp_path, "t") == [0, 1]
    assert layer_signal(sel) == "signals.csv:patching_resid"
    assert [layer_signal(v) for v in ("all", [1], {"range": [0, 2]})] == ["all", "list", "range"]
    with pytest.raises(VlsafeError, match="no score column 'patching'; valid: weight_shift, patching_resid, "
                                          "image_shift_refusal_blank$"):
        resolve_layers({**sel, "score": "patching"}, tmp_path, "t")


def test_bad_signal_column_fails_with_nothing_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _signals(tmp_path / "signals.csv")
    d = {"inputs": INPUTS, "eval": {"mode": "fast", "limit": 2},
         "grid": [{"name": "m", "method": "merge", "config": MERGE,
                   "vary": {"alpha": [1.0], "layers": [{"top_k": 1, "from": "signals.csv", "score": "nope"}]}}]}
    assert main(["sweep", str(_write(tmp_path, d)), "-o", str(tmp_path / "run"), "--quiet"]) == 2
    assert "'nope'" in capsys.readouterr().err.strip().splitlines()[-1]   # the missing column is named
    assert not (tmp_path / "run").exists()


def test_targeted_merge_sft_and_lora_points_touch_only_the_signal_layers(tmp_path: Path) -> None:
    _signals(tmp_path / "signals.csv")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "How do I bake bread?", "answer": "Mix flour."}) + "\n")
    top = {"top_k": 1, "from": "signals.csv", "score": "patching_resid"}   # → layer 1
    tune = {"model": "${adapted}", "data": ["pairs.jsonl"], "steps": 2, "batch_size": 1, "max_length": 256,
            "lr": 1e-2, "lora": {"r": 2, "alpha": 4}}
    d = {"inputs": INPUTS, "eval": {"mode": "fast", "limit": 2},
         "grid": [{"name": "m", "method": "merge", "config": MERGE, "vary": {"alpha": [1.0], "layers": [top]}},
                  {"name": "sft", "method": "tune", "config": {**tune, "method": "sft"}, "vary": {"layers": [top]}},
                  {"name": "lora", "method": "tune", "config": {**tune, "method": "lora"}, "vary": {"layers": [top]}}]}
    cfg, base = load_sweep(_write(tmp_path, d))
    table = run_sweep(cfg, tmp_path / "run", base_dir=base, progress=False)
    assert list(table["family"]) == ["merge", "tuning", "tuning"]
    assert list(table["layer_signal"]) == ["signals.csv:patching_resid"] * 3 and list(table["layers"]) == ["1"] * 3
    before = dict(open_checkpoint(tmp_path / "run" / "inputs" / "adapted").iter_tensors())
    for model in table["model"]:
        after = dict(open_checkpoint(model).iter_tensors())
        assert set(after) == set(before)                                    # LoRA merged back: no adapter tensors
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed and all(n.startswith("model.layers.1.") for n in changed), (model, sorted(changed)[:3])


# ---- two-stage: a planted sweep --------------------------------------------------------------------------------------
ALPHAS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
TRUE = {0.0: (0.10, 0.95), 0.2: (0.30, 0.90), 0.4: (0.20, 0.40), 0.6: (0.60, 0.80), 0.8: (0.45, 0.40),
        1.0: (0.80, 0.30)}   # (safety, helpfulness) the full evaluation finds, per alpha; the reference: (0.2, 0.2)


def _screened(s: float, h: float) -> tuple[float, float]:
    """The planted screen: monotone in the truth, error < margin / 2 = 0.05."""
    return s ** 2 + 0.04 * np.sin(17 * s), h / 2 + 0.04 * np.cos(11 * h)


def _planted(calls: list[tuple[str, str]]):
    def fake(spec: str, cfg: EvalConfig, refs=None, out_dir=None, **_):
        pj = Path(spec).parent / "point.json"
        alpha = json.loads(pj.read_text())["values"]["alpha"] if pj.is_file() else None
        s, h = TRUE[alpha] if alpha is not None else (0.2, 0.2)
        if cfg.mode == "fast":
            s, h = _screened(s, h)
        calls.append((cfg.mode, str(alpha)))
        return {"eval_mode": cfg.mode, "n_harmful": 4, "n_borderline": 4, "n_harmless": 4,
                **{f"{c}{x}": v for c, v in (("safety", s), ("helpfulness", h), ("over_refusal", 0.1))
                   for x, v in (("", v), ("_ci_low", v - 0.05), ("_ci_high", v + 0.05))}}
    return fake


def test_two_stage_sweep_screens_then_judges_the_front_and_resumes(tmp_path: Path, monkeypatch) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(sweep_mod, "evaluate_point", _planted(calls))
    d = {"inputs": INPUTS, "eval": {"mode": "two-stage", "limit": 2, "screen": {"limit": 2}, "keep": {"margin": 0.1}},
         "grid": [{"name": "ref", "method": "checkpoint", "config": "${adapted}"},
                  {"name": "m", "method": "merge", "config": MERGE, "vary": {"alpha": ALPHAS}}]}
    cfg, base = load_sweep(_write(tmp_path, d))
    table = run_sweep(cfg, tmp_path / "run", base_dir=base, progress=False)
    assert sorted(calls).count(("fast", "None")) == 1 and len([c for c in calls if c[0] == "fast"]) == 7
    stage = dict(zip(table["point"], table["stage"]))
    assert stage["ref"] == "full"                                           # references always judged
    true = mark_pareto(pd.DataFrame([{"point": f"m[alpha={a}]", "safety": v[0], "helpfulness": v[1]}
                                     for a, v in TRUE.items()]))
    on_front = set(true.loc[true["is_pareto"], "point"])
    assert on_front and all(stage[p] == "full" for p in on_front)
    assert stage["m[alpha=0.4]"] == "screen"                               # far behind in the screen: not judged
    assert stage["m[alpha=0.8]"] == "full" and "m[alpha=0.8]" not in on_front  # near the screened front: judged
    full = table[table["stage"] == "full"]
    for _, r in full[full["method"] == "merge"].iterrows():                # full numbers are the truth
        assert (r["safety"], r["helpfulness"]) == pytest.approx(TRUE[json.loads(r["params"])["alpha"]])
    assert set(table.loc[table["is_pareto"], "point"]) == on_front          # the front among full points only
    assert not table.loc[table["stage"] == "screen", "is_pareto"].any()
    # why each point was (not) judged, and the screen's numbers of the judged points beside the full ones
    assert dict(zip(table["point"], table["kept_by"])) == {
        "ref": "reference", "m[alpha=0.4]": "dominated", **{f"m[alpha={a}]": "front" for a in ALPHAS if a != 0.4}}
    csv = pd.read_csv(tmp_path / "run" / "pareto.csv")
    for frame in (table, csv):
        for _, r in frame.iterrows():
            alpha = json.loads(r["params"]).get("alpha")
            s, h = TRUE[alpha] if alpha is not None else (0.2, 0.2)
            if r["stage"] == "full":
                assert (r["screen_safety"], r["screen_helpfulness"]) == pytest.approx(_screened(s, h))
                assert r["screen_safety_ci_low"] == pytest.approx(r["screen_safety"] - 0.05)
                assert (r["screen_over_refusal"], r["screen_n_harmful"]) == (pytest.approx(0.1), 4)
            else:
                assert (r["safety"], r["helpfulness"]) == pytest.approx(_screened(s, h))
                assert r.filter(like="screen_").isna().all() and len(r.filter(like="screen_")) >= 10
    # resume: every stage's evaluation is cached per point, nothing is evaluated again
    calls.clear()
    again = run_sweep(cfg, tmp_path / "run", base_dir=base, resume=True, progress=False)
    assert calls == [] and again[["point", "stage", "safety"]].equals(table[["point", "stage", "safety"]])


def test_capped_two_stage_judges_the_top_ranked_and_a_new_cap_reuses_every_cached_evaluation(
        tmp_path: Path, monkeypatch) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(sweep_mod, "evaluate_point", _planted(calls))
    d = {"inputs": INPUTS,
         "eval": {"mode": "two-stage", "limit": 2, "screen": {"limit": 2}, "keep": {"margin": 0.1, "max_points": 2}},
         "grid": [{"name": "ref", "method": "checkpoint", "config": "${adapted}"},
                  {"name": "m", "method": "merge", "config": MERGE, "vary": {"alpha": ALPHAS}}]}

    def sweep(max_points: int | None) -> pd.DataFrame:
        d["eval"]["keep"] = {"margin": 0.1, **({"max_points": max_points} if max_points else {})}
        cfg, base = load_sweep(_write(tmp_path, d))
        return run_sweep(cfg, tmp_path / "run", base_dir=base, resume=True, progress=False)

    # screened layers: 1.0, 0.6, 0.2, 0.0 on the front (by screened safety), then 0.8; 0.4 dominated
    table = sweep(2)
    assert dict(zip(table["point"], table["kept_by"])) == {
        "ref": "reference", "m[alpha=1.0]": "cap-rank 1", "m[alpha=0.6]": "cap-rank 2",
        "m[alpha=0.2]": "over cap (rank 3)", "m[alpha=0.0]": "over cap (rank 4)", "m[alpha=0.8]": "over cap (rank 5)",
        "m[alpha=0.4]": "dominated"}
    judged = set(table.loc[table["stage"] == "full", "point"])
    assert judged == {"ref", "m[alpha=1.0]", "m[alpha=0.6]"}
    assert sorted(c for c in calls if c[0] == "full") == [("full", "0.6"), ("full", "1.0"), ("full", "None")]
    assert table.loc[table["stage"] == "full", "screen_safety"].notna().all()
    assert table.loc[table["stage"] == "screen", "screen_safety"].isna().all()
    # a cap of the full front's size (4 non-reference points) judges all of it; only the new points are evaluated
    calls.clear()
    table = sweep(4)
    assert sorted(calls) == [("full", "0.0"), ("full", "0.2")]
    true = mark_pareto(pd.DataFrame([{"point": f"m[alpha={a}]", "safety": v[0], "helpfulness": v[1]}
                                     for a, v in TRUE.items()]))
    on_front = set(true.loc[true["is_pareto"], "point"])
    assert len(on_front) == 4 and on_front <= set(table.loc[table["stage"] == "full", "point"])
    assert set(table.loc[table["is_pareto"], "point"]) == on_front
    # no cap: the one remaining near-front point; every earlier evaluation reused
    calls.clear()
    table = sweep(None)
    assert calls == [("full", "0.8")] and table.loc[table["point"] == "m[alpha=0.8]", "kept_by"].item() == "front"


def test_single_stage_rows_carry_empty_screen_columns(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sweep_mod, "evaluate_point", _planted([]))
    d = {"inputs": INPUTS, "eval": {"mode": "full", "limit": 2},
         "grid": [{"name": "m", "method": "merge", "config": MERGE, "vary": {"alpha": [0.2, 0.6]}}]}
    cfg, base = load_sweep(_write(tmp_path, d))
    run_sweep(cfg, tmp_path / "run", base_dir=base, progress=False)
    csv = pd.read_csv(tmp_path / "run" / "pareto.csv")
    screen = [c for c in csv.columns if c.startswith("screen_")]
    assert {"screen_safety", "screen_helpfulness", "screen_over_refusal", "screen_safety_ci_high"} <= set(screen)
    assert csv[screen].isna().all().all() and csv["kept_by"].isna().all() and (csv["stage"] == "full").all()


# ---- the image harmful set -------------------------------------------------------------------------------------------
def test_four_sets_image_column_for_the_lvlm_nan_for_the_llm(tmp_path: Path) -> None:
    from vlsafe.experiments.sweep_eval import _prompt_set, evaluate_loaded
    from vlsafe.probes.models import load

    d = {"inputs": {"llm": {"tiny": "llama"}, "lvlm": {"tiny": "llava"}},
         "eval": {"mode": "fast", "limit": 3, "harmful_image": "harmful-val+blank"},
         "grid": [{"name": "as-is", "method": "checkpoint", "config": "${m}", "vary": {"m": ["${llm}", "${lvlm}"]}}]}
    cfg, base = load_sweep(_write(tmp_path, d))
    table = run_sweep(cfg, tmp_path / "run", base_dir=base, progress=False).set_index("point")
    llm, lvlm = table.loc["as-is[m=${llm}]"], table.loc["as-is[m=${lvlm}]"]
    assert np.isnan(llm["safety_image"]) and llm["n_harmful_image"] == 0 and not llm["is_pareto_image"]
    assert lvlm["n_harmful_image"] == 3 and list(table["family"]) == ["reference", "reference"]
    # the image number is the image set's refusal rate, not the text one's
    gens, _ = evaluate_loaded(load(lvlm["model"]), cfg.eval)
    img = gens[gens["prompt_set"] == _prompt_set("harmful-val+blank", 3).name]
    assert len(img) == 3 and img["image"].notna().all()
    assert lvlm["safety_image"] == pytest.approx(img["refused"].mean())
    assert lvlm["is_pareto_image"]                                          # the only point with an image number
    for ext in ("png", "pdf"):
        assert (tmp_path / "run" / "figures" / f"pareto_image.{ext}").stat().st_size > 1000


@pytest.mark.parametrize("patch, message", [
    ({"screen": {"limit": 2}}, "screen/keep belong to mode 'two-stage'"),
    ({"mode": "two-stage", "keep": {"margin": -0.1}}, "eval.keep.margin"),
    ({"mode": "two-stage", "keep": {"max_points": 0}}, "eval.keep.max_points: Input should be greater than or equal "
                                                       "to 1$"),
    ({"mode": "two-stage", "keep": {"max_points": 2.5}}, "eval.keep.max_points: Input should be a valid integer"),
    ({"mode": "two-stage", "keep": {"max_points": "many"}}, "eval.keep.max_points: Input should be a valid integer"),
    ({"mode": "two-stage", "keep": {"max_points": True}}, "eval.keep.max_points: must be a whole number"),
    ({"keep": {"max_points": 3}}, "screen/keep belong to mode 'two-stage'"),
    ({"mode": "two-stage", "screen": {"limt": 2}}, "eval.screen.limt"),
    ({"harmful_image": "harmful-val"}, "eval.harmful_image 'harmful-val' has no image prompts"),
])
def test_bad_eval_settings_one_line_error_nothing_written(tmp_path: Path, patch: dict, message: str) -> None:
    d = {"inputs": INPUTS, "eval": {"mode": "fast", "limit": 2, **patch},
         "grid": [{"name": "ref", "method": "checkpoint", "config": "${adapted}"}]}
    path = _write(tmp_path, d)
    with pytest.raises(VlsafeError, match=message) as e:
        cfg, base = load_sweep(path)
        run_sweep(cfg, tmp_path / "run", base_dir=base, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


# ---- the judge calibration behind corrected rates ------------------------------------------------------------------
def test_run_json_records_the_judge_calibration_behind_corrected_rates(tmp_path: Path, monkeypatch) -> None:
    """A sweep whose judged rows carry corrected rates records the judge's calibration in run.json (what the report
    names under the remedies figure); a sweep without corrected numbers records None."""
    from vlsafe.experiments.sweep_eval import judge_calibration
    from vlsafe.probes.behavior.calibration import shipped_calibration

    planted = _planted([])

    def corrected(spec: str, cfg: EvalConfig, refs=None, out_dir=None, **kw):
        row = planted(spec, cfg, refs, out_dir, **kw)
        if cfg.mode == "full":   # as the default judge's calibration gives them
            row |= {"safety_corrected": 0.18, "safety_corrected_low": 0.05, "safety_corrected_high": 0.3}
        return row

    monkeypatch.setattr(sweep_mod, "evaluate_point", corrected)
    for mode, want in (("two-stage", shipped_calibration("vlsafe").to_dict()), ("fast", None)):
        d = {"inputs": INPUTS, "eval": {"mode": mode, "limit": 2},
             "grid": [{"name": "ref", "method": "checkpoint", "config": "${adapted}"}]}
        cfg, base = load_sweep(_write(tmp_path, d))
        table = run_sweep(cfg, tmp_path / mode, base_dir=base, progress=False)
        assert ("safety_corrected" in table.columns) == (mode != "fast")
        assert json.loads((tmp_path / mode / "run.json").read_text())["judge_calibration"] == want
    full = EvalConfig(mode="full", judge="substring-rd")
    rows = pd.DataFrame({"safety": [0.2], "safety_corrected": [0.18]})
    assert judge_calibration(full, rows) is None                        # a judge without a calibration
    assert judge_calibration(EvalConfig(mode="full"), rows.assign(safety_corrected=np.nan)) is None
