"""The runnable model's parts, located by its family adapter (`vlsafe.analysis.adapters`).

Every function takes a `LoadedModel` or a `transformers` model and returns the *language model's* piece, at the
path its family file (`analysis/families/<family>.json`, `modules`) names: for a Llama `model.layers`, for
LLaVA `model.language_model.layers`, for Idefics3 `model.text_model.layers`. Nothing here searches by name.
A block's parts (`attention`, `mlp`, their output projections; for mllama's cross-attention layers
`cross_attn`) come from `blocks(model)`.

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

from vlsafe.analysis.adapters import Adapter, Block, adapter
from vlsafe.analysis.checkpoints import Checkpoint, LoadedModel, open_checkpoint

__all__ = ["load", "adapter", "Adapter", "Block", "language_model", "decoder_layers", "blocks", "block",
           "attention", "mlp", "embed_tokens", "final_norm", "lm_head", "num_layers", "hidden_size", "is_lvlm", "unwrap"]


def load(spec_or_checkpoint: str | os.PathLike | Checkpoint | LoadedModel, *, dtype: str | torch.dtype = "float32",
         device: str = "cpu", attn_implementation: str = "eager") -> LoadedModel:
    """A `LoadedModel` from a checkpoint spec (HF dir, file, hub id, `default`) or an opened `Checkpoint`.

    A `LoadedModel` passes through unchanged. Eager attention by default (exact batched/single parity).
    """
    if isinstance(spec_or_checkpoint, LoadedModel):
        return spec_or_checkpoint
    ckpt = spec_or_checkpoint if isinstance(spec_or_checkpoint, Checkpoint) else open_checkpoint(spec_or_checkpoint)
    return ckpt.load_model(dtype=dtype, device=device, attn_implementation=attn_implementation)


def unwrap(model: Any) -> nn.Module:
    """The transformers model of a `LoadedModel` (or the model itself)."""
    return adapter(model).model


def language_model(model: Any) -> nn.Module:
    """The text decoder stack (the module owning the layers, the embedding and the final norm)."""
    return adapter(model).language_model()


def decoder_layers(model: Any) -> nn.ModuleList:
    """The language model's blocks, in order (layer ℓ here = layer ℓ on every vlsafe axis)."""
    return adapter(model).layers()


def blocks(model: Any) -> list[Block]:
    """Every decoder block with its attention, MLP, their output projections and norms (`Block.cross` marks
    mllama's cross-attention blocks, whose `attn` is `cross_attn`)."""
    return adapter(model).blocks()


def block(model: Any, layer: int) -> Block:
    """Decoder block `layer` with its parts."""
    return adapter(model).block(layer)


def attention(model: Any, layer: int) -> nn.Module:
    """Block `layer`'s attention module (its output's first element is what enters the residual stream, o_proj
    applied; for a cross-attention block before its tanh gate)."""
    return adapter(model).block(layer).attn


def mlp(model: Any, layer: int) -> nn.Module:
    """Block `layer`'s MLP module."""
    return adapter(model).block(layer).mlp


def embed_tokens(model: Any) -> nn.Module:
    """The token embedding of the language model."""
    return adapter(model).require("embed")


def final_norm(model: Any) -> nn.Module:
    """The norm applied after the last block (before the head)."""
    return adapter(model).require("final_norm")


def lm_head(model: Any) -> nn.Module:
    """The unembedding (output projection to the vocabulary)."""
    return adapter(model).require("lm_head")


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
