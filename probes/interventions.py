"""Interventions along a direction: ablation and activation addition (hooks), weight orthogonalisation (new checkpoint).

After Arditi et al. 2024 (formulas in `docs/methods.md`, "Refusal directions"):

- **ablation** `x ← x − r̂r̂ᵀx` at every block input, attention output and MLP output, all layers and positions;
- **activation addition** `x ← x + c·r` at block `layer`'s input only (all positions; c = +1 induces, −1 bypasses);
- **orthogonalisation** `W ← W − r̂r̂ᵀW` for every matrix that writes into the residual stream (`o_proj`,
  `mlp.down_proj`, HF out×in, as the family file names them; mllama's cross-attention blocks included) and its
  bias, `E ← E − (E r̂) r̂ᵀ` for the embedding rows, and for an LVLM the projector's last linear
  (`projector_out` in the family file; it writes the image tokens into the stream). Tied embeddings are untied
  first.

Orthogonalised weights and ablation hooks give the same logits (tested).

>>> with ablate_direction(lm.model, r):
...     logits = lm.model(**batch).logits
>>> orthogonalize_weights("default", r, "runs/smollm2-ortho")
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from vlsafe.analysis.checkpoints import Checkpoint, LoadedModel
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.placement import offloaded
from vlsafe.analysis.runinfo import atomic_path
from vlsafe.probes import models as M

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _unit(r: torch.Tensor, d: int) -> torch.Tensor:
    """`r` as a flat fp64 unit vector of length `d` (one-line errors for wrong shape or zero norm)."""
    r = torch.as_tensor(r).detach().reshape(-1).to(torch.float64).cpu()
    if r.numel() != d:
        raise VlsafeError(f"direction has {r.numel()} entries but the model's hidden size is {d}")
    norm = r.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise VlsafeError("direction has zero or non-finite norm; cannot ablate or orthogonalise along it")
    return r / norm


def _project_out(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    u = u.to(device=x.device, dtype=x.dtype)
    return x - (x @ u).unsqueeze(-1) * u


def first_tensor(output: Any) -> torch.Tensor:
    """The hidden state of a module output that is a tensor or a tuple whose first item is it."""
    return output if isinstance(output, torch.Tensor) else output[0]


def edit_first(output: Any, fn: Any) -> Any:
    """Apply `fn` to a module output that is a tensor or a tuple whose first item is the hidden state."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]),) + tuple(output[1:])
    raise VlsafeError(f"cannot intervene on a module output of type {type(output).__name__}")


