"""Sweeps aimed by the diagnosis: layers from any locate signal, targeted SFT/LoRA points, the two-stage
evaluation (planted keep-rule guarantee, resume), the image harmful set, families and bad input."""

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
from vlsafe.experiments.sweep_stages import keep_near_front, screen_keep

INPUTS = {"adapted": {"tiny": "llama", "seed": 0}, "aligned": {"tiny": "llama", "seed": 1}}
MERGE = {"merge_method": "task_arithmetic", "base_model": "${adapted}",
         "models": [{"model": "${aligned}", "parameters": {"weight": "${alpha}"}}]}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def test_bad_signal_column_fails_with_nothing_written(tmp_path: Path) -> None:
    _signals(tmp_path / "signals.csv")
    d = {"inputs": INPUTS, "eval": {"mode": "fast", "limit": 2},
         "grid": [{"name": "m", "method": "merge", "config": MERGE,
                   "vary": {"alpha": [1.0], "layers": [{"top_k": 1, "from": "signals.csv", "score": "nope"}]}}]}
    assert main(["sweep", str(_write(tmp_path, d)), "-o", str(tmp_path / "run"), "--quiet"]) == 2
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


# ---- two-stage: the keep rule ----------------------------------------------------------------------------------
def _true_front(s: np.ndarray, h: np.ndarray) -> set[int]:
    df = mark_pareto(pd.DataFrame({"safety": s, "helpfulness": h}))
    return set(np.flatnonzero(df["is_pareto"]))


def test_keep_rule_never_drops_a_true_front_point_under_monotone_noisy_screens() -> None:
    rng = np.random.default_rng(0)
    margin, dropped_by_exact_front = 0.1, 0
    for _ in range(50):
        s, h = rng.uniform(0, 1, 30), rng.uniform(0, 1, 30)
        front = _true_front(s, h)
        # screened numbers: a monotone map of the truth plus an error of at most margin / 2
        ss = s ** 3 + rng.uniform(-margin / 2, margin / 2, s.size)
        sh = np.sqrt(h) + rng.uniform(-margin / 2, margin / 2, h.size)
        screened = pd.DataFrame({"safety": ss, "helpfulness": sh, "method": "merge"})
        keep = screen_keep(screened, margin=margin)
        assert front <= set(np.flatnonzero(keep))
        # and it does screen: a point the truth beats by far in both (after the map) is dropped
        far = [i for i in range(s.size) if any(s[j] ** 3 > s[i] ** 3 + 2 * margin and
                                               np.sqrt(h[j]) > np.sqrt(h[i]) + 2 * margin for j in range(s.size))]
        assert far and not keep[far].any()
        dropped_by_exact_front += len(front - set(np.flatnonzero(keep_near_front(screened, margin=0.0))))
    assert dropped_by_exact_front > 0   # the noise is real: margin 0 would have dropped true-front points


def test_keep_rule_with_exact_monotone_screen_keeps_exactly_the_undominated() -> None:
    rng = np.random.default_rng(1)
    s, h = rng.uniform(0, 1, 40), rng.uniform(0, 1, 40)
    keep = keep_near_front(pd.DataFrame({"safety": np.log1p(s), "helpfulness": h ** 2}), margin=0.0)
    strictly_beaten = {i for i in range(40) if ((s > s[i]) & (h > h[i])).any()}
    assert set(np.flatnonzero(~keep)) == strictly_beaten and _true_front(s, h) <= set(np.flatnonzero(keep))


def test_screen_keeps_references_and_image_front_points() -> None:
    df = pd.DataFrame({"method": ["checkpoint", "merge", "merge", "merge"], "safety": [0.0, 0.9, 0.1, 0.5],
                       "helpfulness": [0.0, 0.9, 0.1, 0.5], "safety_image": [np.nan, 0.1, 0.95, np.nan]})
    assert screen_keep(df, margin=0.05).tolist() == [True, True, True, False]
    assert screen_keep(df.drop(columns="safety_image"), margin=0.05).tolist() == [True, True, False, False]


# ---- two-stage: a planted sweep --------------------------------------------------------------------------------------
ALPHAS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
TRUE = {0.0: (0.10, 0.95), 0.2: (0.30, 0.90), 0.4: (0.20, 0.40), 0.6: (0.60, 0.80), 0.8: (0.45, 0.40),
        1.0: (0.80, 0.30)}   # (safety, helpfulness) the full evaluation finds, per alpha; the reference: (0.2, 0.2)


def _planted(calls: list[tuple[str, str]]):
    def fake(spec: str, cfg: EvalConfig, refs=None, out_dir=None, **_):
        pj = Path(spec).parent / "point.json"
        alpha = json.loads(pj.read_text())["values"]["alpha"] if pj.is_file() else None
        s, h = TRUE[alpha] if alpha is not None else (0.2, 0.2)
        if cfg.mode == "fast":                      # monotone in the truth, error < margin / 2 = 0.05
            s, h = s ** 2 + 0.04 * np.sin(17 * s), h / 2 + 0.04 * np.cos(11 * h)
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
    # resume: every stage's evaluation is cached per point, nothing is evaluated again
    calls.clear()
    again = run_sweep(cfg, tmp_path / "run", base_dir=base, resume=True, progress=False)
    assert calls == [] and again[["point", "stage", "safety"]].equals(table[["point", "stage", "safety"]])


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
