"""Checkpoint I/O: opening every format, canonical alignment, streaming, and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlsafe.analysis.checkpoints import open_checkpoint
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.tiny import tiny_llama, tiny_llava


def _text_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_tiny_llama_opens_with_canonical_names(tiny_llama_dir: Path) -> None:
    c = open_checkpoint(tiny_llama_dir)
    assert c.family.name == "llama" and c.num_layers == 2 and c.hidden_size == 64
    info = c.infos["model.layers.1.self_attn.q_proj.weight"]
    assert (info.layer, info.module, info.namespace) == (1, "q_proj", "language")
    assert c.infos["model.layers.0.mlp.down_proj.weight"].module == "mlp.down_proj"
    assert c.infos["model.embed_tokens.weight"].module == "embed"
    assert c.num_parameters == sum(t.numel() for _, t in c.iter_tensors())


def test_llava_language_model_gets_canonical_names(tiny_llava_dir: Path) -> None:
    c = open_checkpoint(tiny_llava_dir)
    assert c.family.name == "llava" and c.family.is_lvlm
    assert c.raw_name("model.layers.0.self_attn.q_proj.weight") == "language_model.model.layers.0.self_attn.q_proj.weight"
    assert c.raw_name("lm_head.weight") == "language_model.lm_head.weight"
    assert c.names("vision") and all(n.startswith("vision.") for n in c.names("vision"))
    assert c.names("projector") == ["projector.linear_1.bias", "projector.linear_1.weight",
                                    "projector.linear_2.bias", "projector.linear_2.weight"]
    assert not c.names("other")


def test_transplant_by_canonical_names_gives_identical_text_logits(tmp_path: Path) -> None:
    """Copy a tiny Llama into a tiny LLaVA's LM purely by canonical name → identical text-only logits."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    llm_dir = tiny_llama(tmp_path / "llm", seed=1)
    llm = open_checkpoint(llm_dir)
    from transformers import LlamaConfig

    lvlm_dir = tiny_llava(tmp_path / "lvlm", seed=2, text_config=LlamaConfig(**llm.config))
    lvlm = open_checkpoint(lvlm_dir)
    shared = set(llm.names("language")) & set(lvlm.names("language"))
    assert shared == set(llm.names("language"))
    state = {lvlm.raw_name(n): (llm.get_tensor(n) if n in shared else t).contiguous() for n, t in lvlm.iter_tensors()}
    save_file(state, str(lvlm_dir / "model.safetensors"), metadata={"format": "pt"})
    a = AutoModelForCausalLM.from_pretrained(llm_dir, attn_implementation="eager").eval()
    b = LlavaForConditionalGeneration.from_pretrained(lvlm_dir, attn_implementation="eager").eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    assert torch.equal(_text_logits(a, ids), _text_logits(b, ids))


def test_sharded_and_single_file_stream_identical_tensors(tmp_path: Path) -> None:
    single = open_checkpoint(tiny_llama(tmp_path / "single", seed=3))
    sharded = open_checkpoint(tiny_llama(tmp_path / "sharded", seed=3, max_shard_size="40KB"))
    assert len(sharded.source.files) > 2
    a = dict(single.iter_tensors())
    b_items = list(sharded.iter_tensors())
    assert set(a) == {n for n, _ in b_items}
    assert all(torch.equal(a[n], t) for n, t in b_items)
    # streamed in shard order: the shard index never goes back
    order = [sharded.source.files.index(sharded.source.tensors[sharded.raw_name(n)].file) for n, _ in b_items]
    assert order == sorted(order)
    assert torch.equal(sharded.get_tensor("model.norm.weight"), a["model.norm.weight"])
    # opening the index file directly is the same checkpoint
    via_index = open_checkpoint(tmp_path / "sharded" / "model.safetensors.index.json")
    assert set(via_index.infos) == set(a)


def test_single_safetensors_file(tiny_llama_dir: Path) -> None:
    c = open_checkpoint(tiny_llama_dir / "model.safetensors")
    assert c.family.name == "llama" and c.num_layers == 2


def test_load_model_text_and_lvlm(tiny_llama_dir: Path, tiny_llava_dir: Path) -> None:
    lm = open_checkpoint(tiny_llama_dir).load_model(dtype="float64")
    assert next(lm.model.parameters()).dtype == torch.float64 and lm.processor is None
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token is not None
    lv = open_checkpoint(tiny_llava_dir).load_model()
    assert type(lv.model).__name__ == "LlavaForConditionalGeneration" and lv.processor is not None


