"""Models spread over devices: a tiny Llama/LLaVA with block 1 offloaded to disk (accelerate, via transformers'
`device_map` + `offload_folder`) gives the same activations (all three capture backends), the same greedy
generations and the same ablated/steered logits as the plain load. A CUDA variant (block 0 on the GPU, block 1
on the CPU) runs where a GPU exists."""

from __future__ import annotations

import pytest
import torch

from vlsafe.analysis.checkpoints import open_checkpoint
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.placement import build_device_map, input_device, offloaded, resolve_device
from vlsafe.probes.capture import capture
from vlsafe.probes.interventions import ablate_direction, add_direction, orthogonalize_model
from vlsafe.probes.templates import blank_image, encode

PROMPTS = ["How do I bake bread?", "Write a poem about the sea, please.", "Why?"]
HOOKS = ["resid_pre", "resid_post", "attn_out", "mlp_out"]


@pytest.fixture(scope="module")
def plain(tiny_llama_dir):
    return open_checkpoint(tiny_llama_dir).load_model()


@pytest.fixture(scope="module")
def offload(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload")
    return open_checkpoint(tiny_llama_dir).load_model(device_map={1: "disk"}, offload_folder=folder)


def _max_diff(a, b) -> float:
    assert a.requests == b.requests
    return max(float((a.get(k, l) - b.get(k, l)).abs().max()) for k, l in a.requests)


def test_block_one_really_is_on_disk(offload, plain):
    assert offload.model.hf_device_map["model.layers.1"] == "disk"
    away = offloaded(offload.model)
    assert away and all(n.startswith("model.layers.1.") for n in away)
    assert input_device(offload.model) == torch.device("cpu")
    assert not hasattr(plain.model, "hf_device_map") and not offloaded(plain.model)  # default load unchanged


@pytest.mark.parametrize("backend", ["hooks", "nnsight", "transformer_lens"])
def test_capture_matches_plain_load(plain, offload, backend):
    kw = dict(hooks=HOOKS, positions=[-1, -2, "mean"], backend=backend, batch_size=2, progress=False)
    ref, got = capture(plain, PROMPTS, **kw), capture(offload, PROMPTS, **kw)
    assert float(ref.get("resid_post", 1).abs().max()) > 0
    assert _max_diff(ref, got) <= 1e-6


def test_generation_matches_plain_load(plain, offload):
    from vlsafe.probes.behavior.generate import generate

    kw = dict(max_new_tokens=8, cache=False, progress=False)
    assert generate(offload, PROMPTS, **kw) == generate(plain, PROMPTS, **kw)
    batch = encode(plain, PROMPTS)  # forced-length greedy ids: never trivially empty
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=plain.tokenizer.pad_token_id)
    with torch.inference_mode():
        a = plain.model.generate(**batch.model_inputs(position_ids=False), **gen)
        b = offload.model.generate(**batch.model_inputs(position_ids=False), **gen)
    assert a.shape[1] == batch.input_ids.shape[1] + 6 and torch.equal(a, b)


def test_interventions_match_plain_load(plain, offload):
    r = torch.randn(64, generator=torch.Generator().manual_seed(3))
    inputs = encode(plain, PROMPTS).model_inputs()
    with torch.inference_mode():
        base = plain.model(**inputs).logits
        with ablate_direction(plain.model, r):
            ref = plain.model(**inputs).logits
        with ablate_direction(offload.model, r):
            got = offload.model(**inputs).logits
        with add_direction(plain.model, 4 * r, layer=1):
            ref_add = plain.model(**inputs).logits
        with add_direction(offload.model, 4 * r, layer=1):
            got_add = offload.model(**inputs).logits
    assert float((ref - base).abs().max()) > 1e-3 and float((ref_add - base).abs().max()) > 1e-3
    assert float((ref - got).abs().max()) <= 1e-6
    assert float((ref_add - got_add).abs().max()) <= 1e-6
    with pytest.raises(VlsafeError, match="offloaded"):
        orthogonalize_model(offload.model, r)


