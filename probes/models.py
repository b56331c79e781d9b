"""The runnable model's parts, found by structure (text causal LMs and LVLMs alike).

Every function takes the `transformers` model (`LoadedModel.model`) and returns the *language model's* piece:
for a Llama it is `model.model.layers`, for LLaVA `model.model.language_model.layers`, for Idefics3
`model.model.text_model.layers` — found through `get_decoder()` (which transformers exposes on all three),
else the largest `ModuleList` of blocks. No per-model copy-paste.

>>> from vlsafe.probes.models import load, decoder_layers
>>> lm = load("default")
>>> len(decoder_layers(lm.model))
30
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from vlsafe.analysis.checkpoints import Checkpoint, LoadedModel, open_checkpoint
from vlsafe.analysis.errors import VlsafeError

_ATTN_NAMES = ("self_attn", "attention", "attn", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


def load(spec_or_checkpoint: str | os.PathLike | Checkpoint | LoadedModel, dtype: str | torch.dtype = "float32",
         device: str = "cpu", attn_implementation: str = "eager") -> LoadedModel:
    """A `LoadedModel` from a checkpoint spec (HF dir, file, hub id, `default`) or an opened `Checkpoint`.

    A `LoadedModel` passes through unchanged. Eager attention by default (exact batched/single parity).
    """
    if isinstance(spec_or_checkpoint, LoadedModel):
        return spec_or_checkpoint
    ckpt = spec_or_checkpoint if isinstance(spec_or_checkpoint, Checkpoint) else open_checkpoint(spec_or_checkpoint)
    return ckpt.load_model(dtype=dtype, device=device, attn_implementation=attn_implementation)


def _unwrap(model: Any) -> nn.Module:
    model = getattr(model, "model", model) if isinstance(model, LoadedModel) else model
    if not isinstance(model, nn.Module):
        raise VlsafeError(f"expected a torch model or LoadedModel, got {type(model).__name__}")
    return model


def language_model(model: Any) -> nn.Module:
    """The text decoder stack (the module owning `layers`, `embed_tokens`, `norm`)."""
    model = _unwrap(model)
    get = getattr(model, "get_decoder", None)
    if callable(get):
        try:
            dec = get()
        except (AttributeError, NotImplementedError, TypeError):
            dec = None
        if isinstance(dec, nn.Module) and isinstance(getattr(dec, "layers", None), nn.ModuleList):
            return dec
    for attr in ("language_model", "text_model", "model"):
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Module) and sub is not model:
            try:
                return language_model(sub)
            except VlsafeError:
                pass
    if isinstance(getattr(model, "layers", None), nn.ModuleList):
        return model
    owner = _largest_block_list_owner(model)
    if owner is None:
        raise VlsafeError(f"{type(model).__name__}: cannot find the language model's decoder blocks")
    return owner


def _largest_block_list_owner(model: nn.Module) -> nn.Module | None:
    """The parent of the largest `ModuleList` whose items have an attention and an MLP child (not vision)."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if "vision" in name or "visual" in name:
            continue
        for child in mod.children():
            if isinstance(child, nn.ModuleList) and len(child) > best_n and all(_is_block(b) for b in child):
                best, best_n = mod, len(child)
    return best


def _is_block(block: nn.Module) -> bool:
    return _child(block, _ATTN_NAMES) is not None and _child(block, _MLP_NAMES) is not None


def _child(block: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for n in names:
        sub = getattr(block, n, None)
        if isinstance(sub, nn.Module):
            return sub
    return None


def decoder_layers(model: Any) -> nn.ModuleList:
    """The language model's blocks, in order (layer ℓ here = layer ℓ on every vlsafe axis)."""
    dec = language_model(model)
    layers = getattr(dec, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    lists = [c for c in dec.children() if isinstance(c, nn.ModuleList)]
    if not lists:
        raise VlsafeError(f"{type(dec).__name__}: no ModuleList of decoder blocks")
    return max(lists, key=len)


def attention(block: nn.Module) -> nn.Module:
    """A block's self-attention module (its output's first element is the attention output, o_proj applied)."""
    sub = _child(block, _ATTN_NAMES)
    if sub is None:
        raise VlsafeError(f"{type(block).__name__}: no attention submodule (looked for {', '.join(_ATTN_NAMES)})")
    return sub


def mlp(block: nn.Module) -> nn.Module:
    """A block's MLP module."""
    sub = _child(block, _MLP_NAMES)
    if sub is None:
        raise VlsafeError(f"{type(block).__name__}: no MLP submodule (looked for {', '.join(_MLP_NAMES)})")
    return sub


def embed_tokens(model: Any) -> nn.Module:
    """The token embedding of the language model."""
    m = _unwrap(model)
    emb = m.get_input_embeddings() if hasattr(m, "get_input_embeddings") else None
    if emb is None:
        emb = getattr(language_model(m), "embed_tokens", None)
    if emb is None:
        raise VlsafeError(f"{type(m).__name__}: no input embedding")
    return emb


def final_norm(model: Any) -> nn.Module:
    """The norm applied after the last block (before the head)."""
    dec = language_model(model)
    for attr in ("norm", "final_layernorm", "ln_f", "final_norm"):
        sub = getattr(dec, attr, None)
        if isinstance(sub, nn.Module):
            return sub
    raise VlsafeError(f"{type(dec).__name__}: no final norm (looked for norm, final_layernorm, ln_f)")


def lm_head(model: Any) -> nn.Module:
    """The unembedding (output projection to the vocabulary)."""
    m = _unwrap(model)
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    if head is None:
        head = getattr(m, "lm_head", None)
    if head is None:
        raise VlsafeError(f"{type(m).__name__}: no lm_head / output embedding")
    return head


def num_layers(model: Any) -> int:
    """Number of language-model blocks."""
    return len(decoder_layers(model))


def hidden_size(model: Any) -> int:
    """Width of the language model's residual stream."""
    cfg = getattr(language_model(model), "config", None)
    h = getattr(cfg, "hidden_size", None)
    return int(h) if h is not None else int(embed_tokens(model).weight.shape[-1])


def is_lvlm(lm: LoadedModel) -> bool:
    """True when the model takes images (a processor with an image processor is attached)."""
    return getattr(lm, "processor", None) is not None and hasattr(lm.processor, "image_processor")