def test_content_hash_tracks_content(tmp_path: Path) -> None:
    a = open_checkpoint(tiny_llama(tmp_path / "a", seed=4)).content_hash()
    b = open_checkpoint(tiny_llama(tmp_path / "b", seed=4)).content_hash()
    c = open_checkpoint(tiny_llama(tmp_path / "c", seed=5)).content_hash()
    assert a == b != c


# ---- bad input: one-line errors naming the path or tensor ---------------------------------------------

def _one_line_error(spec, match: str, **kw) -> VlsafeError:
    with pytest.raises(VlsafeError, match=match) as ei:
        open_checkpoint(spec, **kw)
    assert "\n" not in str(ei.value)
    return ei.value


def test_missing_path(tmp_path: Path) -> None:
    _one_line_error(tmp_path / "nope", "nope: no such file")


def test_directory_that_is_no_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    _one_line_error(tmp_path, "holds no checkpoint")


def test_corrupt_and_truncated_safetensors(tiny_llama_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\xff" * 8 + b"garbage")
    _one_line_error(bad, "corrupt.safetensors: corrupt safetensors header")
    data = (tiny_llama_dir / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    _one_line_error(cut, "cut.safetensors: truncated safetensors file")
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    _one_line_error(tiny, "truncated")


def test_index_naming_missing_shard(tmp_path: Path) -> None:
    d = tiny_llama(tmp_path / "sh", max_shard_size="40KB")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    _one_line_error(d, f"names shard '{victim.name}', which is missing")


def test_pickle_refused_unless_allowed(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "pkl"
    shutil.copytree(tiny_llama_dir, d)
    sd = dict(open_checkpoint(tiny_llama_dir).source.iter_tensors())
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    _one_line_error(d, "pickle checkpoint refused")
    c = open_checkpoint(d, allow_pickle=True)
    assert c.source.kind == "pickle" and torch.equal(c.get_tensor("lm_head.weight"), sd["lm_head.weight"])
    lm = c.load_model()
    assert lm.model.config.num_hidden_layers == 2


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, p)
    _one_line_error(p, "weights_only=True", allow_pickle=True)


def test_trust_remote_code_off_unless_asked(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "remote"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VlsafeError, match="trust_remote_code"):
        open_checkpoint(d).load_model()


def test_gguf_hash_mismatch() -> None:
    from vlsafe.analysis.resolve import default_gguf, gguf_to_hf

    with pytest.raises(VlsafeError, match="sha256 .* does not match"):
        gguf_to_hf(default_gguf(), expected_sha256="0" * 64)


def test_hub_id_while_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _one_line_error("vlsafe-test-org/no-such-model", "vlsafe-test-org/no-such-model: hub id not in the local HF cache")


def test_unknown_family_fallback_is_explained(tmp_path: Path) -> None:
    t = {f"backbone.layers.{i}.mixer.weight": torch.randn(4, 4) for i in range(3)}
    t["backbone.embed_tokens.weight"] = torch.randn(10, 4)
    t["vision_encoder.layers.0.fc.weight"] = torch.randn(4, 4)
    t["mm_projector.0.weight"] = torch.randn(4, 4)
    t["lm_head.weight"] = torch.randn(10, 4)
    save_file(t, str(tmp_path / "model.safetensors"))
    c = open_checkpoint(tmp_path)
    assert c.family.name == "guessed" and "backbone.layers.N" in c.family.note
    assert c.raw_name("model.layers.2.mixer.weight") == "backbone.layers.2.mixer.weight"
    assert c.infos["model.layers.2.mixer.weight"].layer == 2
    assert c.raw_name("projector.0.weight") == "mm_projector.0.weight"
    assert c.raw_name("vision.layers.0.fc.weight") == "vision_encoder.layers.0.fc.weight"


def test_unknown_family_without_layers_is_an_error(tmp_path: Path) -> None:
    save_file({"transformer.h.0.attn.weight": torch.randn(2, 2)}, str(tmp_path / "model.safetensors"))
    _one_line_error(tmp_path, "unknown checkpoint family")
