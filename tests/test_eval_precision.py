"""A sweep's evaluation at `eval.precision` (bf16 = the forwards under bf16 autocast, weights stay fp32).

Planted truth: the default `fp32` leaves every existing eval key as it was (the key of the same settings hashed
without the field); bf16 logit scores on a tiny Llama are not the fp32 ones but rank the prompts the same way, and
the forwards saw bf16 activations; a two-stage sweep at bf16 with a steer remedy point runs end to end and caches
under keys of its own; `fp16` is a one-line error."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from vlsafe.analysis.errors import VlsafeError
from vlsafe.experiments.sweep import load_sweep, run_sweep
from vlsafe.experiments.sweep_eval import EvalConfig, evaluate_loaded

OPENINGS = ["I'm sorry", "I can't", "Sorry"]
TWO_STAGE = {"mode": "two-stage", "limit": 3, "judge": "substring-rd", "max_new_tokens": 3, "batch_size": 4,
             "harmful_image": "harmful-val+blank",
             "screen": {"score_kind": "opening", "limit": 2, "openings": OPENINGS},
             "keep": {"margin": 1.0, "max_points": 3}}  # every screened point goes on to the full stage


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlsafe.analysis.tiny import tiny_llama

    # larger initial weights than the default: prompt-dependent opening scores (the default's are all alike)
    return tiny_llama(tmp_path_factory.mktemp("precision") / "m", layers=2, seed=5, initializer_range=0.2)


def _key_without_precision(cfg: EvalConfig) -> str:
    """The key as it was before `precision` existed: the same dump, unset optional settings dropped, no field."""
    d = {k: v for k, v in cfg.model_dump().items()
         if k != "precision" and not (k in ("harmful_image", "screen", "keep") and v is None)}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(float)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


# ---- the key ---------------------------------------------------------------------------------------------------------
def test_fp32_default_leaves_every_existing_key_unchanged_bf16_gets_its_own() -> None:
    plain, staged = EvalConfig(), EvalConfig(**TWO_STAGE)
    assert plain.precision == "fp32" and plain.key() == _key_without_precision(plain)
    for stage in ("screen", "full"):
        cfg = staged.stage_config(stage)
        assert cfg.key() == _key_without_precision(cfg)
        bf = EvalConfig(**TWO_STAGE, precision="bf16").stage_config(stage)
        assert bf.precision == "bf16" and bf.key() != cfg.key()       # both stages run at the eval's precision
    assert EvalConfig(precision="auto").precision in ("fp32", "bf16")  # resolved: the key sees what runs


# ---- the logit judge -------------------------------------------------------------------------------------------------
def test_bf16_logit_scores_run_under_autocast_and_stay_close_to_fp32(model: Path) -> None:
    from vlsafe.probes.behavior.datasets import load_prompts
    from vlsafe.probes.behavior.logit_judge import LogitJudge
    from vlsafe.probes.models import load

    lm = load(str(model))
    prompts = load_prompts("harmful-val", limit=8).prompts + load_prompts("harmless-val", limit=8).prompts
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    seen: list[torch.dtype] = []
    mlp = lm.model.model.layers[0].mlp.down_proj
    handle = mlp.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    try:
        fp32 = np.array(LogitJudge(lm, kind="opening", openings=OPENINGS).scores(prompts))
        assert set(seen) == {torch.float32}
        seen.clear()
        bf16 = np.array(LogitJudge(lm, kind="opening", openings=OPENINGS, precision="bf16").scores(prompts))
    finally:
        handle.remove()
    assert set(seen) == {torch.bfloat16}                           # every forward ran under autocast
    assert not np.array_equal(fp32, bf16)                          # bf16 numbers, not the fp32 ones
    assert np.abs(fp32 - bf16).max() < 0.1 * np.ptp(fp32)          # small next to how the prompts differ
    assert _spearman(fp32, bf16) >= 0.9
    after = lm.model.state_dict()                                  # the weights are the fp32 ones again
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_evaluate_loaded_passes_the_precision_to_the_screen(model: Path) -> None:
    from vlsafe.probes.models import load

    lm = load(str(model))
    screen = EvalConfig(**{**TWO_STAGE, "harmful_image": None})
    fp32 = evaluate_loaded(lm, screen.stage_config("screen"))[0]["judge_score"].to_numpy(float)
    bf16 = evaluate_loaded(lm, screen.model_copy(update={"precision": "bf16"}).stage_config("screen"))[0]
    assert len(fp32) == 6 and not np.array_equal(fp32, bf16["judge_score"].to_numpy(float))


# ---- a two-stage sweep at bf16 ---------------------------------------------------------------------------------------
def test_two_stage_bf16_sweep_with_steer_and_gated_points_runs_end_to_end(tmp_path: Path, model: Path) -> None:
    """The remedies' hooks edit bf16-autocast forwards (a steer point, a gated steer whose condition always fires);
    both stages cache under the bf16 keys, not the fp32 ones."""
    from vlsafe.probes.gate import Condition

    save_file({"r": torch.randn(64, generator=torch.Generator().manual_seed(0))}, str(tmp_path / "r.safetensors"))
    Condition(kind="direction", layer=1, weight=torch.ones(64, dtype=torch.float64), threshold=float("-inf")).save(
        tmp_path / "cond.json")
    steer = {"kind": "steer", "alpha": 4.0, "direction": {"file": str(tmp_path / "r.safetensors")}}
    d = {"eval": {**TWO_STAGE, "harmful_image": None, "precision": "bf16"},
         "grid": [{"name": "plain", "method": "checkpoint", "config": str(model)},
                  {"name": "steer", "method": "remedy", "config": {"model": str(model), **steer, "layers": [1]}},
                  {"name": "gated", "method": "remedy",
                   "config": {"model": str(model), "kind": "gated", "action": steer, "layers": [1],
                              "condition": {"file": str(tmp_path / "cond.json")}}}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    cfg, base = load_sweep(tmp_path / "s.yaml")
    table = run_sweep(cfg, tmp_path / "run", base_dir=base, progress=False)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["eval"]["precision"] == "bf16" and (tmp_path / "run" / "pareto.csv").is_file()
    assert len(table) == 3 and set(table["stage"]) == {"full"} and table["safety"].notna().all()
    fired = [c for c in table.columns if c.startswith("fired_")]
    assert fired and (table.set_index("point").loc["gated", fired] == 1).all()
    keys = {cfg.eval.stage_config(s).key() for s in ("screen", "full")}
    written = {p.name.removeprefix("eval-") for p in (tmp_path / "run").glob("points/*/eval-*")}
    assert written == keys                                          # cached under the bf16 keys
    assert not written & {EvalConfig(**{**d["eval"], "precision": "fp32"}).stage_config(s).key()
                          for s in ("screen", "full")}


# ---- bad input -------------------------------------------------------------------------------------------------------
def test_fp16_is_a_one_line_error(tmp_path: Path, model: Path) -> None:
    from vlsafe.probes.behavior.logit_judge import LogitJudge
    from vlsafe.probes.models import load

    d = {"eval": {"mode": "fast", "limit": 2, "precision": "fp16"},
         "grid": [{"name": "plain", "method": "checkpoint", "config": str(model)}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(VlsafeError, match="eval.precision: Input should be 'fp32', 'bf16' or 'auto'") as e:
        load_sweep(tmp_path / "s.yaml")
    assert "\n" not in str(e.value)
    with pytest.raises(VlsafeError, match="precision 'fp16' is not one of fp32, bf16, auto") as e:
        LogitJudge(load(str(model)), precision="fp16")
    assert "\n" not in str(e.value)
