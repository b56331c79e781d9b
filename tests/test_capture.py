"""Activation capture: parity with HF hidden states, three backends agree, batching invariance, LLaVA, files."""

from __future__ import annotations

import pytest
import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes import models as M
from vlsafe.probes.activations import Activations
from vlsafe.probes.capture import capture, parse_hook_name
from vlsafe.probes.templates import blank_image, encode, post_instruction_tokens

PROMPTS = ["Hi", "Explain photosynthesis to a child in three short sentences please", "Write a poem",
           "How can I make a dangerous weapon at home?"]
HOOKS = ["resid_pre", "resid_post", "attn_out", "mlp_out"]


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return M.load(tiny_llama_dir)


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return M.load(tiny_llava_dir)


def _hf_hidden(lm, prompts, images=None):
    with torch.no_grad():
        return lm.model(**encode(lm, prompts, images).model_inputs(), output_hidden_states=True).hidden_states


def _assert_close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=tol)


def _assert_backends_agree(ref: Activations, other: Activations, tol=1e-5):
    assert ref.requests == other.requests and ref.positions == other.positions
    for kind, layer in ref.requests:
        _assert_close(other.get(kind, layer), ref.get(kind, layer), tol)


def _check_against_hf(lm, acts, hidden, k):
    L = M.num_layers(lm.model)
    for layer in acts.layers:
        _assert_close(acts.get("resid_pre", layer)[:, -k:], hidden[layer][:, -k:].float())
        post = acts.get("resid_post", layer)[:, -k:]
        if layer < L - 1:
            _assert_close(post, hidden[layer + 1][:, -k:].float())
        else:  # HF's last entry is after the final norm
            with torch.no_grad():
                _assert_close(M.final_norm(lm.model)(post), hidden[L][:, -k:].float(), 1e-4)
            assert (post - hidden[L][:, -k:]).abs().max() > 1e-2


# ---- models ---------------------------------------------------------------------------------------------
def test_model_parts_found_by_structure(llama, llava, tmp_path):
    from vlsafe.analysis.tiny import tiny_idefics3

    idefics = M.load(tiny_idefics3(tmp_path / "idefics"))
    for lm, path in ((llama, "model.layers"), (llava, "model.language_model.layers"),
                     (idefics, "model.text_model.layers")):
        assert M.decoder_layers(lm.model) is lm.model.get_submodule(path)
        assert M.num_layers(lm.model) == 2 and M.hidden_size(lm.model) == 64
        assert M.embed_tokens(lm.model) is lm.model.get_submodule(path.replace("layers", "embed_tokens"))
        assert M.final_norm(lm.model) is lm.model.get_submodule(path.replace("layers", "norm"))
        assert M.lm_head(lm.model) is lm.model.lm_head
    assert M.is_lvlm(llava) and not M.is_lvlm(llama)


# ---- parity ---------------------------------------------------------------------------------------------
def test_hooks_backend_matches_hf_hidden_states(llama):
    k = 4
    acts = capture(llama, PROMPTS, hooks=["resid_pre", "resid_post"], positions=list(range(-k, 0)),
                   batch_size=3, progress=False)
    assert acts.get("resid_pre", 0).shape == (4, k, 64) and acts.get("resid_pre", 0).dtype == torch.float32
    _check_against_hf(llama, acts, _hf_hidden(llama, PROMPTS), k)


def test_mean_and_post_instruction_positions(llama):
    acts = capture(llama, PROMPTS, hooks=["resid_pre"], positions=["mean", "post_instruction", "last"],
                   progress=False)
    k = len(post_instruction_tokens(llama.tokenizer))
    assert acts.positions == ["mean"] + list(range(-k, 0))     # "last" (-1) is already there
    hidden = _hf_hidden(llama, PROMPTS)[1]
    mask = encode(llama, PROMPTS).attention_mask.bool()
    for i in range(len(PROMPTS)):
        _assert_close(acts.get("resid_pre", 1)[i, 0], hidden[i][mask[i]].mean(0))
    _assert_close(acts.get("resid_pre", 1)[:, 1:], hidden[:, -k:])


def test_attn_and_mlp_outputs_complete_the_residual(llama):
    acts = capture(llama, PROMPTS, hooks=HOOKS, positions=["mean", -2, -1], progress=False)
    for layer in acts.layers:
        pre, post = acts.get("resid_pre", layer), acts.get("resid_post", layer)
        _assert_close(pre + acts.get("attn_out", layer) + acts.get("mlp_out", layer), post)
        assert acts.get("attn_out", layer).abs().max() > 1e-3 and acts.get("mlp_out", layer).abs().max() > 1e-3


