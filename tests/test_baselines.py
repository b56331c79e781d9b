"""SafeLoRA on a planted case (inside / orthogonal / partial updates) and RESTA = θ_SFT + β·δ_safe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlsafe.analysis.checkpoints import open_checkpoint
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.tiny import tiny_llama, tiny_llava
from vlsafe.experiments.baselines import projector, resta, safelora_project, select_modules

R = 4
ADAPTER_FILE = "adapter_model.safetensors"
# module stem -> (layer, proj, cos target): inside the alignment subspace, orthogonal, partial ones
PLANTED = {("q_proj", 0): 1.0, ("q_proj", 1): 0.0, ("v_proj", 0): 0.3, ("v_proj", 1): 0.8}


pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(n: int, g: torch.Generator) -> torch.Tensor:
    v = torch.randn(n, generator=g, dtype=torch.float64)
    return v / v.norm()


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """base; aligned = base + rank-1 V = s·u wᵀ on q/v_proj of both layers; a LoRA adapter with B planted at a
    chosen cosine to u (BA's cosine with CBA equals B's share along u)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("safelora")
    base = tiny_llama(root / "base", seed=0)
    g = torch.Generator().manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    us = {}
    with torch.no_grad():
        for (proj, layer) in PLANTED:
            w = getattr(model.model.layers[layer].self_attn, proj).weight
            u, v = _unit(w.shape[0], g), _unit(w.shape[1], g)
            w += (0.5 * torch.outer(u, v)).float()
            us[(proj, layer)] = u
    model.save_pretrained(root / "aligned")
    fresh = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(fresh, LoraConfig(r=R, lora_alpha=2 * R, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for (proj, layer), cos in PLANTED.items():
            mod = getattr(peft_model.base_model.model.model.layers[layer].self_attn, proj)
            u = us[(proj, layer)]
            n = torch.randn(u.numel(), generator=g, dtype=torch.float64)
            n = n - (n @ u) * u
            n /= n.norm()
            col = cos * u + math.sqrt(1 - cos ** 2) * n                      # unit, cos to u as planted
            c = torch.randn(R, generator=g, dtype=torch.float64)
            mod.lora_B["default"].weight.copy_(torch.outer(col, c).float())
            mod.lora_A["default"].weight.copy_(torch.randn(R, mod.in_features, generator=g))
    peft_model.save_pretrained(root / "adapter")
    return {"root": root, "base": base, "aligned": root / "aligned", "adapter": root / "adapter"}


def _stem(proj: str, layer: int) -> str:
    return f"base_model.model.model.layers.{layer}.self_attn.{proj}"


def _reference(planted: dict, proj: str, layer: int) -> tuple[float, torch.Tensor]:
    """The original code's computation with C formed explicitly: C = VVᵀ/‖V‖_F, cos(CBA, BA), CB."""
    name = f"model.layers.{layer}.self_attn.{proj}.weight"
    v = (open_checkpoint(planted["aligned"]).get_tensor(name).double()
         - open_checkpoint(planted["base"]).get_tensor(name).double())
    c = v @ v.T / torch.linalg.matrix_norm(v)
    ad = load_file(str(planted["adapter"] / "adapter_model.safetensors"))
    a, b = ad[_stem(proj, layer) + ".lora_A.weight"].double(), ad[_stem(proj, layer) + ".lora_B.weight"].double()
    cos = torch.nn.functional.cosine_similarity((c @ b @ a).reshape(1, -1), (b @ a).reshape(1, -1)).item()
    return cos, c @ b


def test_safelora_refuses_an_output_that_would_delete_files(planted: dict, tmp_path: Path) -> None:
    """The adapter folder itself, a folder holding the aligned model, or a foreign folder with files: refused
    before any work, nothing deleted (the output folder is replaced whole)."""
    from vlsafe.analysis.errors import VlsafeError

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    before = sorted(p.name for p in planted["adapter"].iterdir())
    for out, why in ((planted["adapter"], "is or holds an input"), (planted["aligned"].parent, "is or holds an input"),
                     (foreign, "not an earlier vlsafe run folder")):
        with pytest.raises(VlsafeError, match=why):
            safelora_project(planted["adapter"], planted["aligned"], planted["base"], out, progress=False)
    assert sorted(p.name for p in planted["adapter"].iterdir()) == before
    assert (foreign / "keep.txt").read_text() == "mine"


def test_threshold_projects_outside_updates_only(planted: dict, tmp_path: Path) -> None:
    before = (planted["adapter"] / "adapter_model.safetensors").read_bytes()
    res = safelora_project(planted["adapter"], planted["aligned"], planted["base"], tmp_path / "out",
                           select="threshold", threshold=0.5, progress=False)
    assert (planted["adapter"] / "adapter_model.safetensors").read_bytes() == before   # input untouched
    t = res.table.set_index("module")
    src = load_file(str(planted["adapter"] / "adapter_model.safetensors"))
    out = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for (proj, layer), planted_cos in PLANTED.items():
        row = t.loc[_stem(proj, layer)]
        ref_cos, ref_cb = _reference(planted, proj, layer)
        assert row["cosine"] == pytest.approx(ref_cos, abs=1e-6)
        assert row["cosine"] == pytest.approx(planted_cos, abs=1e-6)
        assert row["layer"] == layer and row["tensor"] == f"model.layers.{layer}.self_attn.{proj}.weight"
        key = _stem(proj, layer) + ".lora_B.weight"
        if planted_cos <= 0.5:
            assert row["projected"] and row["pdst"] == pytest.approx(1.0)
            torch.testing.assert_close(out[key].double(), ref_cb, atol=1e-6, rtol=1e-5)
        else:
            assert not row["projected"] and row["pdst"] < 1.0
            assert torch.equal(out[key], src[key])
        assert torch.equal(out[key.replace("lora_B", "lora_A")], src[key.replace("lora_B", "lora_A")])
    assert res.summary["projected"] == 2 and res.summary["tau"] == 0.5
    # the orthogonal update is removed entirely (CB = 0), the in-subspace one survives
    assert out[_stem("q_proj", 1) + ".lora_B.weight"].abs().max() < 1e-6
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == R
    # the projected adapter is a real peft adapter: merged, it adds scaling·B'A to the base weight
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(planted["base"]),
                                       tmp_path / "out").merge_and_unload()
    name = "model.layers.0.self_attn.v_proj.weight"                       # a projected module
    key = _stem("v_proj", 0) + ".lora_"
    want = open_checkpoint(planted["base"]).get_tensor(name) + 2.0 * out[key + "B.weight"] @ out[key + "A.weight"]
    torch.testing.assert_close(merged.state_dict()[name], want, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "out" / "safelora.csv").is_file()
    rec = json.loads((tmp_path / "out" / "run.json").read_text())
    assert (rec["kind"], rec["tables"]) == ("safelora", {"safelora": "safelora.csv"})


def test_number_mode_selects_k_smallest_without_mutation(planted: dict, tmp_path: Path) -> None:
    thr = safelora_project(planted["adapter"], planted["aligned"], planted["base"], tmp_path / "thr",
                           progress=False).table.set_index("module")
    one = safelora_project(planted["adapter"], planted["aligned"], planted["base"], tmp_path / "one",
                           select="number", num=1, progress=False)
    t = one.table.set_index("module")
    assert set(t.index[t["projected"]]) == {_stem("q_proj", 1)}
    assert one.summary["tau"] == pytest.approx(0.0, abs=1e-6)
    src = load_file(str(planted["adapter"] / "adapter_model.safetensors"))
    out = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    for proj, layer in (("q_proj", 0), ("v_proj", 0), ("v_proj", 1)):  # measured, below τ=0.5 or not: untouched
        key = _stem(proj, layer) + ".lora_B.weight"
        assert torch.equal(out[key], src[key])
    # cosines of the selection pass are independent of the mode: nothing was projected while measuring
    assert t["cosine"].to_dict() == thr["cosine"].to_dict()
    three = safelora_project(planted["adapter"], planted["aligned"], planted["base"], tmp_path / "three",
                             select="number", num=3, progress=False).table.set_index("module")
    assert set(three.index[three["projected"]]) == {_stem("q_proj", 1), _stem("v_proj", 0), _stem("v_proj", 1)}


def test_orthonormal_variant_is_idempotent_and_keeps_subspace_updates(planted: dict, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    v = torch.randn(16, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 12, generator=g, dtype=torch.float64)
    b = torch.randn(16, 2, generator=g, dtype=torch.float64)
    ortho, orig = projector(v, "orthonormal", rank=3), projector(v, "original")
    torch.testing.assert_close(ortho(ortho(b)), ortho(b))
    assert not torch.allclose(orig(orig(b)), orig(b))              # the paper's C is not a projection
    assert projector(v, "orthonormal", energy=1.0)(b).shape == b.shape
    res = safelora_project(planted["adapter"], planted["aligned"], planted["base"], tmp_path / "o",
                           projection="orthonormal", rank=1, progress=False).table.set_index("module")
    for (proj, layer), planted_cos in PLANTED.items():         # rank-1 V: QQᵀ = uuᵀ, same cosines
        assert res.loc[_stem(proj, layer), "cosine"] == pytest.approx(planted_cos, abs=1e-6)


def test_select_modules_is_pure_and_validates() -> None:
    cos = {"a": 0.9, "b": 0.1, "c": float("nan"), "d": 0.4}
    frozen = dict(cos)
    assert select_modules(cos, "threshold", threshold=0.5) == ({"b", "d"}, 0.5)
    assert select_modules(cos, "number", num=1) == ({"b"}, 0.1)
    assert select_modules(cos, "number", num=10)[0] == {"a", "b", "d"}
    assert cos.keys() == frozen.keys() and all(cos[k] == frozen[k] or k == "c" for k in cos)
    with pytest.raises(VlsafeError, match="valid: threshold, number"):
        select_modules(cos, "top")


def test_safelora_bad_inputs(planted: dict, tmp_path: Path) -> None:
    with pytest.raises(VlsafeError, match="not a peft adapter"):
        safelora_project(tmp_path, planted["aligned"], planted["base"], tmp_path / "x", progress=False)
    with pytest.raises(VlsafeError, match="valid: original, orthonormal"):
        safelora_project(planted["adapter"], planted["aligned"], planted["base"], tmp_path / "x",
                         projection="qr", progress=False)
    other = tiny_llama(tmp_path / "wide", hidden=32, seed=5)
    with pytest.raises(VlsafeError, match="does not fit"):
        safelora_project(planted["adapter"], other, planted["base"], tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


# ---- RESTA ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resta")
    return {k: tiny_llama(root / k, seed=s) for k, s in (("sft", 0), ("aligned", 1), ("unaligned", 2))}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return dict(open_checkpoint(path).iter_tensors())


def test_resta_equals_sft_plus_beta_delta(trio: dict[str, Path], tmp_path: Path) -> None:
    out = resta(str(trio["sft"]), str(trio["aligned"]), str(trio["unaligned"]), tmp_path / "r", beta=0.7,
                progress=False)
    got, s, a, u = (_tensors(p) for p in (out, trio["sft"], trio["aligned"], trio["unaligned"]))
    assert got.keys() == s.keys()
    rec = json.loads((out / "run.json").read_text())
    assert (rec["kind"], rec["command"], rec["tables"]) == ("resta", "resta", {})
    for name in s:
        want = s[name].double() + 0.7 * (a[name].double() - u[name].double())
        torch.testing.assert_close(got[name].double(), want, atol=1e-6, rtol=0)
    # layer-targeted: layer 0 keeps the SFT weights exactly
    out1 = resta(str(trio["sft"]), str(trio["aligned"]), str(trio["unaligned"]), tmp_path / "r1", beta=0.7,
                 layers=[1], progress=False)
    got1 = _tensors(out1)
    assert all(torch.equal(got1[n], s[n]) for n in s if not n.startswith("model.layers.1."))
    assert not torch.equal(got1["model.layers.1.mlp.down_proj.weight"], s["model.layers.1.mlp.down_proj.weight"])


def test_resta_dare_sparsifies_only_the_safety_vector(trio: dict[str, Path], tmp_path: Path) -> None:
    args = (str(trio["sft"]), str(trio["aligned"]), str(trio["unaligned"]))
    out = resta(*args, tmp_path / "d1", beta=0.5, density=0.5, seed=7, progress=False)
    again = resta(*args, tmp_path / "d2", beta=0.5, density=0.5, seed=7, progress=False)
    got, s, a, u = (_tensors(p) for p in (out, *trio.values()))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(got[name], _tensors(again)[name])                      # seeded
    added = (got[name].double() - s[name].double())
    delta = 0.5 * (a[name].double() - u[name].double())
    kept = added.abs() > 1e-5
    assert 0.4 < kept.double().mean() < 0.6                                   # about half of δ survives
    ratio = added[kept] / delta[kept]
    assert torch.allclose(ratio, ratio.median().expand_as(ratio), atol=1e-3)  # one L1 rescale per tensor
    assert abs(added.abs().sum() / delta.abs().sum() - 1) < 1e-3               # L1 norm preserved
    with pytest.raises(VlsafeError, match="outside"):
        resta(*args, tmp_path / "bad", density=1.5, progress=False)


def test_resta_on_an_lvlm_touches_the_language_model_only(trio: dict[str, Path], tmp_path: Path) -> None:
    lvlm = tiny_llava(tmp_path / "lvlm", seed=3)
    out = resta(str(lvlm), str(trio["aligned"]), str(trio["unaligned"]), tmp_path / "r", beta=0.3, progress=False)
    ck = open_checkpoint(out)
    assert ck.family.is_lvlm
    got, s, a, u = _tensors(out), _tensors(lvlm), _tensors(trio["aligned"]), _tensors(trio["unaligned"])
    for name, t in s.items():
        if name.startswith(("vision.", "projector.")):
            assert torch.equal(got[name], t)
        else:
            torch.testing.assert_close(got[name].double(), t.double() + 0.3 * (a[name].double() - u[name].double()),
                                       atol=1e-6, rtol=0)


def test_cli_safelora_and_resta(planted: dict, trio: dict[str, Path], tmp_path: Path) -> None:
    from vlsafe.experiments.cli import main

    args = ["safelora", str(planted["adapter"]), "--aligned", str(planted["aligned"]), "--base",
            str(planted["base"]), "-o", str(tmp_path / "s"), "--quiet"]
    assert main(args) == 0
    api = safelora_project(planted["adapter"], planted["aligned"], planted["base"], tmp_path / "api", progress=False)
    assert load_file(str(tmp_path / "s" / ADAPTER_FILE)).keys() == load_file(str(tmp_path / "api" / ADAPTER_FILE)).keys()
    assert all(torch.equal(a, b) for a, b in zip(load_file(str(tmp_path / "s" / ADAPTER_FILE)).values(),
                                                 load_file(str(tmp_path / "api" / ADAPTER_FILE)).values()))
    assert main(args[:-3] + ["-o", str(tmp_path / "bad"), "--select", "best"]) == 2
    assert not (tmp_path / "bad").exists()
    r = ["resta", str(trio["sft"]), "--aligned", str(trio["aligned"]), "--unaligned", str(trio["unaligned"]),
         "-o", str(tmp_path / "r"), "--beta", "0.7", "--layers", "1", "--quiet"]
    assert main(r) == 0
    api = resta(str(trio["sft"]), str(trio["aligned"]), str(trio["unaligned"]), tmp_path / "r_api", beta=0.7,
                layers=[1], progress=False)
    got, want = _tensors(tmp_path / "r"), _tensors(api)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert main(r[:-4] + ["-o", str(tmp_path / "r2"), "--layers", "9", "--quiet"]) == 2
