"""The organism's vision tower: a small CLIP (or SigLIP) ViT at low resolution, pretrained on synthetic scenes.

LLaVA plugs a *pretrained, frozen* encoder (CLIP ViT-L/14-336) into the LLM. No pretrained encoder can be
downloaded here, and a random frozen tower would carry little usable signal, so the tower is pretrained briefly by
supervised attribute classification: five linear heads (shape, colour, count, position, background) read the
concatenated patch tokens of the layer that LLaVA later feeds to the projector (`vision_feature_layer = -1`), and,
with `keep_cls`, five more read the CLS token of that layer. Classification was chosen over a contrastive objective
because the attributes are exactly known and few, it converges in a few hundred CPU steps, and it forces the
tokens LLaVA consumes to carry every attribute. The heads are discarded; the tower is then frozen for all later
stages, as in LLaVA.

`keep_cls` (LLaVA's `vision_feature_select_strategy="full"`; LLaVA-1.5 itself uses "default", patches only): a
CLIP CLS token that summarises the scene gives the tiny projector a token it can ground in ~100 CPU steps; the
patch tokens are kept too.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from vlsafe.experiments.organism.images import ATTRIBUTES, CLASSES, render, sample_scene


def vision_config(cfg: Any, image_size: int) -> Any:
    """A `CLIPVisionConfig` / `SiglipVisionConfig` from the organism's `vision` section."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    common = dict(hidden_size=cfg.hidden, intermediate_size=cfg.hidden * 4, num_hidden_layers=cfg.layers,
                  num_attention_heads=cfg.heads, image_size=image_size, patch_size=cfg.patch)
    if cfg.kind == "clip":
        return CLIPVisionConfig(projection_dim=cfg.hidden, **common)
    return SiglipVisionConfig(**common)


def image_processor(cfg: Any, image_size: int) -> Any:
    """The matching image processor (resize/crop to `image_size`, CLIP or SigLIP normalisation)."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    if cfg.kind == "clip":
        return CLIPImageProcessor(size={"shortest_edge": image_size},
                                  crop_size={"height": image_size, "width": image_size})
    return SiglipImageProcessor(size={"height": image_size, "width": image_size})


def has_cls(kind: str) -> bool:
    return kind == "clip"


def tower_features(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The last layer's hidden states, every token (CLIP: CLS first, then the patches)."""
    return tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]


class AttributeHeads(nn.Module):
    """Per attribute: a linear classifier over the concatenated patch tokens (each patch must describe its own piece
    of the image; position stays readable) and, with `cls`, one over the CLS token."""

    def __init__(self, hidden: int, n_patches: int, cls: bool):
        super().__init__()
        self.cls = cls
        self.patches = nn.ModuleDict({a: nn.Linear(hidden * n_patches, len(CLASSES[a])) for a in ATTRIBUTES})
        self.cls_heads = nn.ModuleDict({a: nn.Linear(hidden, len(CLASSES[a])) for a in ATTRIBUTES}) if cls else None

    def forward(self, feats: torch.Tensor, has_cls_token: bool) -> dict[str, dict[str, torch.Tensor]]:
        patches = feats[:, 1:] if has_cls_token else feats
        out = {"patches": {a: h(patches.flatten(1)) for a, h in self.patches.items()}}
        if self.cls_heads is not None:
            out["cls"] = {a: h(feats[:, 0]) for a, h in self.cls_heads.items()}
        return out


def _dataset(processor: Any, n: int, seed: int | random.Random, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    scenes = [sample_scene(rng, size) for _ in range(n)]
    pix = processor(images=[render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    labels = torch.tensor([[s.labels()[a] for a in ATTRIBUTES] for s in scenes])
    return pix, labels


@torch.no_grad()
def attribute_accuracy(tower: nn.Module, heads: AttributeHeads, pix: torch.Tensor, labels: torch.Tensor,
                       kind: str, batch: int = 128) -> dict[str, float]:
    """Held-out accuracy per attribute and head (`patches:shape`, `cls:shape`, …)."""
    correct: dict[str, float] = {}
    for s in range(0, len(pix), batch):
        out = heads(tower_features(tower, pix[s:s + batch]), has_cls(kind))
        for src, logits in out.items():
            for j, a in enumerate(ATTRIBUTES):
                key = f"{src}:{a}"
                correct[key] = correct.get(key, 0.0) + float((logits[a].argmax(-1) == labels[s:s + batch, j]).sum())
    return {k: v / len(pix) for k, v in correct.items()}


def pretrain(cfg: Any, image_size: int, seed: int, seed_eval: int, *, progress: bool = True,
             ) -> tuple[nn.Module, Any, pd.DataFrame, dict[str, float]]:
    """Pretrain a tower on attribute classification; returns (tower, processor, log, held-out accuracy)."""
    from tqdm.auto import tqdm
    from transformers import AutoModel, get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    processor = image_processor(cfg, image_size)
    tower = AutoModel.from_config(vision_config(cfg, image_size))
    heads = AttributeHeads(cfg.hidden, (image_size // cfg.patch) ** 2, cfg.keep_cls and has_cls(cfg.kind))
    train_rng = random.Random(seed)  # fresh scenes every step: no image is seen twice
    ev_pix, ev_labels = _dataset(processor, cfg.n_eval, seed_eval, image_size)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, max(1, cfg.steps // 20), cfg.steps)
    rows = []
    tower.train()
    bar = tqdm(range(1, cfg.steps + 1), desc="vision pretrain", disable=not progress, leave=False)
    for step in bar:
        pix, labels = _dataset(processor, cfg.batch_size, train_rng, image_size)
        out = heads(tower_features(tower, pix), has_cls(cfg.kind))
        loss = sum(nn.functional.cross_entropy(logits[a], labels[:, j])
                   for logits in out.values() for j, a in enumerate(ATTRIBUTES))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        rows.append({"step": step, "loss": float(loss.detach())})
        bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}")
    tower.eval()
    acc = attribute_accuracy(tower, heads, ev_pix, ev_labels, cfg.kind)
    for p in tower.parameters():
        p.requires_grad_(False)
    return tower, processor, pd.DataFrame(rows), acc


def save_tower(tower: nn.Module, processor: Any, out: Path) -> None:
    """Save the tower (HF `save_pretrained`) and its image processor into `out`."""
    tower.save_pretrained(out)
    processor.save_pretrained(out)
