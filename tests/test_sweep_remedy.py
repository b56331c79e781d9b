"""The sweep's `remedy` method: a base checkpoint evaluated under an activation-level remedy, nothing built.

Planted: steering the last block's input along the refusal first tokens' unembedding direction with a large α
raises every prompt's refusal score above every plain score (both computed here); with the fast judge's threshold
between the two, the steered point refuses everything (safety 1, compliance 0) and α = 0 reproduces the plain
checkpoint's row."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from test_eval_cli import _error
from vlsafe.analysis.tiny import tiny_llama
from vlsafe.experiments.sweep import load_sweep, point_key, run_sweep
from vlsafe.experiments.sweep_config import expand

CHANNELS = ["safety", "over_refusal", "helpfulness"]
EVAL = {"mode": "fast", "limit": 4, "score_kind": "first_token", "batch_size": 4}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("remedy") / "m", layers=2, seed=3)


def _refusal_direction(model: Path, out: Path, width: int | None = None) -> Path:
    """Mean unembedding row of the refusal first tokens minus the mean row: adding it pushes those tokens up."""
    from vlsafe.probes.models import load
    from vlsafe.probes.scores import refusal_tokens

    lm = load(str(model))
    w = lm.model.lm_head.weight.detach().to(torch.float32)
    r = w[refusal_tokens(lm.tokenizer)].mean(0) - w.mean(0)
    save_file({"r": r[:width].contiguous() if width else r.contiguous()}, str(out))
    return out


def _config(tmp: Path, model: Path, grid_remedy: dict, vary: dict) -> Path:
    d = {"eval": EVAL,
         "grid": [{"name": "plain", "method": "checkpoint", "config": str(model)},
                  {"name": "steer", "method": "remedy", "config": {"model": str(model), **grid_remedy},
                   "vary": vary}]}
    (tmp / "s.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    return tmp / "s.yaml"


def _threshold(model: Path, direction: Path) -> float:
    """A score threshold between every plain score and every score steered with α = 1000 (asserted apart)."""
    from vlsafe.probes.behavior.datasets import load_prompts
    from vlsafe.probes.models import load
    from vlsafe.probes.remedies import steer
    from vlsafe.probes.scores import refusal_score
    from safetensors.torch import load_file

    lm = load(str(model))
    prompts = [p for s in ("harmful-val", "borderline-val", "harmless-val") for p in load_prompts(s, limit=4).prompts]
    plain = refusal_score(lm, prompts, kind="first_token")
    with steer(lm, load_file(str(direction))["r"], layers=[1], alpha=1000.0):
        steered = refusal_score(lm, prompts, kind="first_token")
    assert plain.max() < steered.min(), (plain, steered)
    return float((plain.max() + steered.min()) / 2)


def test_steer_points_alpha_zero_is_the_checkpoint_and_large_alpha_refuses_all(tmp_path: Path, model: Path) -> None:
    direction = _refusal_direction(model, tmp_path / "r.safetensors")
    EVAL["threshold"] = _threshold(model, direction)
    remedy = {"kind": "steer", "alpha": "${alpha}", "direction": {"file": "r.safetensors", "unit": True}}
    cfg, base = load_sweep(_config(tmp_path, model, remedy, {"alpha": [0.0, 1000.0], "layers": [[1]]}))
    del EVAL["threshold"]
    table = run_sweep(cfg, tmp_path / "run", base_dir=base, progress=False).set_index("point")
    plain, zero, big = (table.loc[p] for p in ("plain", "steer[alpha=0.0,layers=L1]", "steer[alpha=1000.0,layers=L1]"))
    assert [zero[c] for c in CHANNELS] == [plain[c] for c in CHANNELS]
    assert plain["safety"] < 1 and (big["safety"], big["over_refusal"], big["helpfulness"]) == (1.0, 1.0, 0.0)
    assert set(table.loc[["steer[alpha=0.0,layers=L1]"], "family"]) == {"activation"}
    assert big["model"] == str(model) and big["layers"] == "1"
    assert not any((tmp_path / "run" / "points" / big["hash"]).glob("model"))  # nothing materialised


def test_point_hash_follows_the_vector_content(tmp_path: Path, model: Path) -> None:
    path = _refusal_direction(model, tmp_path / "r.safetensors")
    remedy = {"kind": "steer", "alpha": 1.0, "direction": {"file": "r.safetensors"}}
    cfg, base = load_sweep(_config(tmp_path, model, remedy, {"layers": [[0]]}))

    def key() -> str:
        return point_key(expand(cfg, {}, base)[1], base)

    before = key()
    save_file({"r": torch.ones(64)}, str(path))
    assert key() != before


@pytest.mark.parametrize("remedy, message", [
    ({"kind": "calibrate", "shift": {"file": "r.safetensors", "condition": "blank"}, "layers": [0]},
     "acts on image inputs"),
    ({"kind": "steer", "direction": {"file": "narrow.safetensors"}, "layers": [0]}, "width 32"),
    ({"kind": "steer", "direction": {"file": "r.safetensors"}, "layers": [5]}, "layers: 5 out of range"),
    ({"kind": "steer", "direction": {"file": "r.safetensors"}, "alpha": "x", "layers": [0]}, "alpha"),
    ({"kind": "steer", "direction": {"file": "r.safetensors"}, "strength": 1, "layers": [0]}, "strength"),
])
def test_bad_remedy_points_fail_before_anything_is_written(tmp_path: Path, model: Path, remedy: dict, message: str,
                                                           capsys: pytest.CaptureFixture) -> None:
    _refusal_direction(model, tmp_path / "r.safetensors")
    _refusal_direction(model, tmp_path / "narrow.safetensors", width=32)
    path = _config(tmp_path, model, remedy, {})
    capsys.readouterr()
    assert message in _error(capsys, ["sweep", str(path), "-o", str(tmp_path / "run"), "--quiet"])
    assert not (tmp_path / "run").exists()


def test_layer_lists_accept_var_strings() -> None:
    """`layers: ["${mid_layer}"]` with `--var mid_layer=15` substitutes the string "15"."""
    from vlsafe.experiments.sweep_config import resolve_layers

    assert resolve_layers(["15", 3], Path("."), "t") == [3, 15] and resolve_layers("7", Path("."), "t") == [7]
    with pytest.raises(Exception, match="not understood"):
        resolve_layers(["x"], Path("."), "t")


def test_gated_points_never_is_the_checkpoint_always_is_the_action(tmp_path: Path, model: Path) -> None:
    """A gated steer whose condition never fires reproduces the plain row, one that always fires the ungated steer;
    `fired_<set>` says so; the condition's threshold override is a sweep variable."""
    from vlsafe.probes.gate import Condition

    direction = _refusal_direction(model, tmp_path / "r.safetensors")
    Condition(kind="direction", layer=1, weight=torch.ones(64, dtype=torch.float64), threshold=0.0).save(
        tmp_path / "cond.json")
    steer = {"kind": "steer", "alpha": 1000.0, "direction": {"file": "r.safetensors"}}
    d = {"eval": {**EVAL, "threshold": _threshold(model, direction)},
         "grid": [{"name": "plain", "method": "checkpoint", "config": str(model)},
                  {"name": "steer", "method": "remedy", "config": {"model": str(model), **steer, "layers": [1]}},
                  {"name": "gated", "method": "remedy",
                   "config": {"model": str(model), "kind": "gated", "action": steer,
                              "condition": {"file": "cond.json", "threshold": "${t}"}},
                   "vary": {"t": [float("inf"), float("-inf")], "layers": [[1]]}}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    cfg, base = load_sweep(tmp_path / "s.yaml")
    table = run_sweep(cfg, tmp_path / "run", base_dir=base, progress=False).set_index("point")
    never, always = table.loc["gated[t=inf,layers=L1]"], table.loc["gated[t=-inf,layers=L1]"]
    assert [never[c] for c in CHANNELS] == [table.loc["plain", c] for c in CHANNELS]
    assert [always[c] for c in CHANNELS] == [table.loc["steer", c] for c in CHANNELS] == [1.0, 1.0, 0.0]
    assert (never["family"], table.loc["steer", "family"]) == ("gated", "activation")
    fired = [c for c in table.columns if c.startswith("fired_")]
    assert fired and (never[fired] == 0).all() and (always[fired] == 1).all()
    assert table.loc["plain", fired].isna().all()


def test_vector_paths_resolve_from_the_working_folder_first(tmp_path: Path, model: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`--var locate=runs/x` is relative to where vlsafe runs, like checkpoint paths; else next to the config."""
    from vlsafe.experiments.sweep_remedy import remedy_spec

    (tmp_path / "cfg").mkdir()
    (tmp_path / "work").mkdir()
    _refusal_direction(model, tmp_path / "work" / "r.safetensors")
    _refusal_direction(model, tmp_path / "cfg" / "here.safetensors")
    monkeypatch.chdir(tmp_path / "work")
    config = {"model": str(model), "kind": "steer", "direction": {"file": "r.safetensors"}, "layers": [1]}
    assert remedy_spec(config, "p", tmp_path / "cfg", 2).direction.file == str(tmp_path / "work" / "r.safetensors")
    config["direction"]["file"] = "here.safetensors"
    assert remedy_spec(config, "p", tmp_path / "cfg", 2).direction.file == str(tmp_path / "cfg" / "here.safetensors")
