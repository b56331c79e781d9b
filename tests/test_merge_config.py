"""Merge plans: parameter resolution (gradients, filters, precedence, per-layer maps), selections, the
mergekit export, and one-line errors for bad configs."""

from __future__ import annotations

import pytest
import yaml
from pydantic import TypeAdapter

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.merging.config import MergePlan, evaluate_setting, load_plan
from vlsafe.analysis.merging.export import to_mergekit_dict

L = 13
LM_NAMES = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
    f"model.layers.{i}.{m}.weight" for i in range(L)
    for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm")]
VISION = ["vision.vision_model.encoder.layers.1.mlp.fc1.weight", "projector.linear_1.weight"]


def plan(**kw) -> MergePlan:
    d = {"merge_method": "task_arithmetic", "base_model": "base", "models": [{"model": "a"}]}
    d.update(kw)
    return MergePlan.from_dict(d)


def params_at(p: MergePlan, name: str, layer: int | None, num_layers: int = 5):
    shared, per = p.resolve(name, layer, num_layers)
    return shared, per


def test_gradient_interpolates_over_depth_hand_computed():
    p = plan(models=[{"model": "a", "parameters": {"weight": [0.0, 1.0, 0.5]}}])
    # L = 5: t = layer/4, u = 2t → layer 1: u=0.5 → 0.5; layer 3: u=1.5 → 0.75; layer 4: u=2 → 0.5
    got = {i: params_at(p, f"model.layers.{i}.mlp.up_proj.weight", i)[1][0]["weight"] for i in range(5)}
    assert got == pytest.approx({0: 0.0, 1: 0.5, 2: 1.0, 3: 0.75, 4: 0.5})
    assert params_at(p, "lm_head.weight", None)[1][0]["weight"] == 0.0  # non-layer tensors sit at t = 0
    assert params_at(p, "model.layers.0.mlp.up_proj.weight", 0, num_layers=1)[1][0]["weight"] == 0.5  # L=1: t=1


def test_non_numeric_gradient_steps():
    p = plan(parameters={"normalize": [True, False]}, models=[{"model": "a", "parameters": {"weight": 1}}])
    assert [params_at(p, f"model.layers.{i}.x.weight", i)[0]["normalize"] for i in range(5)] == \
        [True, True, True, True, False]


def test_filter_precedence_and_fallthrough():
    p = plan(parameters={"weight": 0.9, "lambda": [{"filter": "mlp", "value": 0.5}, {"value": 2.0}]},
             models=[{"model": "a", "parameters": {"weight": [{"filter": "self_attn", "value": 0.2},
                                                              {"filter": "self_attn.q", "value": 0.7}]}}])
    q = params_at(p, "model.layers.1.self_attn.q_proj.weight", 1)
    assert q[1][0]["weight"] == 0.2  # first matching filter wins, not the most specific
    assert q[0]["lambda"] == 2.0
    up = params_at(p, "model.layers.1.mlp.up_proj.weight", 1)
    assert up[1][0]["weight"] == 0.9  # no per-model filter matches → falls through to the global value
    assert up[0]["lambda"] == 0.5
    star = plan(models=[{"model": "a", "parameters": {"weight": [{"filter": "*", "value": 0.3}, {"value": 1}]}}])
    assert params_at(star, "lm_head.weight", None)[1][0]["weight"] == 0.3


def test_layer_maps_and_layer_coefficients():
    p = plan(parameters={"weight": 0.1},
             models=[{"model": "a", "layer_coefficients": {2: 0.8},
                      "parameters": {"weight": {"layers": {1: 0.5, 2: 0.6}}}}])
    w = [params_at(p, f"model.layers.{i}.mlp.up_proj.weight", i)[1][0]["weight"] for i in range(4)]
    assert w == [0.1, 0.5, 0.8, 0.1]  # layer_coefficients > per-model map > global; no default falls through
    p = plan(models=[{"model": "a", "parameters": {"weight": {"layers": {1: 0.5}, "default": 0.25}}}])
    assert params_at(p, "lm_head.weight", None)[1][0]["weight"] == 0.25


def test_selection_by_layers_and_modules():
    p = plan(layers=[1, 3], modules=["mlp", "q_proj"], models=[{"model": "a", "parameters": {"weight": 1}}])
    assert p.selects(1, "mlp.down_proj") and p.selects(3, "q_proj")
    assert not p.selects(1, "k_proj") and not p.selects(2, "mlp.up_proj") and not p.selects(None, "embed")
    att = plan(modules=["self_attn", "embed"], models=[{"model": "a", "parameters": {"weight": 1}}])
    assert att.selects(0, "o_proj") and att.selects(None, "embed") and not att.selects(0, "mlp.up_proj")


