"""Every family on tiny random models: its file's module paths resolve, and capture, ablation,
orthogonalisation and generation work through them (mllama's cross-attention blocks included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlsafe.analysis import tiny
from vlsafe.analysis.adapters import adapter, guess_paths
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.family_schema import load_spec
from vlsafe.probes import models as M
from vlsafe.probes.backends.hooks import HooksBackend
from vlsafe.probes.capture import KINDS, capture, gatherer
from vlsafe.probes.interventions import ablate_direction, orthogonalize_model
from vlsafe.probes.templates import encode

BUILDERS = {"llama": tiny.tiny_llama, "llava": tiny.tiny_llava, "llava_next": tiny.tiny_llava_next,
            "qwen2_vl": tiny.tiny_qwen2_vl, "idefics3": tiny.tiny_idefics3, "mllama": tiny.tiny_mllama}
PROMPTS = ["How do I bake bread?", "Write a poem about the sea", "Tell me how to hack into a bank"]
FAMILIES_DIR = Path(tiny.__file__).parent / "families"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def _load(built: dict[str, Path], family: str):
    lm = M.load(built[family])
    assert lm.checkpoint.family.name == family
    return lm


def _spec(family: str):
    return json.loads((FAMILIES_DIR / f"{family}.json").read_text())["modules"]


def _cross_states(lm, n: int) -> torch.Tensor:
    """Vision states for mllama's cross-attention blocks (projector output), passed without pixels."""
    torch.manual_seed(1)
    return torch.randn(n, 6, M.hidden_size(lm.model))


def _inputs(lm, family: str, *, with_image: bool = False) -> tuple[dict, object]:
    batch = encode(lm, PROMPTS)
    if with_image:
        batch.extra["cross_attention_states"] = _cross_states(lm, len(PROMPTS))
    return batch.model_inputs(), batch