def test_planted_zero_block_is_seen_at_its_layer(tiny_llama_dir):
    lm = M.load(tiny_llama_dir)
    block = M.decoder_layers(lm.model)[1]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    acts = capture(lm, PROMPTS, hooks=HOOKS, positions=[-3, -1], progress=False)
    assert acts.get("attn_out", 1).abs().max() == 0 and acts.get("mlp_out", 1).abs().max() == 0
    assert acts.get("attn_out", 0).abs().max() > 1e-3
    _assert_close(acts.get("resid_post", 1), acts.get("resid_pre", 1), 0)
    assert (acts.get("resid_post", 0) - acts.get("resid_pre", 0)).abs().max() > 1e-3


def test_three_backends_agree_tiny(llama):
    kw = dict(hooks=HOOKS, positions=["mean", "post_instruction"], batch_size=3, progress=False)
    ref = capture(llama, PROMPTS, backend="hooks", **kw)
    for backend in ("transformer_lens", "nnsight"):
        _assert_backends_agree(ref, capture(llama, PROMPTS, backend=backend, **kw))
    # TL boot swaps modules in place; the backend must have wrapped a copy
    assert not any(type(m).__module__.startswith("transformer_lens") for m in llama.model.modules())


def test_single_prompt_equals_left_padded_batch(llama):
    kw = dict(hooks=HOOKS, positions=["mean", "post_instruction"], progress=False)
    assert len(set(encode(llama, PROMPTS).lengths.tolist())) == len(PROMPTS)
    batched = capture(llama, PROMPTS, batch_size=len(PROMPTS), **kw)
    for i, p in enumerate(PROMPTS):
        alone = capture(llama, [p], **kw)
        for kind, layer in batched.requests:
            _assert_close(batched.get(kind, layer)[i:i + 1], alone.get(kind, layer))


# ---- LLaVA ----------------------------------------------------------------------------------------------
def test_llava_capture_with_blank_image(llava):
    img = blank_image(llava)
    images = [img, None, img]
    prompts = PROMPTS[:3]
    ref = capture(llava, prompts, images=images, hooks=HOOKS, positions=[-3, -2, -1], batch_size=3,
                  progress=False)
    _check_against_hf(llava, ref, _hf_hidden(llava, prompts, images), 3)
    text_only = capture(llava, prompts, hooks=HOOKS, positions=[-3, -2, -1], progress=False)
    assert (text_only.get("resid_post", 1)[0] - ref.get("resid_post", 1)[0]).abs().max() > 1e-4  # image matters
    _assert_close(text_only.get("resid_post", 1)[1], ref.get("resid_post", 1)[1])             # row without image
    alone = capture(llava, prompts[:1], images=img, hooks=HOOKS, positions=[-3, -2, -1], progress=False)
    _assert_close(alone.get("resid_pre", 1), ref.get("resid_pre", 1)[:1])
    for backend in ("transformer_lens", "nnsight"):
        _assert_backends_agree(ref, capture(llava, prompts, images=images, hooks=HOOKS, positions=[-3, -2, -1],
                                            batch_size=3, backend=backend, progress=False))


# ---- accumulate, files ----------------------------------------------------------------------------------
class _Set:  # the PromptSet interface capture relies on (prompts, labels, records)
    def __init__(self, prompts, labels):
        self.prompts, self.labels, self.records, self.name = prompts, labels, [], "toy"


def test_accumulate_equals_tensor_statistics(llama, tmp_path):
    labels = [1, 0, 0, 1]
    kw = dict(hooks=["resid_pre", "blocks.1.hook_mlp_out"], positions=["mean", -1], batch_size=3, progress=False)
    full = capture(llama, _Set(PROMPTS, labels), **kw)
    acc = capture(llama, _Set(PROMPTS, labels), accumulate=True, **kw)
    for kind, layer in full.requests:
        x = full.get(kind, layer).double()
        for lab in (0, 1):
            rows = x[[i for i, v in enumerate(labels) if v == lab]]
            _assert_close(acc.mean(kind, layer, label=lab), rows.mean(0), 1e-6)
        _assert_close(acc.var(kind, layer), x.var(0), 1e-6)
    with pytest.raises(VlsafeError, match="accumulate"):
        acc.get("resid_pre", 0)
    back = Activations.load(acc.save(tmp_path / "acc.safetensors"), expect=llama)
    _assert_close(back.mean("mlp_out", 1, label=1), acc.mean("mlp_out", 1, label=1), 0)


def test_accumulated_memory_is_flat(llama):
    def n_tensors(n):
        acts = capture(llama, (PROMPTS * 4)[:n], hooks=["resid_pre"], positions=[-2, -1], batch_size=2,
                       accumulate=True, progress=False)
        return sum(len(s.tensors()) for s in acts._stats.values()), sum(s.nbytes for s in acts._stats.values())
    assert n_tensors(2) == n_tensors(16) == (2 * 2 * 2, 2 * 2 * 2 * 64 * 8)


