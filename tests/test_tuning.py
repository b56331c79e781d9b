"""The SFT core: answer-only loss, layer/part selection, LoRA merge, logging, atomic saving."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.tiny import tiny_llama, tiny_llava
from vlsafe.experiments.tuning import IGNORE, SFTConfig, answer_loss, encode_example, sft, train
from vlsafe.probes.models import load
from vlsafe.probes.templates import format_chat

EXAMPLES = [{"prompt": "How do I bake bread?", "answer": "Mix flour and water, then bake."},
            {"prompt": "Write a poem about the sea.", "answer": "The sea is blue and deep."},
            {"prompt": "Tell me how to hack into a bank.", "answer": "I'm sorry, but I can't help with that."}]


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("t") / "llama4", layers=4)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_labels_mask_prompt_tokens_exactly(tiny_llama_dir):
    lm = load(tiny_llama_dir)
    tok = lm.tokenizer
    ex = EXAMPLES[0]
    enc = encode_example(lm, ex, max_length=200)
    prompt_ids = tok(format_chat(tok, ex["prompt"]), add_special_tokens=False)["input_ids"]
    answer_ids = tok(ex["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc["input_ids"].tolist() == prompt_ids + answer_ids
    assert enc["labels"].tolist() == [IGNORE] * len(prompt_ids) + answer_ids
    assert tok.decode(enc["labels"][enc["labels"] != IGNORE]) == ex["answer"] + tok.eos_token
    cut = encode_example(lm, {**ex, "complete": False}, max_length=len(prompt_ids) + 3)
    assert cut["labels"].tolist() == [IGNORE] * len(prompt_ids) + answer_ids[:3]
    with pytest.raises(VlsafeError, match="example 0"):
        encode_example(lm, ex, max_length=len(prompt_ids))


def test_loss_gradient_only_at_answer_positions(tiny_llama_dir):
    lm = load(tiny_llama_dir)
    enc = encode_example(lm, EXAMPLES[1], max_length=200)
    logits = lm.model(input_ids=enc["input_ids"][None]).logits.detach().requires_grad_(True)
    loss, n = answer_loss(logits, enc["labels"][None])
    loss.backward()
    n_prompt = int((enc["labels"] == IGNORE).sum())
    grad_rows = logits.grad[0].abs().sum(-1)
    # position t predicts token t+1: rows n_prompt-1 .. L-2 carry gradient, all others none
    assert n == len(enc["labels"]) - n_prompt
    assert torch.all(grad_rows[: n_prompt - 1] == 0) and torch.all(grad_rows[-1] == 0)
    assert torch.all(grad_rows[n_prompt - 1: -1] > 0)
    manual = torch.nn.functional.cross_entropy(logits[0, n_prompt - 1:-1], enc["input_ids"][n_prompt:],
                                               reduction="sum")
    assert torch.allclose(loss, manual)


def test_full_ft_frozen_layers_bit_identical(llama4, tmp_path):
    lm = load(llama4)
    before = _state(lm.model)
    cfg = SFTConfig(steps=3, batch_size=2, lr=1e-2, frozen_layers=[1, 2], progress=False, seed=1)
    out = sft(lm, EXAMPLES, cfg, tmp_path / "ft")
    after = _state(load(out).model)
    for k, v in before.items():
        if ".layers.1." in k or ".layers.2." in k:
            assert torch.equal(v, after[k]), k
        elif ".layers.0." in k or ".layers.3." in k or "embed_tokens" in k:
            assert not torch.equal(v, after[k]), k
    log = pd.read_csv(out / "train_log.csv")
    assert list(log.step) == [1, 2, 3] and log.tokens.gt(0).all() and log.loss.notna().all()
    assert (out / "sft.json").is_file() and not list(tmp_path.glob(".ft.*"))


def test_lora_trainable_layers_merged_and_memorises(llama4, tmp_path):
    lm = load(llama4)
    before = _state(lm.model)
    cfg = SFTConfig(method="lora", steps=12, batch_size=1, lr=3e-2, lora_r=8, trainable_layers=[2],
                    progress=False)
    res = train(lm, EXAMPLES[:1], cfg)
    # one layer of a random tiny model cannot memorise (frozen head), but the loss must fall clearly
    assert res.log.loss.iloc[-1] < res.log.loss.iloc[0] - 0.2
    assert all(".layers.2." in n and "lora_" in n for n in res.trainable)
    from vlsafe.experiments.tuning import write_checkpoint

    ids = encode_example(lm, EXAMPLES[0], 200)["input_ids"][None]
    with torch.no_grad():
        adapted = res.model(input_ids=ids).logits
    out = write_checkpoint(res.model, lm.tokenizer, tmp_path / "lora", log=res.log, merge_inplace=True)
    reloaded = load(out).model
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, adapted, atol=1e-5)  # merge is exact
    after = _state(reloaded)
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".layers.2." in k for k in changed)


def test_same_seed_same_weights(tiny_llama_dir):
    cfg = SFTConfig(steps=2, batch_size=2, lr=1e-3, progress=False, seed=3)
    a = train(load(tiny_llama_dir), EXAMPLES, cfg).model.state_dict()
    b = train(load(tiny_llama_dir), EXAMPLES, cfg).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_llava_projector_only_with_images(tmp_path):
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    path = tiny_llava(tmp_path / "llava")
    lm = load(path)
    before = _state(lm.model)
    red = Image.new("RGB", (32, 32), (255, 0, 0))
    data = [{"prompt": "What colour is it?", "answer": "red", "image": red},
            {"prompt": "Hello", "answer": "Hi there."}]  # a text-only row in the same batch
    seen = []
    cfg = SFTConfig(steps=2, batch_size=2, lr=1e-2, train=["projector"], threads=1, progress=False)
    out = sft(lm, data, cfg, tmp_path / "out", callback=lambda s, m, r: seen.append((s, torch.get_num_threads())))
    assert seen == [(1, 1), (2, 1)]
    model = LlavaForConditionalGeneration.from_pretrained(out)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]) != ("multi_modal_projector" in k), k


def test_config_validation(tiny_llama_dir):
    with pytest.raises(ValidationError):
        SFTConfig(trainable_layers=[0], frozen_layers=[1])
    with pytest.raises(ValidationError):
        SFTConfig(stepz=3)
    with pytest.raises(VlsafeError, match="layer 7 out of range"):
        train(load(tiny_llama_dir), EXAMPLES, SFTConfig(steps=1, frozen_layers=[7], progress=False))
    with pytest.raises(VlsafeError, match="example 1"):
        train(load(tiny_llama_dir), [EXAMPLES[0], {"prompt": "x"}], SFTConfig(steps=1, progress=False))


def _llava_batch(tmp_path):
    from PIL import Image

    from vlsafe.experiments.tuning import collate

    lm = load(tiny_llava(tmp_path / "llava"))
    img = Image.new("RGB", (32, 32), (200, 30, 30))
    items = [encode_example(lm, {**ex, "image": img}, 200, i) for i, ex in enumerate(EXAMPLES)]
    return lm, collate(items, lm.tokenizer.pad_token_id or 0)


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_head_loss_equals_full_loss_with_gradients(kind, tiny_llama_dir, tmp_path):
    from vlsafe.experiments.sft_loss import full_loss, head_loss, pick_loss
    from vlsafe.experiments.tuning import collate

    if kind == "llama":
        lm = load(tiny_llama_dir)
        batch = collate([encode_example(lm, ex, 200, i) for i, ex in enumerate(EXAMPLES)], 0)
    else:
        lm, batch = _llava_batch(tmp_path)
    model = lm.model
    assert pick_loss(model, batch) is head_loss
    if kind == "llama":  # a peft-wrapped model keeps the fast path (get_output_embeddings reaches the base head)
        from vlsafe.experiments.tuning import apply_lora

        lora = apply_lora(load(tiny_llama_dir).model, SFTConfig(method="lora", progress=False))
        assert pick_loss(lora, batch) is head_loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    grads = []
    for fn in (full_loss, head_loss):
        model.zero_grad()
        loss = fn(model, inputs, batch["labels"], "fp32")
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = grads
    assert b == pytest.approx(a, rel=1e-5) and a > 0
    assert ga.keys() == gb.keys() and all(torch.allclose(ga[n], gb[n], rtol=1e-4, atol=1e-6) for n in ga)


def test_pick_loss_falls_back_when_the_head_is_not_plain(tiny_llama_dir):
    from vlsafe.experiments.sft_loss import full_loss, pick_loss
    from vlsafe.experiments.tuning import collate

    lm = load(tiny_llama_dir)
    batch = collate([encode_example(lm, ex, 200, i) for i, ex in enumerate(EXAMPLES)], 0)
    head = lm.model.get_output_embeddings()
    lm.model.get_output_embeddings = lambda: (lambda h: 2.0 * head(h))  # e.g. scaled / soft-capped logits
    assert pick_loss(lm.model, batch) is full_loss