def edit_input(args: tuple, kwargs: dict, fn: Any) -> tuple[tuple, dict]:
    """Apply `fn` to a block's hidden-state input, positional or `hidden_states=` keyword."""
    if args:
        return (fn(args[0]),) + tuple(args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    raise VlsafeError("decoder block called without a hidden-state input; cannot intervene")


@contextlib.contextmanager
def removing_hooks(handles: list[Any]) -> Iterator[None]:
    """Remove the given hook handles when the block exits (however it exits)."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def ablate_direction(model: Any, r: torch.Tensor, *, layers: Sequence[int] | None = None) -> Iterator[None]:
    """Project `r̂` out of every block input, attention output and MLP output, at all positions.

    `model` is a transformers model or a `LoadedModel`; `r` a `[d]` vector (its norm is irrelevant); `layers`
    restricts the hooks to those blocks (default: all).
    """
    u = _unit(r, M.hidden_size(model))
    ablate = lambda x: _project_out(x, u)  # noqa: E731
    blocks = M.blocks(model)
    if layers is not None:
        bad = [ℓ for ℓ in layers if not 0 <= ℓ < len(blocks)]
        if bad:
            raise VlsafeError(f"layer {bad[0]} out of range for a {len(blocks)}-layer model")
        blocks = [b for b in blocks if b.index in set(layers)]
    handles = []
    for block in blocks:
        handles.append(block.module.register_forward_pre_hook(
            lambda _m, a, k: edit_input(a, k, ablate), with_kwargs=True))
        for sub in (block.attn, block.mlp):
            handles.append(sub.register_forward_hook(lambda _m, _a, out: edit_first(out, ablate)))
    with removing_hooks(handles):
        yield


@contextlib.contextmanager
def add_direction(model: Any, r: torch.Tensor, layer: int, *, coeff: float = 1.0) -> Iterator[None]:
    """Add `coeff · r` (unnormalised) to block `layer`'s input at every position."""
    blocks = M.decoder_layers(model)
    if not -len(blocks) <= layer < len(blocks):
        raise VlsafeError(f"layer {layer} out of range for a {len(blocks)}-layer model")
    d = M.hidden_size(model)
    vec = torch.as_tensor(r).detach().reshape(-1)
    if vec.numel() != d:
        raise VlsafeError(f"direction has {vec.numel()} entries but the model's hidden size is {d}")
    vec = vec.to(torch.float64) * float(coeff)
    add = lambda x: x + vec.to(device=x.device, dtype=x.dtype)  # noqa: E731
    handle = blocks[layer].register_forward_pre_hook(lambda _m, a, k: edit_input(a, k, add), with_kwargs=True)
    with removing_hooks([handle]):
        yield


# ---- weight orthogonalisation ------------------------------------------------------------------------------

def _orth_out(linear: nn.Module, u: torch.Tensor) -> None:
    """W ← W − ûûᵀW and b ← b − ûûᵀb for a linear layer whose outputs live in the residual stream."""
    w = linear.weight.data
    w64 = w.to(torch.float64)
    w.copy_((w64 - torch.outer(u, u @ w64)).to(w.dtype))
    bias = getattr(linear, "bias", None)
    if bias is not None:
        b64 = bias.data.to(torch.float64)
        bias.data.copy_((b64 - (b64 @ u) * u).to(bias.dtype))


def _orth_rows(emb: nn.Module, u: torch.Tensor) -> None:
    """E ← E − (E û) ûᵀ for an embedding whose rows live in the residual stream."""
    e = emb.weight.data
    e64 = e.to(torch.float64)
    e.copy_((e64 - torch.outer(e64 @ u, u)).to(e.dtype))


def untie_head(model: nn.Module) -> bool:
    """Give the head its own copy of a tied embedding matrix; returns True when it was tied."""
    head, emb = M.lm_head(model), M.embed_tokens(model)
    if head.weight is not emb.weight and head.weight.data_ptr() != emb.weight.data_ptr():
        return False
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    for cfg in (model.config, getattr(model.config, "text_config", None), M.language_model(model).config):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    return True


@torch.no_grad()
def orthogonalize_model(model: Any, r: torch.Tensor, *, projector: bool = True) -> list[str]:
    """Orthogonalise a loaded model's residual-writing weights against `r` in place; returns what was edited.

    `projector=False` leaves an LVLM's projector alone (then image tokens still carry `r̂`; for analysis only).
    """
    model = M.unwrap(model)
    u = _unit(r, M.hidden_size(model))
    away = offloaded(model)
    if away:
        raise VlsafeError(f"cannot orthogonalise in place: {len(away)} weights are offloaded by the device map "
                          f"(e.g. {away[0]}); load without disk/CPU offload, or call orthogonalize_weights(spec, ...)")
    edited = ["lm_head (untied)"] if untie_head(model) else []
    emb = M.embed_tokens(model)
    _orth_rows(emb, u.to(emb.weight.device))
    edited.append("embed")
    ad = M.adapter(model)
    blocks = ad.blocks()
    for b in blocks:
        if b.attn_out is None or b.mlp_out is None:
            raise VlsafeError(f"layer {b.index}: {ad.source} names no attention output / MLP down projection "
                              f"to orthogonalise")
        _orth_out(b.attn_out, u.to(b.attn_out.weight.device))
        _orth_out(b.mlp_out, u.to(b.mlp_out.weight.device))
    cross = sum(b.cross for b in blocks)
    edited.append(f"o_proj, mlp.down_proj × {len(blocks)}" + (f" ({cross} cross-attention)" if cross else ""))
    proj = ad.module("projector_out") if projector else None
    if proj is not None:
        _orth_out(proj, u.to(proj.weight.device))
        edited.append("projector (last linear)")
    return edited


def orthogonalize_weights(checkpoint_or_model: str | os.PathLike | Checkpoint | LoadedModel, r: torch.Tensor,
                          out_dir: str | os.PathLike) -> Path:
    """Write a NEW checkpoint whose weights never write `r̂` into the residual stream.

    Accepts a spec, an opened `Checkpoint` or a `LoadedModel` (which is modified in place). The model is
    edited in fp64 and saved in its own dtype with its tokenizer/processor, via a temp dir then rename.
    """
    if isinstance(checkpoint_or_model, LoadedModel):
        lm = checkpoint_or_model
    else:
        lm = M.load(checkpoint_or_model, dtype="float32")
        lm.model.to(SAFETENSORS_DTYPES.get(lm.checkpoint.dtype, torch.float32))
    orthogonalize_model(lm.model, r)
    with atomic_path(out_dir) as tmp:
        lm.model.save_pretrained(tmp)
        (lm.processor or lm.tokenizer).save_pretrained(tmp)
    return Path(out_dir)
