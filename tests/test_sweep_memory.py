"""In-memory merges (`vlsafe.analysis.merging.merge_into` / `load_merged`) and the two-stage sweep's screen without
written checkpoints: the merged model equals the written merge reloaded bit for bit (Llama and LLaVA pairs, whole and
layer-restricted task arithmetic, TIES, DARE, a cast `out_dtype`), its screen equals the written one's, a two-stage
sweep writes only the kept points' checkpoints and resumes without rebuilding or re-evaluating anything, and bad
input is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import vlsafe.analysis.merging as merging
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.merging import MergePlan, load_merged, merge_into, run_merge
from vlsafe.experiments import sweep as sweep_mod
from vlsafe.experiments.cli import main
from vlsafe.experiments.sweep import IN_MEMORY, finished_row, load_sweep, point_key, run_sweep
from vlsafe.experiments.sweep_config import expand
from vlsafe.experiments.sweep_eval import EvalConfig, evaluate_loaded, evaluate_point
from vlsafe.probes.models import load

EXTRA_ROWS = 2  # the LVLM's vocabulary extends the LLM's (like LLaVA's <image>, <pad>): rows kept from the base


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from transformers import LlamaConfig

    from vlsafe.analysis.tiny import tiny_llama, tiny_llava

    root = tmp_path_factory.mktemp("memory")
    out = {f"llm{i}": tiny_llama(root / f"llm{i}", layers=3, seed=40 + i) for i in range(3)}
    text = LlamaConfig.from_pretrained(out["llm0"])
    text.vocab_size += EXTRA_ROWS
    out["lvlm"] = tiny_llava(root / "lvlm", text_config=text, seed=51)
    out["lvlm2"] = tiny_llava(root / "lvlm2", text_config=text, seed=52)
    return {k: str(v) for k, v in out.items()}


def _ta(base: str, other: str, **kw) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": base,
            "models": [{"model": other, "parameters": {"weight": 0.7}}], **kw}


CASES = {
    "llama-task-arithmetic": lambda m: _ta(m["llm0"], m["llm1"]),
    "llama-layer-1": lambda m: _ta(m["llm0"], m["llm1"], layers=[1]),
    "llama-layer-1-bf16-out": lambda m: _ta(m["llm0"], m["llm1"], layers=[1], out_dtype="bfloat16"),
    "llama-ties": lambda m: {"merge_method": "ties", "base_model": m["llm0"], "models": [
        {"model": m[f"llm{i}"], "parameters": {"weight": 0.5, "density": 0.4}} for i in (1, 2)]},
    "llama-dare-ties": lambda m: {"merge_method": "dare_ties", "base_model": m["llm0"], "seed": 3, "models": [
        {"model": m[f"llm{i}"], "parameters": {"weight": 0.6, "density": 0.5}} for i in (1, 2)]},
    "llava+llm-task-arithmetic": lambda m: _ta(m["lvlm"], m["llm0"]),
    "llava+llm-layers-0-2": lambda m: _ta(m["lvlm"], m["llm0"], layers=[0, 2]),
    "llava+llava-linear": lambda m: {"merge_method": "linear", "models": [
        {"model": m["lvlm"], "parameters": {"weight": 0.3}}, {"model": m["lvlm2"], "parameters": {"weight": 0.7}}]},
}


@pytest.mark.parametrize("case", list(CASES))
def test_in_memory_merge_equals_the_written_merge_reloaded(models, tmp_path: Path, case: str) -> None:
    plan = MergePlan.from_dict(CASES[case](models))
    written = load(run_merge(plan, tmp_path / "merged", progress=False)).model.state_dict()
    lm = load_merged(plan)
    got, base = lm.model.state_dict(), load(plan.layout_model()).model.state_dict()
    assert got.keys() == written.keys()
    differ = [k for k in got if not torch.equal(got[k], written[k])]
    assert differ == [], differ[:3]
    if plan.out_dtype:                               # the written copies are rounded to out_dtype too
        base = {k: v.to(getattr(torch, plan.out_dtype)).to(v.dtype) for k, v in base.items()}
    changed = {k for k in got if not torch.equal(got[k], base[k])}
    assert changed, "the merge changed nothing"
    if "layer" in case:                              # a layer-restricted merge touches only its layers
        layers = plan.layers or []
        assert all(any(f"layers.{i}." in k for i in layers) for k in changed), sorted(changed)[:3]
    if case.startswith("llava+llm"):                 # the vision side is the LVLM's, the extra vocabulary rows too
        assert not any("vision_tower" in k or "multi_modal_projector" in k for k in changed)
        emb = next(k for k in got if k.endswith("embed_tokens.weight"))
        assert torch.equal(got[emb][-EXTRA_ROWS:], base[emb][-EXTRA_ROWS:])
    if case == "llava+llava-linear":                 # two LVLMs: the vision tower is merged too
        assert any("vision_tower" in k for k in changed)


@pytest.mark.parametrize("case, extra", [("llama-layer-1", {}),
                                         ("llava+llm-task-arithmetic", {"harmful_image": "harmful-val+blank"})])
def test_screen_of_the_in_memory_merge_equals_the_written_one(models, tmp_path: Path, case: str, extra: dict) -> None:
    plan = MergePlan.from_dict(CASES[case](models))
    cfg = EvalConfig(mode="fast", limit=3, **extra)
    written = evaluate_point(str(run_merge(plan, tmp_path / "merged", progress=False)), cfg)
    in_memory = evaluate_point("in-memory", cfg, build=lambda: load_merged(plan))
    assert in_memory == written and in_memory["n_harmful"] == 3
    assert in_memory.get("n_harmful_image", 0) == (3 if extra else 0)
    # the per-prompt logit scores behind the rates: equal to the written model's, not the base's
    scores = [evaluate_loaded(lm, cfg)[0]["judge_score"].to_numpy()
              for lm in (load(str(tmp_path / "merged")), load_merged(plan), load(plan.layout_model()))]
    assert len(scores[0]) == (12 if extra else 9) and (scores[0] == scores[1]).all()
    assert not (scores[0] == scores[2]).all()


def _with_extra_tensor(src: str, dst: Path, name: str) -> Path:
    """A copy of checkpoint `src` whose safetensors file also holds `name` (no parameter of the model has it)."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors[name] = torch.randn(4, 4, generator=torch.Generator().manual_seed(len(str(dst))))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_bad_input_is_a_one_line_error(models, tmp_path: Path) -> None:
    extra = "model.layers.0.self_attn.extra_proj.weight"
    a, b = (_with_extra_tensor(models[f"llm{i}"], tmp_path / f"x{i}", extra) for i in (0, 1))
    plan = MergePlan.from_dict(_ta(str(a), str(b)))
    lm = load(str(a))
    with pytest.raises(VlsafeError) as e:
        merge_into(plan, lm)
    assert str(e.value) == (f"merge_into: merged tensor '{extra}' ({extra}) has no parameter in the loaded "
                            "LlamaForCausalLM")
    with pytest.raises(VlsafeError, match=r"^merge_into: the model is .*llm1, not the plan's layout model .*llm0$"):
        merge_into(MergePlan.from_dict(_ta(models["llm0"], models["llm2"])), load(models["llm1"]))
    templated = MergePlan.from_dict(_ta(models["llm0"], models["llm1"], chat_template="{{ messages }}"))
    with pytest.raises(VlsafeError, match="^merge_into: chat_template changes the tokenizer's chat template; write "
                                          "the merge with run_merge instead$"):
        merge_into(templated, load(models["llm0"]))