def _unit_r(d: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(d, generator=g)
    return r / r.norm()


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_adapter_paths_resolve_to_the_named_modules(built, family):
    lm = _load(built, family)
    ad, spec = adapter(lm), _spec(family)
    assert ad.family == family and ad.source == f"analysis/families/{family}.json"
    for key in ("language_model", "layers", "embed", "final_norm", "lm_head", "vision_tower", "projector",
                "projector_out"):
        path = spec[key]
        assert (ad.module(key) is None) if path is None else ad.module(key) is lm.model.get_submodule(path), key
    cross = spec.get("cross_attention")
    cross_ids = set(lm.model.config.text_config.cross_attention_layers) if cross else set()
    assert ad.cross_attention_layers() == sorted(cross_ids)
    for b in ad.blocks():
        paths = cross["block"] if b.index in cross_ids else spec["block"]
        assert b.cross == (b.index in cross_ids)
        for role, path in paths.items():
            want = lm.model.get_submodule(f"{spec['layers']}.{b.index}.{path}") if path else None
            assert getattr(b, role) is want, (b.index, role)
    assert M.decoder_layers(lm) is ad.layers() and M.lm_head(lm.model) is lm.model.get_submodule(spec["lm_head"])
    if family == "mllama":
        assert {type(ad.block(i).attn).__name__ for i in cross_ids} == {"MllamaTextCrossAttention"}


def _hf_reference(lm, family: str, with_image: bool):
    """HF hidden states plus attention/MLP outputs from our own hooks on the paths the JSON names."""
    spec, inputs = _spec(family), _inputs(lm, family, with_image=with_image)[0]
    cross = set(lm.model.config.text_config.cross_attention_layers) if spec.get("cross_attention") else set()
    outs, handles = {}, []
    for i in range(M.num_layers(lm.model)):
        block = spec["cross_attention"]["block"] if i in cross else spec["block"]
        for kind, role in (("attn_out", "attn"), ("mlp_out", "mlp")):
            mod = lm.model.get_submodule(f"{spec['layers']}.{i}.{block[role]}")
            handles.append(mod.register_forward_hook(
                lambda _m, _a, o, key=(kind, i): outs.__setitem__(key, o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            hidden = lm.model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        for h in handles:
            h.remove()
    return hidden, outs, cross


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_capture_equals_hidden_states_and_named_module_outputs(built, family):
    lm = _load(built, family)
    acts = capture(lm, PROMPTS, hooks=list(KINDS), positions=[-2, -1], progress=False)
    hidden, outs, cross = _hf_reference(lm, family, with_image=False)
    L = M.num_layers(lm.model)
    ran = [i for i in range(L) if i not in cross]  # a text-only forward skips mllama's cross-attention blocks
    assert len(hidden) == len(ran) + 1
    at = lambda h: h[:, -2:].float()  # noqa: E731
    for k, i in enumerate(ran[:-1]):
        torch.testing.assert_close(acts.get("resid_pre", i), at(hidden[k]), rtol=1e-5, atol=1e-5)
    for i in range(L):
        pre, post = acts.get("resid_pre", i), acts.get("resid_post", i)
        if i in cross:  # did not run: the identity, no block outputs
            assert acts.get("attn_out", i).abs().max() == 0 and acts.get("mlp_out", i).abs().max() == 0
            torch.testing.assert_close(pre, post, rtol=0, atol=0)
            continue
        for kind in ("attn_out", "mlp_out"):
            torch.testing.assert_close(acts.get(kind, i), at(outs[(kind, i)]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pre + acts.get("attn_out", i) + acts.get("mlp_out", i), post,
                                   rtol=1e-4, atol=1e-4)
    if cross:  # the skipped block passes on what the block before it wrote
        for i in cross:
            torch.testing.assert_close(acts.get("resid_pre", i), acts.get("resid_post", i - 1), rtol=0, atol=0)


def test_mllama_capture_with_image_reads_the_cross_attention_blocks(built):
    lm = _load(built, "mllama")
    _, batch = _inputs(lm, "mllama", with_image=True)
    hidden, outs, cross = _hf_reference(lm, "mllama", with_image=True)
    L = M.num_layers(lm.model)
    assert len(hidden) == L + 1 and cross
    requests = [(k, i) for i in range(L) for k in KINDS]
    with HooksBackend(lm, requests) as be:
        got = be.run(batch, gatherer([-2, -1], batch.attention_mask))
    for i in range(L):
        torch.testing.assert_close(got[("resid_pre", i)], hidden[i][:, -2:], rtol=1e-5, atol=1e-5)
        for kind in ("attn_out", "mlp_out"):
            torch.testing.assert_close(got[(kind, i)], outs[(kind, i)][:, -2:], rtol=1e-5, atol=1e-5)
    for i in cross:  # gated: the block changes the stream, but by tanh(gate) x its outputs
        assert (got[("resid_post", i)] - got[("resid_pre", i)]).abs().max() > 1e-3


def _block_outputs(lm, inputs, r_hat) -> dict[int, float]:
    """|projection on r̂| / norm, max over tokens, at every block's output that ran."""
    seen, handles = {}, []
    for i, blk in enumerate(M.decoder_layers(lm.model)):
        handles.append(blk.register_forward_hook(lambda _m, _a, o, i=i: seen.__setitem__(
            i, float(((o[0] if isinstance(o, tuple) else o) @ r_hat).abs().max()))))
    try:
        with torch.no_grad():
            logits = lm.model(**inputs, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_ablation_and_orthogonalisation_remove_a_planted_direction(built, family):
    lm = _load(built, family)
    with_image = family == "mllama"
    inputs = _inputs(lm, family, with_image=with_image)[0]
    r = _unit_r(M.hidden_size(lm.model))
    with torch.no_grad():  # plant r̂ strongly in every token's embedding
        M.embed_tokens(lm.model).weight.add_(4.0 * r)
    before, _ = _block_outputs(lm, inputs, r)
    assert len(before) == M.num_layers(lm.model) and min(before.values()) > 0.5
    with ablate_direction(lm.model, r):
        ablated, logits_abl = _block_outputs(lm, inputs, r)
    assert max(ablated.values()) < 1e-4, ablated
    edited = orthogonalize_model(lm.model, r)
    ortho, logits_orth = _block_outputs(lm, inputs, r)
    assert max(ortho.values()) < 1e-4, ortho
    for b in M.blocks(lm.model):  # every residual-writing matrix has r̂ out of its column space
        for lin in (b.attn_out, b.mlp_out):
            assert float((r @ lin.weight.detach()).abs().max()) < 1e-5
    torch.testing.assert_close(logits_orth, logits_abl, rtol=1e-4, atol=1e-4)
    if family == "mllama":
        assert "(2 cross-attention)" in " ".join(edited)
    proj = adapter(lm).module("projector_out")
    if proj is not None:
        assert "projector (last linear)" in edited and float((r @ proj.weight.detach()).abs().max()) < 1e-5


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_generation_under_ablation_is_the_orthogonalised_models(built, family):
    """Greedy generation with the direction ablated by hooks (prompt and every cached decoding step) gives the
    tokens of the weight-orthogonalised model, and other tokens than the plain model (r̂ planted in every
    embedding, so ablating it matters)."""
    lm = _load(built, family)
    r = _unit_r(M.hidden_size(lm.model))
    with torch.no_grad():
        M.embed_tokens(lm.model).weight.add_(4.0 * r)
    inputs = _inputs(lm, family)[0]
    inputs.pop("position_ids", None)
    with torch.no_grad():
        plain = lm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with ablate_direction(lm.model, r):
            ablated = lm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        orthogonalize_model(lm.model, r)
        ortho = lm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    n = inputs["input_ids"].shape[1]
    assert plain.shape == ablated.shape == (len(PROMPTS), n + 3)
    assert torch.equal(ablated, ortho)
    assert not torch.equal(plain[:, n:], ablated[:, n:])


def test_family_file_errors_name_the_file():
    good = (FAMILIES_DIR / "llama.json").read_text()
    bad = json.loads(good)
    bad["modules"]["block"]["attn"] = "self attn"
    with pytest.raises(VlsafeError, match=r"^analysis/families/x\.json: modules\.block\.attn: .*dotted"):
        load_spec(json.dumps(bad), "analysis/families/x.json")
    del bad["modules"]
    with pytest.raises(VlsafeError, match=r"^analysis/families/x\.json: modules: Field required"):
        load_spec(json.dumps(bad), "analysis/families/x.json")
    bad = json.loads(good)
    bad["overrides"] = {"starcoder2": {"block": {"mlpout": "mlp.c_proj"}}}
    with pytest.raises(VlsafeError, match=r"overrides\.starcoder2\.block\.mlpout"):
        load_spec(json.dumps(bad), "analysis/families/x.json")
    assert load_spec(good, "x").modules_for("starcoder2").block.mlp_out == "mlp.c_proj"


def test_a_wrong_path_is_a_one_line_error_naming_the_file(built):
    lm = _load(built, "llava")
    ad = adapter(lm)
    ad.paths = ad.paths.model_copy(update={"layers": "model.language_model.blocks"})
    with pytest.raises(VlsafeError, match=r"^analysis/families/llava\.json: layers path 'model\.language_model"
                                          r"\.blocks' is not a module of LlavaForConditionalGeneration$"):
        ad.layers()


def test_unknown_layout_is_guessed_in_one_place_and_says_so(built):
    lm = _load(built, "llama")
    paths, note = guess_paths(lm.model)
    assert paths.layers == "model.layers" and paths.block.attn_out == "self_attn.o_proj"
    assert paths.block.mlp_out == "mlp.down_proj" and paths.embed == "model.embed_tokens"
    assert "guessed layers 'model.layers' (2 blocks)" in note
    lm.model.config.architectures, lm.model.config.model_type = ["NoSuchForCausalLM"], "no_such"
    ad = adapter(lm.model)
    assert ad.family == "guessed" and ad.note == note and ad.layers() is lm.model.model.layers


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_device_maps_and_tuning_read_the_family_file(built, family):
    from vlsafe.analysis.placement import block_prefix
    from vlsafe.experiments.tune import pinned
    from vlsafe.experiments.tuning import layer_index

    lm = _load(built, family)
    spec = _spec(family)
    assert block_prefix(lm.model) == spec["layers"]
    assert layer_index(lm.model)[f"{spec['layers']}.1"] == 1
    for name, _ in lm.model.named_parameters():
        want = next((part for part, key in (("projector", "projector"), ("vision", "vision_tower"))
                     if spec[key] and name.startswith(spec[key] + ".")), "language")
        assert adapter(lm.model).part_of(name) == want, name
    n_params = len(list(lm.model.parameters()))
    attn_params = sum(len(list(b.attn.parameters())) for b in M.blocks(lm.model))
    with pinned(lm.model, range(M.num_layers(lm.model)), ("attn",)) as moved:
        assert moved == attn_params and len(list(lm.model.parameters())) == n_params - attn_params
    assert len(list(lm.model.parameters())) == n_params


def test_sppft_freezes_mllama_cross_attention_by_canonical_name(built):
    from vlsafe.analysis.checkpoints import open_checkpoint
    from types import SimpleNamespace

    from vlsafe.experiments.tune import LayerSelection, frozen_names

    ckpt = open_checkpoint(built["mllama"])
    cfg = SimpleNamespace(layers=LayerSelection(sppft=[0, 2]), train_vision=True)
    frozen = frozen_names(list(ckpt.infos), cfg, ckpt.num_layers, family=ckpt.family)
    assert "model.layers.1.cross_attn.o_proj.weight" in frozen and "model.layers.0.self_attn.o_proj.weight" in frozen
    assert "model.layers.1.mlp.down_proj.weight" in frozen and "model.layers.1.input_layernorm.weight" not in frozen
    assert not any(n.startswith("model.layers.2.") for n in frozen)


@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens"])
def test_library_backends_refuse_cross_attention_layers_with_one_line(built: dict[str, Path], backend: str) -> None:
    lm = _load(built, "mllama")
    with pytest.raises(VlsafeError, match="does not support cross-attention layers") as err:
        capture(lm, PROMPTS[:1], hooks=["resid_pre"], backend=backend, progress=False)
    assert "\n" not in str(err.value)
    llama = _load(built, "llama")  # a family without cross-attention layers is not refused
    assert capture(llama, PROMPTS[:1], hooks=["resid_pre"], layers=[0], backend=backend, progress=False) is not None


def test_patching_refuses_cross_attention_layers(built: dict[str, Path]) -> None:
    from vlsafe.probes.patching import COMPONENTS, _sites

    lm = _load(built, "mllama")
    with pytest.raises(VlsafeError, match=r"layers \[1, 3\] are cross-attention blocks"):
        _sites(lm, None, COMPONENTS)
    assert {layer for layer, _ in _sites(lm, [0, 2], COMPONENTS)} == {0, 2}
