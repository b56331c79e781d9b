"""`vlsafe export-remedy`: a constant steering remedy folded into biases gives the hooked model's logits (tiny
Llama, tied or not, layer 0 and later; tiny LLaVA with an image), reloads in transformers; bad specs write nothing."""

from __future__ import annotations

import json

import pytest
import torch

from _remedy_helpers import PROMPT, PROMPTS, _direction_file, _logits, _noise_image, _spec, _vec
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.tiny import tiny_llama, tiny_llava, tiny_qwen2_vl
from vlsafe.experiments.cli import main
from vlsafe.probes.models import load
from vlsafe.probes.remedies import apply_remedy
from vlsafe.probes.remedy_export import export_remedy
from vlsafe.probes.templates import encode


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return load(tiny_llava(tmp_path_factory.mktemp("rem") / "llava", vision="clip", seed=1))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load(tiny_llama(tmp_path_factory.mktemp("rem") / "llama", seed=2))


# ---- export --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [[0], [1], [0, 1]], ids=["layer0", "layer1", "layer0+1"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_exported_steering_llama_equals_hooks(tmp_path, layers, tied):
    from transformers import AutoModelForCausalLM

    src = tiny_llama(tmp_path / "src", seed=4, tie_word_embeddings=tied)
    lm = load(src)
    v = _vec(31, 2)
    spec = _spec("steer", tmp_path, layers=layers, alpha=2.0,
                 direction={"file": _direction_file(tmp_path, v), "unit": False})
    batch = encode(lm, PROMPTS)
    with apply_remedy(lm, spec):
        hooked = _logits(lm, batch)
    assert (hooked - _logits(lm, batch)).abs().max() > 1e-3
    out = export_remedy(spec, tmp_path / "out", checkpoint=src)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = model(**batch.model_inputs()).logits[batch.attention_mask.bool()]
    torch.testing.assert_close(got, hooked, atol=1e-5, rtol=1e-5)
    assert json.loads((out / "run.json").read_text())["kind"] == "export_remedy"
    assert json.loads((out / "config.json").read_text())["mlp_bias"] is (layers != [0])


@pytest.mark.parametrize("layers", [[0], [1]], ids=["layer0", "layer1"])
def test_exported_steering_llava_with_an_image_equals_hooks(llava, tmp_path, layers):
    from transformers import LlavaForConditionalGeneration

    v = _vec(32)
    spec = _spec("steer", tmp_path, layers=layers, alpha=1.0, direction={"file": _direction_file(tmp_path, v)})
    batch = encode(llava, [PROMPT, PROMPTS[2]], [_noise_image(), None])
    with apply_remedy(llava, spec):
        hooked = _logits(llava, batch)
    out = export_remedy(spec, tmp_path / "out", checkpoint=llava.checkpoint.spec)
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        got = model(**batch.model_inputs()).logits[batch.attention_mask.bool()]
    assert (hooked - _logits(llava, batch)).abs().max() > 1e-3
    torch.testing.assert_close(got, hooked, atol=1e-5, rtol=1e-5)


def test_export_remedy_cli_and_bad_input_writes_nothing(llama, tmp_path, capsys):
    d = _direction_file(tmp_path, _vec(61))
    spec = tmp_path / "steer.yaml"
    spec.write_text(f"kind: steer\nlayers: [1]\nalpha: 1.0\ndirection: {{file: {d}}}\n"
                    f"checkpoint: {llama.checkpoint.spec}\n")
    assert main(["export-remedy", str(spec), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "run.json").is_file()
    bad = tmp_path / "bad.yaml"
    narrow = _direction_file(tmp_path, torch.ones(8), "narrow.safetensors")
    for text in (spec.read_text().replace("layers: [1]", "layers: [9]"),
                 spec.read_text().replace("alpha: 1.0", "alpha: x"),
                 spec.read_text().replace(d, narrow),
                 spec.read_text() + "positions: last\n"):
        bad.write_text(text)
        capsys.readouterr()
        assert main(["export-remedy", str(bad), "-o", str(tmp_path / "none")]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "vlsafe: error: " in line]
        assert len(err) == 1 and err[0].startswith("vlsafe: error: "), err
        assert not (tmp_path / "none").exists()


def test_family_without_a_bias_switch_is_refused(tmp_path):
    src = tiny_qwen2_vl(tmp_path / "qwen")
    spec = _spec("steer", tmp_path, layers=[1], direction={"file": _direction_file(tmp_path, _vec(62))})
    with pytest.raises(VlsafeError, match="no 'mlp_bias' switch") as e:
        export_remedy(spec, tmp_path / "out", checkpoint=src)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