# ---- the two-stage sweep ---------------------------------------------------------------------------------------------
def _sweep_config(tmp: Path, models: dict[str, str]) -> Path:
    merge = {"merge_method": "task_arithmetic", "base_model": "${adapted}",
             "models": [{"model": "${aligned}", "parameters": {"weight": "${alpha}"}}]}
    d = {"vars": {"adapted": models["llm0"], "aligned": models["llm1"]},
         "eval": {"mode": "two-stage", "limit": 2, "judge": "substring-rd", "max_new_tokens": 4,
                  "keep": {"margin": 0.0, "max_points": 1}},
         "grid": [{"name": "ref", "method": "checkpoint", "config": "${adapted}"},
                  {"name": "m", "method": "merge", "config": merge,
                   "vary": {"alpha": [0.3, 1.0, 2.5], "layers": ["all", [2]]}}]}
    (tmp / "s.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    return tmp / "s.yaml"


def test_two_stage_sweep_writes_only_kept_merges_and_resumes_without_work(models, tmp_path: Path,
                                                                        monkeypatch) -> None:
    calls: dict[str, list[str]] = {"run_merge": [], "load_merged": [], "evaluate": [], "before": []}

    def counted(name, fn):
        def wrapper(*a, **kw):
            calls[name].append(str(a[0])[-40:])
            return fn(*a, **kw)
        return wrapper
    monkeypatch.setattr(merging, "run_merge", counted("run_merge", merging.run_merge))
    monkeypatch.setattr(merging, "load_merged", counted("load_merged", merging.load_merged))
    monkeypatch.setattr(sweep_mod, "evaluate_point", counted("evaluate", sweep_mod.evaluate_point))
    cfg, base = load_sweep(_sweep_config(tmp_path, models))

    def sweep(out: str, **kw) -> pd.DataFrame:
        for c in calls.values():
            c.clear()
        return run_sweep(cfg, tmp_path / out, base_dir=base, progress=False, before_point=calls["before"].append,
                         **kw)

    assert main(["sweep", str(tmp_path / "s.yaml"), "-o", str(tmp_path / "written"), "--quiet",
                 "--write-screened"]) == 0
    assert len(calls["run_merge"]) == 6 and calls["load_merged"] == []
    assert json.loads((tmp_path / "written" / "run.json").read_text())["screen_in_memory"] is False
    table = sweep("memory")
    merges = table[table["method"] == "merge"]
    kept, screened = merges[merges["stage"] == "full"], merges[merges["stage"] == "screen"]
    assert len(kept) == 1 and len(screened) == 5                        # the cap keeps one merge point
    assert len(calls["load_merged"]) == 6 and len(calls["run_merge"]) == 1   # screened in memory, the kept one written
    assert len(calls["before"]) == 1 + 6 + 1                            # ref, six screens, the kept one's build
    # the layout: screened-only points have their screen and no checkpoint; the kept one has both stages
    screen_key = cfg.eval.stage_config("screen").key()
    full_key = cfg.eval.stage_config("full").key()
    points = tmp_path / "memory" / "points"
    for h in screened["hash"]:
        assert sorted(p.name for p in (points / h).iterdir()) == ["eval-" + screen_key, "point.json"]
    (h,) = kept["hash"]
    assert sorted(p.name for p in (points / h).iterdir()) == sorted(
        ["done.json", "eval-" + full_key, "eval-" + screen_key, "model", "point.json"])
    # pareto.csv is the written run's but for the model column
    a, b = (pd.read_csv(tmp_path / d / "pareto.csv") for d in ("written", "memory"))
    pd.testing.assert_frame_equal(a.drop(columns="model"), b.drop(columns="model"))
    assert list(b.loc[b["stage"] == "screen", "model"]) == [IN_MEMORY + h for h in screened["hash"]]
    assert b.loc[b["stage"] == "full", "model"].map(lambda m: Path(m).is_dir()).all()
    assert json.loads((tmp_path / "memory" / "run.json").read_text())["screen_in_memory"] is True
    # resume: nothing is built, merged or evaluated again; the same table
    again = sweep("memory", resume=True)
    assert all(c == [] for c in calls.values()), calls
    pd.testing.assert_frame_equal(again, table)  # columns in the same order, cached or not
    # Ray's skip test sees both stages' finished points (a screened-only one only as the in-memory screen's)
    points_ = expand(cfg, dict(cfg.vars), base)
    for p in points_:
        p.key = point_key(p, base)
    screen_cfg, full_cfg = cfg.eval.stage_config("screen"), cfg.eval.stage_config("full")
    only = next(p for p in points_ if p.key == screened["hash"].iloc[0])
    assert finished_row(only, out=tmp_path / "memory", ecfg=screen_cfg, in_memory=True)["model"] == IN_MEMORY + only.key
    assert finished_row(only, out=tmp_path / "memory", ecfg=screen_cfg) is None
    assert finished_row(only, out=tmp_path / "memory", ecfg=full_cfg) is None
    judged = next(p for p in points_ if p.key == h)
    assert finished_row(judged, out=tmp_path / "memory", ecfg=full_cfg)["model"] == str(points / h / "model")
    # a wider cap builds the newly kept point, which keeps its cached screen: only its full evaluation runs
    d = yaml.safe_load((tmp_path / "s.yaml").read_text())
    d["eval"]["keep"]["max_points"] = 2
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    cfg, base = load_sweep(tmp_path / "s.yaml")
    wider = sweep("memory", resume=True)
    assert len(calls["run_merge"]) == 1 and calls["load_merged"] == [] and len(calls["evaluate"]) == 1
    assert (wider["stage"] == "full").sum() == 3
