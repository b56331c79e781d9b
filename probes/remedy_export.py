"""Export a constant steering remedy as a plain checkpoint: the vector folded into biases, no hooks needed.

Adding v at block ℓ's input (every position) equals a bias v on block ℓ−1's MLP output projection (the last
module that writes into the residual stream before block ℓ). For Llama-style families the (text) config gets
`mlp_bias: true`, so transformers builds a bias for every linear of every MLP: they are zero except the down
projection of block ℓ−1, which holds Σ α·v. Layer 0 has no block before it: v goes into every embedding row (tied
embeddings are untied first) and, for an LVLM, into the bias of the projector's last linear (`projector_out`), so
text and image tokens both enter block 0 shifted by v. Families whose config has no `mlp_bias` switch are refused.

>>> export_remedy(RemedySpec.from_yaml("steer.yaml"), "runs/steered", checkpoint="runs/organism/lvlm")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlsafe.analysis.checkpoints import Checkpoint, LoadedModel
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.runinfo import atomic_path, check_out_dir, write_run_json
from vlsafe.probes import models as M
from vlsafe.probes.interventions import SAFETENSORS_DTYPES, untie_head
from vlsafe.probes.remedy_spec import RemedySpec, vectors

RUN_KIND = "export_remedy"
__all__ = ["export_remedy", "fold_steering", "RUN_KIND"]


def _configs(model: nn.Module) -> list[Any]:
    """The config objects that describe the language model (top-level, `text_config`, the LM's own)."""
    cfgs = [M.language_model(model).config, getattr(model.config, "text_config", None), model.config]
    out: list[Any] = []
    for c in cfgs:
        if c is not None and all(c is not o for o in out):
            out.append(c)
    return out


def _enable_mlp_bias(model: nn.Module) -> None:
    """`mlp_bias = True` in the text config and a zero bias on every bias-less linear of every MLP."""
    text = _configs(model)[0]
    if not hasattr(text, "mlp_bias"):
        raise VlsafeError(f"{M.adapter(model).family} family: its text config ({type(text).__name__}) has no "
                          f"'mlp_bias' switch, so a steering vector cannot be folded into biases")
    for cfg in _configs(model):
        if hasattr(cfg, "mlp_bias") or cfg is text:
            cfg.mlp_bias = True
    for block in M.blocks(model):
        for lin in block.mlp.modules():
            if isinstance(lin, nn.Linear) and lin.bias is None:
                w = lin.weight
                lin.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)


def _add_bias(lin: nn.Module | None, v: torch.Tensor, what: str) -> None:
    if lin is None or getattr(lin, "bias", None) is None:
        raise VlsafeError(f"cannot fold a layer-0 steering vector: the model has no {what} bias")
    b = lin.bias.data
    b.copy_((b.to(torch.float64) + v.to(b.device)).to(b.dtype))


@torch.no_grad()
def fold_steering(model: Any, shifts: Mapping[int, torch.Tensor]) -> list[str]:
    """Fold `h ← h + shifts[ℓ]` at block ℓ's input (every position) into `model`'s biases, in place; returns
    what was edited. `model` is a transformers model or a `LoadedModel`."""
    model = M.unwrap(model)
    blocks = M.blocks(model)
    edited: list[str] = []
    if any(ℓ > 0 for ℓ in shifts):
        _enable_mlp_bias(model)
    for ℓ, v in sorted(shifts.items()):
        v = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
        if not 0 <= ℓ < len(blocks):
            raise VlsafeError(f"layer {ℓ} out of range for a {len(blocks)}-layer model")
        if ℓ > 0:
            if blocks[ℓ - 1].mlp_out is None:
                raise VlsafeError(f"layer {ℓ - 1}: {M.adapter(model).source} names no MLP output projection")
            _add_bias(blocks[ℓ - 1].mlp_out, v, f"layer {ℓ - 1} MLP output projection")
            edited.append(f"layer {ℓ - 1} mlp_out bias")
            continue
        if untie_head(model):
            edited.append("lm_head (untied)")
        emb = M.embed_tokens(model).weight.data
        emb.copy_((emb.to(torch.float64) + v.to(emb.device)).to(emb.dtype))
        edited.append("embed rows")
        if M.adapter(model).paths.projector is not None:
            _add_bias(M.adapter(model).module("projector_out"), v, "projector output (projector_out)")
            edited.append("projector_out bias")
    return edited


def export_remedy(spec: RemedySpec, out_dir: str | os.PathLike, *,
                  checkpoint: str | os.PathLike | Checkpoint | LoadedModel | None = None) -> Path:
    """Write an HF checkpoint of `checkpoint` (default: the spec's) with the constant steering of `spec` in its
    biases, its tokenizer/processor and a `run.json`; atomically (nothing is written on error). A `LoadedModel`
    is edited in place."""
    if spec.kind != "steer" or spec.positions != "all":
        raise VlsafeError(f"{spec.source}: only a constant steer (kind steer, positions all) can be exported, "
                          f"got kind {spec.kind!r}, positions {spec.positions!r}")
    ckpt = checkpoint if checkpoint is not None else spec.checkpoint
    if ckpt is None:
        raise VlsafeError(f"{spec.source}: no checkpoint to export (give 'checkpoint:' or --checkpoint)")
    source = ckpt.checkpoint if isinstance(ckpt, LoadedModel) else ckpt
    check_out_dir(out_dir, inputs=[getattr(source, "path", source)])
    if isinstance(ckpt, LoadedModel):
        lm = ckpt
    else:
        lm = M.load(ckpt, dtype="float32")
        lm.model.to(SAFETENSORS_DTYPES.get(lm.checkpoint.dtype, torch.float32))
    shifts = {ℓ: spec.alpha * v for ℓ, v in vectors(spec, lm).items()}
    edited = fold_steering(lm.model, shifts)
    with atomic_path(out_dir) as tmp:
        lm.model.save_pretrained(tmp)
        (lm.processor or lm.tokenizer).save_pretrained(tmp)
        base = lm.checkpoint if getattr(lm, "checkpoint", None) is not None else str(ckpt)
        write_run_json(tmp, kind=RUN_KIND, tables={}, command="export-remedy",
                       config=spec.model_dump(mode="json"), checkpoints={"base": base},
                       extra={"remedy_key": spec.key(), "edited": edited})
    return Path(out_dir)
