"""Families as data: each family's raw layouts map to the same canonical names."""

from __future__ import annotations

import pytest

from vlsafe.analysis import names as N
from vlsafe.analysis.errors import VlsafeError

Q = "self_attn.q_proj.weight"
CASES = {
    "llama": {f"model.layers.3.{Q}": f"model.layers.3.{Q}", "lm_head.weight": "lm_head.weight"},
    "llava": {
        f"language_model.model.layers.3.{Q}": f"model.layers.3.{Q}",  # saved layout
        f"model.language_model.layers.3.{Q}": f"model.layers.3.{Q}",  # in-memory layout
        "language_model.lm_head.weight": "lm_head.weight",
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": "vision.vision_model.encoder.layers.0.mlp.fc1.weight",
        "model.multi_modal_projector.linear_2.bias": "projector.linear_2.bias",
    },
    "llava_next": {"image_newline": "projector.image_newline",
                   "language_model.model.norm.weight": "model.norm.weight"},
    "llava_original": {
        "model.mm_projector.0.weight": "projector.linear_1.weight",  # by role, as llava-hf's linear_1
        "model.mm_projector.2.bias": "projector.linear_2.bias",
        "model.vision_tower.vision_tower.vision_model.post_layernorm.weight":
            "vision.vision_model.post_layernorm.weight",
        f"model.layers.3.{Q}": f"model.layers.3.{Q}",
    },
    "qwen2_vl": {
        f"model.layers.3.{Q}": f"model.layers.3.{Q}",
        f"model.language_model.layers.3.{Q}": f"model.layers.3.{Q}",
        "visual.blocks.0.attn.qkv.weight": "vision.blocks.0.attn.qkv.weight",
        "model.visual.merger.mlp.0.weight": "projector.mlp.0.weight",
    },
    "mllama": {
        "language_model.model.layers.3.cross_attn.q_proj.weight": "model.layers.3.cross_attn.q_proj.weight",
        "vision_model.transformer.layers.0.mlp.fc1.weight": "vision.transformer.layers.0.mlp.fc1.weight",
        "multi_modal_projector.weight": "projector.weight",
    },
    "idefics3": {
        f"model.text_model.layers.3.{Q}": f"model.layers.3.{Q}",
        "model.connector.modality_projection.proj.weight": "projector.modality_projection.proj.weight",
        "model.vision_model.post_layernorm.weight": "vision.post_layernorm.weight",
    },
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_family_rules(family: str) -> None:
    fam = N.families()[family]
    for raw, canon in CASES[family].items():
        assert fam.canonical(raw) == canon, raw


def test_every_shipped_family_is_tested() -> None:
    assert set(N.families()) == set(CASES)


def test_match_prefers_architectures_over_model_type() -> None:
    cfg = {"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"]}  # original LLaVA config
    assert N.match_family(cfg).name == "llava_original"
    assert N.match_family({"model_type": "llava"}).name == "llava"
    assert N.match_family({"model_type": "something_new"}) is None


def test_layer_module_axis() -> None:
    assert N.layer_module(f"model.layers.12.{Q}") == (12, "q_proj")
    assert N.layer_module("model.layers.0.mlp.down_proj.weight") == (0, "mlp.down_proj")
    assert N.layer_module("model.layers.0.input_layernorm.weight") == (0, "input_layernorm")
    assert N.layer_module("model.layers.4.cross_attn.q_proj.weight") == (4, "cross_attn.q_proj")
    assert N.layer_module("model.embed_tokens.weight") == (None, "embed")
    assert N.layer_module("model.norm.weight") == (None, "norm")
    assert N.layer_module("lm_head.weight") == (None, "lm_head")
    assert N.layer_module("vision.encoder.layers.0.fc1.weight") == (None, "vision")
    assert N.layer_module("projector.linear_1.weight") == (None, "projector")


def test_mllama_cross_attention_layers_marked() -> None:
    fam = N.families()["mllama"]
    cfg = {"model_type": "mllama", "text_config": {"cross_attention_layers": [3, 8, 13]}}
    assert N.cross_attention_layers(cfg, fam) == [3, 8, 13]
    assert N.cross_attention_layers({"model_type": "llama"}, N.families()["llama"]) == []


def test_collisions_are_errors() -> None:
    fam = N.families()["llava"]
    with pytest.raises(VlsafeError, match="both map to 'model.norm.weight'"):
        N.canonicalize(["language_model.model.norm.weight", "model.language_model.norm.weight"], fam, "x")


def _original_llava_layout(hf_dir, out_dir):
    """The tiny llava-hf checkpoint re-saved under the original LLaVA names (`LlavaLlamaForCausalLM`)."""
    import json

    from safetensors.torch import load_file, save_file

    src = load_file(str(next(hf_dir.glob("*.safetensors"))))
    moves = [("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
             ("vision_tower.", "model.vision_tower.vision_tower."),
             ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
             ("multi_modal_projector.linear_2.", "model.mm_projector.2.")]
    out = {}
    for name, t in src.items():
        old, new = next((o, n) for o, n in moves if name.startswith(o))
        out[new + name[len(old):]] = t.clone()
    out_dir.mkdir()
    save_file(out, str(out_dir / "model.safetensors"))
    text = json.loads((hf_dir / "config.json").read_text())["text_config"]
    cfg = {**text, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "mm_hidden_size": 32}
    (out_dir / "config.json").write_text(json.dumps(cfg))
    return out


def test_projector_pairs_across_llava_layouts_by_role(tiny_llava_dir, tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    from vlsafe.analysis.checkpoints import open_checkpoint
    from vlsafe.analysis.weightshift import diff_checkpoints

    raw = _original_llava_layout(tiny_llava_dir, tmp_path / "orig")
    hf, orig = open_checkpoint(tiny_llava_dir), open_checkpoint(tmp_path / "orig")
    assert (hf.family.name, orig.family.name) == ("llava", "llava_original")
    assert hf.raw_name("projector.linear_1.weight") == "multi_modal_projector.linear_1.weight"
    assert orig.raw_name("projector.linear_1.weight") == "model.mm_projector.0.weight"  # merges write raw names
    assert orig.raw_name("projector.linear_2.bias") == "model.mm_projector.2.bias"
    assert sorted(hf.infos) == sorted(orig.infos)
    raw["model.mm_projector.2.weight"] += 0.5  # a planted change in the original layout's second linear
    save_file(raw, str(tmp_path / "orig" / "model.safetensors"))
    df = diff_checkpoints(tiny_llava_dir, tmp_path / "orig", progress=False).set_index("tensor")
    assert set(df["status"]) == {"paired"} and len(df) == len(hf.infos)
    changed = df[df["max_abs"] > 0].index.tolist()
    assert changed == ["projector.linear_2.weight"]
    assert torch.equal(hf.get_tensor("projector.linear_1.weight"), orig.get_tensor("projector.linear_1.weight"))
