"""`vlsafe sweep`: a small grid on tiny models → pareto.csv + figure; resume after a crash; bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from vlsafe.analysis.checkpoints import open_checkpoint
from vlsafe.analysis.errors import VlsafeError
from vlsafe.experiments.cli import main
from vlsafe.experiments.sweep import load_sweep, run_sweep
from vlsafe.experiments.sweep_eval import mark_pareto

TINY = Path(__file__).resolve().parent.parent / "experiments" / "configs" / "sweep-tiny.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp: Path, limit: int = 4, **patch) -> Path:
    d = yaml.safe_load(TINY.read_text())
    d["eval"]["limit"] = limit
    d.update(patch)
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    return tmp / "sweep.yaml"


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    assert main(["sweep", str(_config(tmp)), "-o", str(tmp / "run"), "--quiet"]) == 0
    return tmp / "run"


def test_tiny_sweep_writes_pareto_table_and_figure(swept: Path) -> None:
    df = pd.read_csv(swept / "pareto.csv")
    assert list(df["point"]) == ["adapted", "restore[alpha=0.5,layers=all]", "restore[alpha=0.5,layers=L1]"]
    for col in ("point", "method", "params", "layers", "safety", "safety_ci_low", "safety_ci_high", "over_refusal",
                "over_refusal_ci_low", "over_refusal_ci_high", "helpfulness", "helpfulness_ci_low",
                "helpfulness_ci_high", "is_pareto", "n_harmful", "hash"):
        assert col in df.columns, col
    assert (df["n_harmful"] == 4).all() and list(df["layers"].astype(str)) == ["all", "all", "1"]
    assert list(df["layer_signal"]) == ["all", "all", "list"] and list(df["family"]) == ["reference", "merge", "merge"]
    assert (df["stage"] == "screen").all() and df["is_pareto"].any() and "safety_image" not in df.columns
    assert ((df["safety_ci_low"] <= df["safety"]) & (df["safety"] <= df["safety_ci_high"])).all()
    for ext in ("png", "pdf"):
        assert (swept / "figures" / f"pareto.{ext}").stat().st_size > 1000
    key = pd.read_csv(swept / "figures" / "pareto_key.csv")  # the figure's point numbers are pareto.csv's rows
    assert list(key["#"]) == [1, 2, 3] and list(key["point"]) == list(df["point"])
    rec = json.loads((swept / "run.json").read_text())
    assert (rec["command"], rec["kind"], rec["tables"]) == ("sweep", "sweep", {"pareto": "pareto.csv"})
    # the merge points really are θ_adapted + α(θ_aligned − θ_adapted), on all or only layer 1
    a, b = (dict(open_checkpoint(swept / "inputs" / n).iter_tensors()) for n in ("adapted", "aligned"))
    for _, row in df[df["method"] == "merge"].iterrows():
        got = dict(open_checkpoint(row["model"]).iter_tensors())
        for name in a:
            want = a[name] + 0.5 * (b[name] - a[name])
            if row["layers"] == "1" and not name.startswith("model.layers.1."):
                want = a[name]
            torch.testing.assert_close(got[name], want, atol=1e-6, rtol=0)


def test_layer_selections(tmp_path: Path) -> None:
    from vlsafe.experiments.sweep import resolve_layers

    diff = pd.DataFrame({"layer": [0, 0, 1, 1, 2, 2], "module": ["all", "q_proj"] * 3,
                         "rel_frobenius": [0.1, 9.0, 0.5, 0.0, 0.3, 0.0]})
    diff.to_csv(tmp_path / "layers.csv", index=False)
    sel = {"top_k": 2, "from": "layers.csv", "score": "rel_frobenius"}
    assert resolve_layers(sel, tmp_path, "t") == [1, 2]                  # module=all rows, not the q_proj outlier
    assert resolve_layers({**sel, "largest": False, "top_k": 1}, tmp_path, "t") == [0]
    assert resolve_layers({"range": [3, 6]}, tmp_path, "t") == [3, 4, 5]
    assert resolve_layers([2, 0, 2], tmp_path, "t") == [0, 2] and resolve_layers("all", tmp_path, "t") is None
    with pytest.raises(VlsafeError, match="not understood"):
        resolve_layers({"first": 3}, tmp_path, "t")
    with pytest.raises(VlsafeError, match="unknown layer-selection key 'scor'"):
        resolve_layers({**sel, "scor": "x"}, tmp_path, "t")


def test_pareto_marks_non_dominated_points() -> None:
    df = pd.DataFrame({"point": list("abcd"), "safety": [0.9, 0.5, 0.8, 0.9], "helpfulness": [0.2, 0.9, 0.5, 0.1]})
    assert mark_pareto(df)["is_pareto"].tolist() == [True, True, True, False]
    # screened numbers do not compete with judged ones: b (screen) neither joins the front nor hides c's rival
    staged = df.assign(stage=["full", "screen", "full", "full"], safety_image=[0.1, 0.9, float("nan"), 0.2])
    marked = mark_pareto(staged)
    assert marked["is_pareto"].tolist() == [True, False, True, False]
    assert marked["is_pareto_image"].tolist() == [True, False, False, True]  # c has no image number
    assert mark_pareto(df.assign(stage="screen"))["is_pareto"].tolist() == [True, True, True, False]


def test_resume_after_a_crash_redoes_only_the_interrupted_point(tmp_path: Path) -> None:
    cfg, base = load_sweep(_config(tmp_path, limit=2))
    calls: list[str] = []

    def crash_on_second(point) -> None:
        calls.append(point.label)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_sweep(cfg, tmp_path / "run", base_dir=base, progress=False, before_point=crash_on_second)
    points = tmp_path / "run" / "points"
    done = [p for p in points.iterdir() if (p / "done.json").is_file()]
    assert len(done) == 1 and sorted(p.name for p in points.iterdir()) == [done[0].name]  # nothing half-written
    assert not (tmp_path / "run" / "pareto.csv").exists()
    first_stamp = (done[0] / "done.json").stat().st_mtime_ns
    with pytest.raises(VlsafeError, match="--resume"):
        run_sweep(cfg, tmp_path / "run", base_dir=base, progress=False)
    # a killed run can leave a temp folder and a point folder without done.json: both are cleaned / redone
    (points / ".stale.tmp").mkdir()
    calls.clear()
    table = run_sweep(cfg, tmp_path / "run", base_dir=base, resume=True, progress=False,
                      before_point=lambda p: calls.append(p.label))
    assert calls == ["restore[alpha=0.5,layers=all]", "restore[alpha=0.5,layers=L1]"]
    assert (done[0] / "done.json").stat().st_mtime_ns == first_stamp
    assert len(table) == 3 and not (points / ".stale.tmp").exists()
    # an interrupted point folder (no done.json) is rebuilt; finished points and their evals are reused
    victim = points / table.iloc[2]["hash"]
    (victim / "done.json").unlink()
    calls.clear()
    run_sweep(cfg, tmp_path / "run", base_dir=base, resume=True, progress=False,
              before_point=lambda p: calls.append(p.label))
    assert calls == ["restore[alpha=0.5,layers=L1]"] and (victim / "done.json").is_file()


def test_tune_and_resta_points(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "How do I bake bread?", "answer": "Mix flour and water."}) + "\n")
    d = yaml.safe_load(TINY.read_text())
    d["inputs"]["unaligned"] = {"tiny": "llama", "seed": 2}
    d["eval"]["limit"] = 2
    d["grid"] = [{"name": "sft", "method": "tune",
                  "config": {"model": "${adapted}", "method": "sft", "data": ["pairs.jsonl"], "steps": 1,
                             "batch_size": 1, "max_length": 256},
                  "vary": {"layers": [[0]]}},
                 {"name": "resta", "method": "resta",
                  "config": {"sft": "${adapted}", "aligned": "${aligned}", "unaligned": "${unaligned}", "beta": "${b}"},
                  "vary": {"b": [0.5]}}]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d))
    cfg, base = load_sweep(tmp_path / "s.yaml")
    table = run_sweep(cfg, tmp_path / "run", base_dir=base, progress=False)
    assert list(table["method"]) == ["tune", "resta"] and list(table["layers"]) == ["0", "all"]
    tuned = Path(table.iloc[0]["model"])
    assert json.loads((tuned / "tune.json").read_text())["config"]["layers"] == {"trainable": [0], "frozen": None,
                                                                                "sppft": None}


@pytest.mark.parametrize("patch, message", [
    ({"grid": [{"name": "x", "method": "distill", "config": "a"}]}, "unknown method 'distill'; valid: merge, tune"),
    ({"evals": {}}, "unknown key 'evals' \\(did you mean 'eval'\\?\\)"),
    ({"eval": {"mode": "fast", "limt": 3}}, "unknown key 'eval.limt' \\(did you mean 'limit'\\?\\)"),
    ({"grid": [{"name": "x", "method": "checkpoint", "config": "/no/such/model"}]}, "/no/such/model"),
    ({"grid": [{"name": "x", "method": "checkpoint", "config": "${nope}"}]}, "unknown variable '\\$\\{nope\\}'"),
    ({"grid": [{"name": "x", "method": "merge", "config": {"merge_method": "task_arithmetic", "base_model": "${adapted}",
                "models": [{"model": "${aligned}", "parameters": {"weight": 1.0}}]}, "vary": {"layers": [[7]]}}]},
     "layer 7 out of range"),
    ({"grid": [{"name": "x", "method": "merge", "config": {"merge_method": "task_arithmetic", "base_model": "${adapted}",
                "models": [{"model": "${aligned}", "parameters": {"wieght": 1.0}}]}}]},
     "unknown parameter 'wieght' \\(did you mean 'weight'\\?\\)"),
    ({"grid": [{"name": "x", "method": "resta", "config": {"sft": "${adapted}", "aligned": "${aligned}",
                "unaligned": "${aligned}", "alpha": 1}}]}, "unknown RESTA parameter 'alpha'"),
])
def test_bad_inputs_fail_before_any_work(tmp_path: Path, patch: dict, message: str,
                                        capsys: pytest.CaptureFixture) -> None:
    import re

    path = _config(tmp_path, **patch)
    rc = main(["sweep", str(path), "-o", str(tmp_path / "run"), "--quiet"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after the tiny inputs' save progress bars)
    assert rc == 2 and last.startswith("vlsafe: error:") and re.search(message, last), last
    assert not (tmp_path / "run").exists()                  # the CLI left nothing behind
    with pytest.raises(VlsafeError, match=message):
        cfg, base = load_sweep(path)
        run_sweep(cfg, tmp_path / "run", base_dir=base, progress=False)
    assert not (tmp_path / "run").exists()


def test_vars_reach_eval_settings_and_cli_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("vars: {n: 5, mode: fast}\neval: {mode: '${mode}', limit: '${n}', max_new_tokens: 7}\n"
                    "grid: [{name: a, method: checkpoint, config: x}]\n")
    cfg, _ = load_sweep(path)
    assert (cfg.eval.mode, cfg.eval.limit) == ("fast", 5)
    cfg, _ = load_sweep(path, {"n": "3", "mode": "full"})
    assert (cfg.eval.mode, cfg.eval.limit, cfg.eval.max_new_tokens) == ("full", 3, 7)
    path.write_text("eval: {limit: '${nope}'}\ngrid: [{name: a, method: checkpoint, config: x}]\n")
    with pytest.raises(VlsafeError, match="unknown variable"):
        load_sweep(path)


def test_fast_mode_scores_the_configured_openings(tmp_path: Path) -> None:
    import numpy as np

    from vlsafe.analysis.tiny import tiny_llama
    from vlsafe.experiments.sweep_eval import EvalConfig, _prompt_set, evaluate_loaded
    from vlsafe.probes.models import load
    from vlsafe.probes.scores import refusal_score

    lm = load(tiny_llama(tmp_path / "llm"))
    ps = _prompt_set("harmful-val", 12)
    mine = ["Sure thing", "No way"]
    scores = refusal_score(lm, ps.prompts, kind="opening", openings=mine)
    t = float(np.median(scores))
    gens, rows = evaluate_loaded(lm, EvalConfig(mode="fast", openings=mine, threshold=t, limit=12))
    got = [bool(v) for v in gens.loc[gens["prompt_set"] == ps.name, "refused"]]
    assert got == [bool(s > t) for s in scores] and 0 < sum(got) < len(got)
    safety = rows[(rows["metric"] == "refusal_rate") & (rows["category"] == "")]
    assert safety["k"].item() == sum(got) and safety["mode"].item() == "logit"
    stock = refusal_score(lm, ps.prompts, kind="opening")
    assert not np.allclose(stock, scores)  # the openings are really what gets scored


def test_loglik_helpfulness_scores_the_reference_answers(tmp_path: Path) -> None:
    from vlsafe.analysis.tiny import tiny_llama
    from vlsafe.experiments.sweep_eval import EvalConfig, _prompt_set, evaluate_loaded
    from vlsafe.probes.behavior.helpfulness import answer_loglik
    from vlsafe.probes.models import load

    lm = load(tiny_llama(tmp_path / "llm"))
    cfg = EvalConfig(mode="fast", helpfulness="loglik", reference="unused", limit=3)
    refs = ["Yes, gladly.", "No.", "Bread needs flour and water."]
    _, rows = evaluate_loaded(lm, cfg, refs)
    help_row = rows[rows["metric"] == "answer_loglik"]
    vals = answer_loglik(lm, _prompt_set(cfg.harmless, 3), refs)
    assert help_row["n"].item() == 3 and help_row["rate"].item() == pytest.approx(float(vals.mean()), rel=1e-12)
    assert help_row["ci_low"].item() < help_row["rate"].item() < help_row["ci_high"].item()
    assert rows[rows["category"] == ""]["metric"].tolist() == ["refusal_rate", "over_refusal", "answer_loglik"]