@pytest.mark.parametrize("setting", [
    0.5, [0.1, 0.9], [0.0, 1.0, 0.3, 0.7], [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.4}],
    [{"filter": "layers.1.", "value": 0.3}, {"filter": "*", "value": 0.6}], [{"filter": "self_attn", "value": 2}],
])
def test_resolution_equals_mergekit_evaluate_setting(setting):
    """Same setting, same names, same t: vlsafe's evaluator agrees with mergekit's own."""
    from mergekit.config import ParameterSetting
    from mergekit.config import evaluate_setting as mk_evaluate

    ours = MergePlan.from_dict({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": setting}}]})
    ours_setting = ours.models[0].parameters["weight"]
    theirs = TypeAdapter(ParameterSetting).validate_python(setting)
    to_float = TypeAdapter(float).validate_python
    for name in LM_NAMES:
        layer = int(name.split(".")[2]) if ".layers." in name else None
        t = 0.0 if layer is None else layer / (L - 1)
        assert evaluate_setting(name, ours_setting, t, layer, to_float) == \
            mk_evaluate(name, theirs, t, validate=to_float), name


def test_export_layer_map_is_unambiguous_and_equivalent():
    p = plan(models=[{"model": "a", "parameters": {"weight": {"layers": {1: 0.5, 12: 0.9}, "default": 0.0}}},
                     {"model": "b", "layer_coefficients": {11: 0.3}, "parameters": {"weight": 0.1}}])
    d = to_mergekit_dict(p, LM_NAMES + VISION, L)
    assert d["models"][0]["parameters"]["weight"][0] == {"filter": "model.layers.1.", "value": 0.5}
    exported = MergePlan.from_dict(d)
    assert not exported.has_extensions()
    for name in LM_NAMES + VISION:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        assert exported.resolve(name, layer, L) == p.resolve(name, layer, L), name
    # layers.1. must not catch layers.12. nor a vision-tower layer 1
    w = {n: exported.resolve(n, None if not n.startswith("model.layers.") else int(n.split(".")[2]), L)[1][0]["weight"]
         for n in ("model.layers.12.mlp.up_proj.weight", "vision.vision_model.encoder.layers.1.mlp.fc1.weight")}
    assert w == {"model.layers.12.mlp.up_proj.weight": 0.9, "vision.vision_model.encoder.layers.1.mlp.fc1.weight": 0.0}
    from mergekit.config import MergeConfiguration
    MergeConfiguration.model_validate(yaml.safe_load(p.to_mergekit_yaml()))  # mergekit accepts it


def test_export_selection_gates_with_lambda_zero():
    p = plan(layers=[2], modules=["mlp"], models=[{"model": "a", "parameters": {"weight": 0.7}}])
    with pytest.raises(VlsafeError, match="needs the base's tensor names"):
        p.to_mergekit_yaml()
    d = to_mergekit_dict(p, LM_NAMES, L)
    exported = MergePlan.from_dict(d)
    for name in LM_NAMES:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        lam = exported.resolve(name, layer, L)[0]["lambda"]
        assert lam == (1.0 if layer == 2 and ".mlp." in name else 0.0), name


@pytest.mark.parametrize("cfg, match", [
    ({"merge_method": "tie"}, r"unknown merge_method 'tie' \(did you mean 'ties'\?\)"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1}}]}, "needs a base_model"),
    ({"merge_method": "slerp", "base_model": "b", "models": [{"model": "a"}, {"model": "c"}],
      "parameters": {"t": 0.5}}, "exactly 2 models"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"densty": 0.5}}]},
     r"unknown parameter 'densty' \(did you mean 'density'\?\)"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"lambda": 0.5}}]},
     "'lambda' is a global parameter"),
    ({"merge_method": "linear", "slices": [{"sources": []}]}, "'slices' .* not supported yet"),
    ({"merge_method": "linear", "modelz": []}, "unknown key 'modelz'"),
    ({"merge_method": "linear", "models": [{"model": "a"}, {"model": "a"}]}, "listed twice"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "layers": [1]}, "copy the rest from base_model"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "float33"}, "unknown dtype"),
])
def test_bad_configs_are_one_line_errors(cfg, match):
    cfg.setdefault("models", [{"model": "a"}])
    with pytest.raises(VlsafeError, match=match) as e:
        MergePlan.from_dict(cfg, "cfg.yaml")
    assert "\n" not in str(e.value)


def test_resolution_errors_name_the_tensor():
    p = plan(models=[{"model": "a", "parameters": {"density": 0.5}}])
    with pytest.raises(VlsafeError, match=r"missing required parameter 'weight' \(model a, tensor lm_head.weight\)"):
        p.resolve("lm_head.weight", None, 4)
    p = MergePlan.from_dict({"merge_method": "ties", "base_model": "b",
                             "models": [{"model": "a", "parameters": {"weight": 1, "density": [1.0, 1.5]}}]})
    with pytest.raises(VlsafeError, match=r"density 1.5 for model a, tensor model.layers.3.x.weight"):
        p.resolve("model.layers.3.x.weight", 3, 4)
    p = plan(layers=[7], models=[{"model": "a", "parameters": {"weight": 1}}])
    with pytest.raises(VlsafeError, match=r"layers: layer 7 out of range \(the base has 4 layers"):
        p.check_layers(4)


def test_yaml_files_fail_in_one_line(tmp_path):
    from vlsafe.analysis.yamlfile import read_yaml
    from vlsafe.experiments.sweep_config import load_sweep
    from vlsafe.experiments.tune import load_tune_config

    bad, listy, empty = tmp_path / "bad.yaml", tmp_path / "list.yaml", tmp_path / "empty.yaml"
    bad.write_text("a: [1, 2\n")
    listy.write_text("- 1\n- 2\n")
    empty.write_text("")
    assert read_yaml(empty) == {}
    with pytest.raises(VlsafeError, match=r"no such sweep config"):
        load_sweep(tmp_path / "missing.yaml")
    for loader in (load_sweep, load_tune_config):
        with pytest.raises(VlsafeError, match=r"bad.yaml: invalid YAML \("):
            loader(bad)
        with pytest.raises(VlsafeError, match=r"list.yaml: a (sweep|tune) config must be a YAML mapping"):
            loader(listy)
    with pytest.raises(VlsafeError, match=r"bad.yaml: invalid YAML \("):
        load_plan(bad)
