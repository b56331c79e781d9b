"""Chat formatting, post-instruction tokens, left-padded batches with position ids, LVLM image inputs."""

from __future__ import annotations

import pytest
import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.tiny import tiny_tokenizer
from vlsafe.probes.models import load
from vlsafe.probes.templates import batches, blank_image, encode, format_chat, post_instruction_tokens

LLAMA2_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
PROMPTS = ["Hi", "Explain photosynthesis to a child in three short sentences please", "Write a poem"]


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load(tiny_llama_dir)


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return load(tiny_llava_dir)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_format_chat_uses_template_with_generation_prompt():
    tok = tiny_tokenizer()
    text = format_chat(tok, "How do I bake bread?", system="Be brief.")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_post_instruction_tokens_chatml():
    tok = tiny_tokenizer()
    got = post_instruction_tokens(tok)
    assert got == _ids(tok, "<|im_end|>\n<|im_start|>assistant\n")
    assert _ids(tok, format_chat(tok, "Tell me a story"))[-len(got):] == got


def test_post_instruction_tokens_follow_the_template_not_a_constant():
    tok = tiny_tokenizer()
    tok.chat_template = LLAMA2_TEMPLATE
    got = post_instruction_tokens(tok)
    assert tok.decode(got) == " [/INST]"
    assert _ids(tok, format_chat(tok, "Tell me a story"))[-len(got):] == got


@pytest.mark.smollm2
def test_post_instruction_tokens_smollm2(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    got = post_instruction_tokens(tok)
    assert tok.decode(got) == "<|im_end|>\n<|im_start|>assistant\n"
    assert got == _ids(tok, "<|im_end|>\n<|im_start|>assistant\n")


def test_no_chat_template_is_an_error():
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(VlsafeError, match="no chat template"):
        format_chat(tok, "Hi")


def test_encode_left_pads_with_cumsum_positions(llama):
    b = encode(llama, PROMPTS)
    mask, ids = b.attention_mask, b.input_ids
    lengths = mask.sum(-1)
    assert len(set(lengths.tolist())) == 3                          # really different lengths
    for i, n in enumerate(lengths.tolist()):
        assert mask[i, -n:].all() and not mask[i, :-n].any()        # pads on the left
        assert (ids[i, :-n] == llama.tokenizer.pad_token_id).all()
        assert b.position_ids[i, -n:].tolist() == list(range(n))
        assert (b.position_ids[i, :-n] == 0).all()
        alone = encode(llama, [PROMPTS[i]])
        assert alone.input_ids[0].tolist() == ids[i, -n:].tolist()
    k = post_instruction_tokens(llama.tokenizer)
    assert (ids[:, -len(k):] == torch.tensor(k)).all()
    assert b.pixel_values is None and "position_ids" not in b.model_inputs(position_ids=False)


def test_encode_restores_tokenizer_padding_side(llama):
    llama.tokenizer.padding_side = "right"
    try:
        b = encode(llama, PROMPTS[:2])
        assert b.attention_mask[:, -1].all() and not b.attention_mask[:, 0].all()
        assert llama.tokenizer.padding_side == "right"
    finally:
        llama.tokenizer.padding_side = "left"


def test_batches_preserve_order(llama):
    got = [t for b in batches(llama, PROMPTS, batch_size=2) for t in b.texts]
    assert got == [format_chat(llama.tokenizer, p) for p in PROMPTS]


def test_raw_text_without_chat(llama):
    b = encode(llama, ["plain text"], chat=False)
    assert b.texts == ["plain text"]
    with pytest.raises(VlsafeError, match="system prompt"):
        encode(llama, ["x"], chat=False, system="s")


def test_bad_inputs(llama):
    with pytest.raises(VlsafeError, match="empty"):
        encode(llama, [])
    with pytest.raises(VlsafeError, match="empty prompt set"):
        next(batches(llama, []))
    with pytest.raises(VlsafeError, match="prompt 1"):
        encode(llama, ["a", 3])
    with pytest.raises(VlsafeError, match="no image processor"):
        encode(llama, ["a"], [blank_image(size=8)])
    with pytest.raises(VlsafeError, match="batch_size"):
        next(batches(llama, ["a"], batch_size=0))


def test_blank_image_sizes(llava):
    img = blank_image(llava)
    assert img.size == (32, 32) and img.getpixel((3, 5)) == (128, 128, 128)
    assert blank_image(size=(20, 10), color=(1, 2, 3)).size == (20, 10)
    assert blank_image(processor=llava.processor).size == (32, 32)
    assert blank_image().size == (336, 336)


def test_llava_encode_expands_image_through_processor(llava):
    b = encode(llava, ["What is in the image?", "Hi"], [blank_image(llava), None])
    image_id = llava.tokenizer.convert_tokens_to_ids("<image>")
    n_img = (b.input_ids == image_id).sum(-1).tolist()
    assert n_img == [llava.model.config.image_seq_length, 0]
    assert b.pixel_values.shape == (1, 3, 32, 32)
    assert "<image>" in b.texts[0] and "<image>" not in b.texts[1]
    k = post_instruction_tokens(llava.processor)
    assert (b.input_ids[:, -len(k):] == torch.tensor(k)).all()
