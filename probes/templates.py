"""Prompt formatting and batching: chat templates, LVLM image placeholders, left padding, position ids.

>>> from vlsafe.probes.models import load
>>> from vlsafe.probes.templates import format_chat, encode, post_instruction_tokens, blank_image
>>> lm = load("default")
>>> format_chat(lm.tokenizer, "Hi")                       # '<|im_start|>system\\n…<|im_start|>assistant\\n'
>>> post_instruction_tokens(lm.tokenizer)                 # ids of '<|im_end|>\\n<|im_start|>assistant\\n'
>>> batch = encode(lm, ["Hi", "Write a poem"])            # left padded, position_ids = cumsum(mask) - 1
>>> lm.model(**batch.model_inputs())

For an LVLM pass images (PIL, or None for a text-only row): `encode(lvlm, prompts, [blank_image(lvlm), None])`.
Template and post-instruction tokens always come from the tokenizer/processor, never hard-coded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from vlsafe.analysis.errors import VlsafeError

_PROBES = ("Alpha beta gamma x", "The number is 7", "Why?")


def tokenizer_of(tok_or_proc: Any) -> Any:
    """The tokenizer of a processor (or the tokenizer itself)."""
    return getattr(tok_or_proc, "tokenizer", None) or tok_or_proc


def _is_processor(tok_or_proc: Any) -> bool:
    return getattr(tok_or_proc, "tokenizer", None) is not None


def image_token(tok_or_proc: Any) -> str:
    """The image placeholder string of a processor/tokenizer (`<image>` when none is declared)."""
    for obj in (tok_or_proc, tokenizer_of(tok_or_proc)):
        tok = getattr(obj, "image_token", None)
        if isinstance(tok, str) and tok:
            return tok
    return "<image>"


def format_chat(tokenizer_or_processor: Any, prompt: str, *, image: bool = False, system: str | None = None) -> str:
    """`prompt` as one user turn through the chat template, with the assistant generation prompt appended.

    With `image=True` the image placeholder is placed before the text: through the processor's template
    (`{"type": "image"}` content part) when it has one, else the image token is prefixed to the text.
    """
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system is not None else []
    if _is_processor(tokenizer_or_processor) and getattr(tokenizer_or_processor, "chat_template", None):
        parts = ([{"type": "image"}] if image else []) + [{"type": "text", "text": prompt}]
        if system is not None:
            messages = [{"role": "system", "content": [{"type": "text", "text": system}]}]
        text = tokenizer_or_processor.apply_chat_template(messages + [{"role": "user", "content": parts}],
                                                          add_generation_prompt=True, tokenize=False)
    else:
        tok = tokenizer_of(tokenizer_or_processor)
        if not getattr(tok, "chat_template", None):
            raise VlsafeError(f"{getattr(tok, 'name_or_path', type(tok).__name__)}: tokenizer has no chat template; "
                              "format prompts yourself or pass chat=False")
        content = f"{image_token(tokenizer_or_processor)}\n{prompt}" if image else prompt
        text = tok.apply_chat_template(messages + [{"role": "user", "content": content}],
                                       add_generation_prompt=True, tokenize=False)
    if image and image_token(tokenizer_or_processor) not in text:
        raise VlsafeError(f"chat template dropped the image placeholder {image_token(tokenizer_or_processor)!r}")
    return text


def post_instruction_tokens(tokenizer: Any) -> list[int]:
    """Token ids the chat template puts after the user message (e.g. ChatML `<|im_end|>\\n<|im_start|>assistant\\n`).

    Derived by formatting several probe messages with different endings and taking the longest common
    suffix of their token ids; never hard-coded.
    """
    tok = tokenizer_of(tokenizer)
    seqs = [tok(format_chat(tokenizer, p), add_special_tokens=False)["input_ids"] for p in _PROBES]
    n = 0
    while all(len(s) > n for s in seqs) and len({s[-1 - n] for s in seqs}) == 1:
        n += 1
    suffix = seqs[0][len(seqs[0]) - n:]
    if not suffix:
        raise VlsafeError(f"{getattr(tok, 'name_or_path', '')}: chat template adds no tokens after the user message")
    return list(suffix)


@dataclass
class Batch:
    """Model inputs for one left-padded batch. `texts` are the strings actually tokenized."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        """Number of real (non-pad) tokens per row."""
        return self.attention_mask.sum(-1)

    def model_inputs(self, position_ids: bool = True) -> dict[str, Any]:
        """Keyword arguments for `model(**…)` (`position_ids=False` for `generate`, which derives its own)."""
        out: dict[str, Any] = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if position_ids:
            out["position_ids"] = self.position_ids
        if self.pixel_values is not None:
            out["pixel_values"] = self.pixel_values
        out.update(self.extra)
        return out

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "Batch":
        """A copy on `device`; `dtype` casts `pixel_values` (e.g. to the model's dtype)."""
        def mv(t: Any) -> Any:
            return t.to(device) if isinstance(t, torch.Tensor) else t

        pv = None if self.pixel_values is None else self.pixel_values.to(device, dtype or self.pixel_values.dtype)
        return Batch(mv(self.input_ids), mv(self.attention_mask), mv(self.position_ids), pv,
                     {k: mv(v) for k, v in self.extra.items()}, list(self.texts))


@contextlib.contextmanager
def _left_padding(tok: Any) -> Iterator[None]:
    side = getattr(tok, "padding_side", "left")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    try:
        yield
    finally:
        tok.padding_side = side


def _texts(fmt: Any, prompts: Sequence[str], images: Sequence[Any], chat: bool, system: str | None) -> list[str]:
    if chat:
        return [format_chat(fmt, p, image=img is not None, system=system) for p, img in zip(prompts, images)]
    if system is not None:
        raise VlsafeError("system prompt given with chat=False (it is only applied through the chat template)")
    return [f"{image_token(fmt)}\n{p}" if img is not None else p for p, img in zip(prompts, images)]


def encode(lm: Any, prompts: Sequence[str], images: Sequence[Any] | None = None, *, chat: bool = True,
           system: str | None = None) -> Batch:
    """Tokenize `prompts` (chat-formatted unless `chat=False`) into a left-padded `Batch`.

    `images` (one PIL image or None per prompt) go through the LVLM's processor; position ids are
    `cumsum(attention_mask) - 1` clamped at 0, so a prompt gets the same positions alone or in a batch.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise VlsafeError("encode: empty prompt list")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise VlsafeError(f"encode: prompt {i} is {type(p).__name__}, not a string")
    images = [None] * len(prompts) if images is None else list(images)
    if len(images) != len(prompts):
        raise VlsafeError(f"encode: {len(images)} images for {len(prompts)} prompts")
    given = [img for img in images if img is not None]
    processor = getattr(lm, "processor", None)
    if given and processor is None:
        raise VlsafeError(f"{_name(lm)}: images given but the model has no image processor (text-only model?)")
    fmt = processor if processor is not None else lm.tokenizer
    texts = _texts(fmt, prompts, images, chat, system)
    tok = tokenizer_of(fmt)
    with _left_padding(tok):
        if given:
            enc = dict(processor(text=texts, images=given, padding=True, return_tensors="pt",
                                 add_special_tokens=not chat))
        else:
            enc = dict(tok(texts, padding=True, return_tensors="pt", add_special_tokens=not chat,
                           return_token_type_ids=False))
    ids, mask = enc.pop("input_ids"), enc.pop("attention_mask")
    if bool((mask.sum(-1) == 0).any()):
        raise VlsafeError(f"encode: prompt {int((mask.sum(-1) == 0).nonzero()[0])} has no tokens")
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    pixel_values = enc.pop("pixel_values", None)
    if pixel_values is not None:
        pixel_values = pixel_values.to(_model_dtype(lm))
    return Batch(ids, mask, position_ids, pixel_values, enc, texts)


def batches(lm: Any, prompts: Sequence[str], images: Sequence[Any] | None = None, *, batch_size: int = 8,
            chat: bool = True, system: str | None = None) -> Iterator[Batch]:
    """`encode` over consecutive slices of `batch_size` prompts (order preserved)."""
    if batch_size < 1:
        raise VlsafeError(f"batch_size must be >= 1, got {batch_size}")
    prompts = list(prompts)
    if not prompts:
        raise VlsafeError("empty prompt set")
    for s in range(0, len(prompts), batch_size):
        yield encode(lm, prompts[s:s + batch_size], None if images is None else list(images)[s:s + batch_size],
                     chat=chat, system=system)


def _image_size(processor: Any) -> tuple[int, int]:
    ip = getattr(processor, "image_processor", processor)
    for attr in ("crop_size", "size"):
        sz = getattr(ip, attr, None)
        if sz is None:
            continue
        get = (lambda k: sz.get(k)) if isinstance(sz, dict) else (lambda k: getattr(sz, k, None))
        if get("height") and get("width"):
            return int(get("width")), int(get("height"))
        for k in ("shortest_edge", "longest_edge"):
            if get(k):
                return int(get(k)), int(get(k))
    return 336, 336


def blank_image(size: Any = None, color: tuple[int, int, int] = (128, 128, 128), *, processor: Any = None) -> Any:
    """A uniform RGB PIL image (neutral grey by default).

    `size` is an int or (width, height); when omitted it comes from `processor`'s image size (a processor or a
    `LoadedModel`), else 336×336. For convenience `blank_image(lm)` also works (the model as first argument).
    """
    from PIL import Image

    if size is not None and not isinstance(size, (int, tuple, list)):
        size, processor = None, size
    if size is None:
        proc = getattr(processor, "processor", processor)
        size = _image_size(proc) if proc is not None else (336, 336)
    if isinstance(size, int):
        size = (size, size)
    return Image.new("RGB", (int(size[0]), int(size[1])), tuple(color))


def _model_dtype(lm: Any) -> torch.dtype:
    model = getattr(lm, "model", None)
    try:
        return next(model.parameters()).dtype
    except (AttributeError, StopIteration, TypeError):
        return torch.float32


def _name(lm: Any) -> str:
    ck = getattr(lm, "checkpoint", None)
    return getattr(ck, "spec", None) or type(getattr(lm, "model", lm)).__name__
