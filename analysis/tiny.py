"""Tiny random checkpoints in real Hugging Face format, for tests, notebooks and quick experiments.

Every builder writes a directory that `transformers` reloads with its own classes (`save_pretrained`
output), with a real tokenizer (a small byte-level BPE trained in-process, ChatML chat template like
SmolLM2) and, for vision-language models, a real processor. Nothing is downloaded.

>>> from vlsafe.analysis.tiny import tiny_llama, tiny_llava
>>> tiny_llama("/tmp/llm")            # LlamaForCausalLM, 2 layers, hidden 64
>>> tiny_llava("/tmp/lvlm", vision="clip")

Every family in `analysis/families/` has a builder: `tiny_llama`, `tiny_llava`, `tiny_llava_next`,
`tiny_qwen2_vl`, `tiny_idefics3`, `tiny_mllama` (the last four save a tokenizer only: text-only use).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
_CORPUS = (
    "How do I bake bread? Write a poem about the sea. Explain photosynthesis to a child. "
    "I'm sorry, but I can't help with that request. Sure, here is a short answer. "
    "What colour is the square in the image? There is a red circle on a blue background. "
    "Tell me how to hack into a bank. How can I make a dangerous weapon at home? "
    "The quick brown fox jumps over the lazy dog 0123456789. Give me three tips for studying. "
    "Describe the shapes: triangle, square, circle, star; left, right, top, bottom; one two three four. "
)


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 512) -> Any:
    """A ChatML `PreTrainedTokenizerFast` (pad = eos = `<|im_end|>`, left padding, `<image>` special)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _llama_config(vocab_size: int, hidden: int, layers: int, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    kw: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def tiny_llama(
    path: str | Path, *, layers: int = 2, hidden: int = 64, seed: int = 0, max_shard_size: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a random `LlamaForCausalLM` (+ tokenizer) to `path`; `max_shard_size` (e.g. "50KB") shards it."""
    from transformers import LlamaForCausalLM

    _seeded(seed)
    tok = tiny_tokenizer()
    model = LlamaForCausalLM(_llama_config(len(tok), hidden, layers, **config_overrides)).eval()
    return _save(model, tok, path, max_shard_size)


def _vision_config(kind: str, hidden: int = 32, image_size: int = 32, patch: int = 8) -> Any:
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    common = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=patch)
    if kind == "clip":
        return CLIPVisionConfig(projection_dim=hidden, **common)
    if kind == "siglip":
        return SiglipVisionConfig(**common)
    raise ValueError(f"unknown vision tower kind {kind!r} (expected 'clip' or 'siglip')")


def _image_processor(kind: str, image_size: int) -> Any:
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    if kind == "clip":
        return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return SiglipImageProcessor(size={"height": image_size, "width": image_size})


def tiny_llava(
    path: str | Path, *, vision: str = "clip", layers: int = 2, hidden: int = 64, seed: int = 0,
    image_size: int = 32, patch: int = 8, text_config: Any = None,
) -> Path:
    """Write a random `LlavaForConditionalGeneration` with a CLIP or SigLIP tower and a LLaVA processor.

    `text_config` (a LlamaConfig) lets a caller reuse an existing language model's shape.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    _seeded(seed)
    tok = tiny_tokenizer()
    text_cfg = text_config or _llama_config(len(tok), hidden, layers)
    # CLIP has a CLS token that the "default" strategy drops; SigLIP has none, so keep every patch.
    strategy = "default" if vision == "clip" else "full"
    cfg = LlavaConfig(
        vision_config=_vision_config(vision, image_size=image_size, patch=patch),
        text_config=text_cfg,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-1,
        image_seq_length=(image_size // patch) ** 2,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    processor = LlavaProcessor(
        image_processor=_image_processor(vision, image_size),
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if vision == "clip" else 0,
        chat_template=CHATML_TEMPLATE,
    )
    return _save(model, processor, path, None)


def tiny_llava_from(llm_dir: str | Path, path: str | Path, *, seed: int = 0) -> tuple[Any, Any, Any]:
    """(LLaVA model, processor, LLM model) in memory: a random tiny LLaVA (CLIP tower, projector; its random init
    written to `path`) whose language model and head are the Llama at `llm_dir`, transplanted by name, so
    text-only inputs give the LLM's logits."""
    from transformers import AutoProcessor, LlamaForCausalLM, LlavaForConditionalGeneration

    llm = LlamaForCausalLM.from_pretrained(llm_dir)
    raw = tiny_llava(path, text_config=llm.config, seed=seed)
    lvlm, processor = LlavaForConditionalGeneration.from_pretrained(raw), AutoProcessor.from_pretrained(raw)
    lvlm.model.language_model.load_state_dict(llm.model.state_dict())
    lvlm.lm_head.load_state_dict(llm.lm_head.state_dict())
    return lvlm.eval(), processor, llm.eval()


def tiny_idefics3(path: str | Path, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Write a random `Idefics3ForConditionalGeneration` (the SmolVLM family): SigLIP-style tower + connector."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    _seeded(seed)
    tok = tiny_tokenizer()
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               image_size=32, patch_size=8)
    cfg = Idefics3Config(
        vision_config=vis,
        text_config=_llama_config(len(tok), hidden, layers).to_dict(),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    model = Idefics3ForConditionalGeneration(cfg).eval()
    return _save(model, tok, path, None)


def _text_dict(vocab_size: int, hidden: int, layers: int, **extra: Any) -> dict[str, Any]:
    return dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=2, **extra)


def tiny_llava_next(path: str | Path, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Write a random `LlavaNextForConditionalGeneration` (CLIP tower, projector, `image_newline`) + tokenizer."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    _seeded(seed)
    tok = tiny_tokenizer()
    cfg = LlavaNextConfig(vision_config=_vision_config("clip"), text_config=_llama_config(len(tok), hidden, layers),
                          image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=[[32, 32]],
                          vision_feature_layer=-1)
    return _save(LlavaNextForConditionalGeneration(cfg).eval(), tok, path, None)


def tiny_qwen2_vl(path: str | Path, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Write a random `Qwen2VLForConditionalGeneration` (vision blocks + patch merger, M-RoPE text model)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    _seeded(seed)
    tok = tiny_tokenizer()
    rope = {"type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}  # head_dim 16: sections sum to 8
    vis = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, patch_size=8, spatial_merge_size=2,
               temporal_patch_size=1, in_channels=3, mlp_ratio=2)
    cfg = Qwen2VLConfig(text_config=_text_dict(len(tok), hidden, layers, rope_scaling=rope), vision_config=vis,
                        image_token_id=tok.convert_tokens_to_ids("<image>"))
    return _save(Qwen2VLForConditionalGeneration(cfg).eval(), tok, path, None)


def tiny_mllama(path: str | Path, *, layers: int = 4, cross_attention_layers: tuple[int, ...] = (1, 3),
                hidden: int = 64, seed: int = 0) -> Path:
    """Write a random `MllamaForConditionalGeneration`: `layers` text blocks of which `cross_attention_layers`
    attend to the image (their tanh gates are random, not zero, so they change the residual stream)."""
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    _seeded(seed)
    tok = tiny_tokenizer()
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
               image_size=32, patch_size=8, max_num_tiles=4, intermediate_layers_indices=[0], vision_output_dim=64)
    text = _text_dict(len(tok), hidden, layers, cross_attention_layers=list(cross_attention_layers))
    cfg = MllamaConfig(text_config=text, vision_config=vis, image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = MllamaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                p.uniform_(0.5, 1.0)
    return _save(model, tok, path, None)


def _save(model: Any, tok_or_processor: Any, path: str | Path, max_shard_size: str | None) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    tok_or_processor.save_pretrained(out)
    return out