def test_save_load_and_spill(llama, tiny_llava_dir, tmp_path):
    acts = capture(llama, _Set(PROMPTS, [1, 0, 1, 0]), hooks=["resid_post"], layers=[1], progress=False)
    back = Activations.load(acts.save(tmp_path / "a.safetensors"), expect=llama, hidden_size=64)
    _assert_close(back.get("resid_post", 1), acts.get("resid_post", 1), 0)
    assert back.labels == [1, 0, 1, 0] and back.meta["content_hash"] == llama.checkpoint.content_hash()
    spilled = capture(llama, PROMPTS, hooks=["resid_post"], layers=[1], batch_size=3, spill_to=tmp_path / "sp",
                      progress=False)
    assert len(list((tmp_path / "sp").glob("chunk_*.safetensors"))) == 2 and not spilled._parts
    _assert_close(Activations.load(tmp_path / "sp").get("blocks.1.hook_resid_post"), acts.get("resid_post", 1), 0)
    with pytest.raises(VlsafeError, match="hash"):
        Activations.load(tmp_path / "a.safetensors", expect=M.load(tiny_llava_dir))
    with pytest.raises(VlsafeError, match="hidden size 64, expected 576"):
        Activations.load(tmp_path / "a.safetensors", hidden_size=576)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(VlsafeError, match="not a vlsafe activations file"):
        Activations.load(tmp_path / "other.safetensors")


# ---- bad input ------------------------------------------------------------------------------------------
def test_hook_names():
    assert parse_hook_name("blocks.3.hook_resid_pre") == ("resid_pre", 3)
    assert parse_hook_name("blocks.3.hook_in") == ("resid_pre", 3)
    assert parse_hook_name("blocks.0.hook_out") == ("resid_post", 0)
    assert parse_hook_name("blocks.2.attn.hook_out") == ("attn_out", 2)
    assert parse_hook_name("mlp_out") == ("mlp_out", None)
    with pytest.raises(VlsafeError, match="did you mean.*resid_pre"):
        parse_hook_name("resid_pree")
    with pytest.raises(VlsafeError, match="blocks.1.hook_resid_post"):
        parse_hook_name("blocks.1.hook_resid_psot")


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[]), "empty prompt set"),
    (dict(layers=[2]), r"layer 2 out of range \(valid layers: 0..1\)"),
    (dict(layers=[-1]), r"layer -1 out of range"),
    (dict(hooks=["blocks.5.hook_resid_pre"]), "layer 5 out of range"),
    (dict(hooks=["resid_mid"]), "unknown hook name 'resid_mid'"),
    (dict(hooks=[]), "no hooks"),
    (dict(positions=3), "bad position 3"),
    (dict(positions=[]), "no positions"),
    (dict(positions="post_instruction", chat=False), "needs chat"),
    (dict(positions=-500), "fewer than position -500"),
    (dict(backend="pyvene"), "unknown capture backend"),
    (dict(images=["not-an-image"]), "no image processor"),
    (dict(accumulate=True, spill_to="x"), "spill_to"),
])
def test_bad_inputs(llama, kwargs, match):
    kwargs = {"prompts": PROMPTS[:1], "progress": False, **kwargs}
    with pytest.raises(VlsafeError, match=match):
        capture(llama, kwargs.pop("prompts"), **kwargs)


def test_uncaptured_lookup_is_an_error(llama):
    acts = capture(llama, PROMPTS[:1], hooks=["resid_pre"], layers=[0], progress=False)
    with pytest.raises(VlsafeError, match="not captured"):
        acts.get("resid_post", 0)
    with pytest.raises(VlsafeError, match="position 'mean' not captured"):
        acts.stats("resid_pre", 0, position="mean")


# ---- SmolLM2 --------------------------------------------------------------------------------------------
@pytest.mark.smollm2
def test_smollm2_backends_agree_and_match_hf(smollm2_dir):
    lm = M.load(smollm2_dir)
    prompts = PROMPTS[:3]                                       # three lengths → a left-padded batch
    kw = dict(hooks=HOOKS, layers=[0, 14, 29], positions=["mean", "post_instruction"], batch_size=3,
              progress=False)
    ref = capture(lm, prompts, **kw)
    k = len(post_instruction_tokens(lm.tokenizer))
    _check_against_hf(lm, ref, _hf_hidden(lm, prompts), k)
    for backend in ("transformer_lens", "nnsight"):
        _assert_backends_agree(ref, capture(lm, prompts, backend=backend, **kw))
    alone = capture(lm, prompts[1:2], **kw)
    for kind, layer in ref.requests:
        _assert_close(alone.get(kind, layer), ref.get(kind, layer)[1:2])