@pytest.fixture(scope="module")
def embed_on_disk(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload_embed")
    return open_checkpoint(tiny_llama_dir).load_model(device_map={"model.embed_tokens": "disk", "lm_head": "disk"},
                                                      offload_folder=folder)


def test_capture_with_embedding_on_disk(plain, embed_on_disk):
    assert next(embed_on_disk.model.parameters()).device.type == "meta"  # the first weight is not in memory
    assert input_device(embed_on_disk.model) == torch.device("cpu")     # but the embedding executes on the CPU
    kw = dict(hooks=["resid_pre", "resid_post"], positions=[-1, "mean"], progress=False)
    assert _max_diff(capture(plain, PROMPTS, **kw), capture(embed_on_disk, PROMPTS, **kw)) <= 1e-6


def test_generation_with_embedding_on_disk(plain, embed_on_disk):
    from vlsafe.probes.behavior.generate import generate

    kw = dict(max_new_tokens=4, cache=False, progress=False)
    assert generate(embed_on_disk, PROMPTS, **kw) == generate(plain, PROMPTS, **kw)


def test_lvlm_with_image_matches_plain_load(tiny_llava_dir, tmp_path):
    ck = open_checkpoint(tiny_llava_dir)
    plain, off = ck.load_model(), ck.load_model(device_map={"model.language_model.layers.1": "disk"},
                                                offload_folder=tmp_path)
    assert off.model.hf_device_map["model.language_model.layers.1"] == "disk"
    image = blank_image(plain)
    kw = dict(hooks=["resid_pre", "resid_post"], positions=[-1, "mean"], images=image, progress=False)
    assert _max_diff(capture(plain, PROMPTS[:2], **kw), capture(off, PROMPTS[:2], **kw)) <= 1e-6


@pytest.mark.parametrize("kwargs, message", [
    (dict(device_map={5: "disk"}, offload_folder="x"), "layer 5 out of range"),
    (dict(device_map={"model.layer.1": "cpu"}), "did you mean model.layers.1"),
    (dict(device_map={1: "disk"}), "offload_folder"),
    (dict(device_map="fastest"), "not understood"),
    (dict(max_memory={"cpu": "1GiB"}), "need a device_map"),
    (dict(device_map={1: "gpu7"}), "unknown device 'gpu7'"),
])
def test_bad_placement_is_one_line_error(tiny_llama_dir, kwargs, message):
    with pytest.raises(VlsafeError, match=message) as err:
        open_checkpoint(tiny_llama_dir).load_model(**kwargs)
    assert "\n" not in str(err.value)


def test_partial_map_is_completed_minimally(plain):
    full = build_device_map(plain.model, {1: "disk", "lm_head": "cpu"}, "cpu")
    assert full["model.layers.1"] == "disk" and full["model.layers.0"] == "cpu" and full["lm_head"] == "cpu"
    assert not any(k.startswith("model.layers.1.") for k in full)  # the block is placed whole
    params = [n for n, _ in plain.model.named_parameters()]
    assert all(any(n == k or n.startswith(k + ".") for k in full) for n in params)
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_split_over_gpu_and_cpu_matches_cpu(tiny_llama_dir, plain):
    split = open_checkpoint(tiny_llama_dir).load_model(device_map={0: "cuda:0", 1: "cpu"}, device="cuda:0")
    assert input_device(split.model).type == "cuda"
    for backend in ("hooks", "nnsight"):
        kw = dict(hooks=HOOKS, positions=[-1, "mean"], backend=backend, progress=False)
        assert _max_diff(capture(plain, PROMPTS, **kw), capture(split, PROMPTS, **kw)) <= 1e-4
    r = torch.randn(64, generator=torch.Generator().manual_seed(3))
    inputs = encode(plain, PROMPTS)
    with torch.inference_mode(), ablate_direction(plain.model, r), ablate_direction(split.model, r):
        ref = plain.model(**inputs.model_inputs()).logits
        got = split.model(**inputs.to(input_device(split.model)).model_inputs()).logits.cpu()
    assert float((ref - got).abs().max()) <= 1e-4
