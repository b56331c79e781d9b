"""The organism's vision tower: a small CLIP (or SigLIP) ViT at low resolution, pretrained on synthetic scenes.

LLaVA plugs a *pretrained, frozen* encoder (CLIP ViT-L/14-336) into the LLM. No pretrained encoder can be
downloaded here, and a random frozen tower would carry little usable signal, so the tower is pretrained briefly by
supervised attribute classification: five linear heads (shape, colour, count, position, background) read the
concatenated patch tokens of the layer that LLaVA later feeds to the projector (`vision_feature_layer = -1`, CLS
dropped for CLIP). Classification was chosen over a contrastive objective because the attributes are exactly known and
few, it converges in a few hundred CPU steps, and it forces the *patch* features (what LLaVA consumes) — not just a
pooled CLS token — to carry every attribute. The heads are discarded; the tower is then frozen for all later
stages, as in LLaVA.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from experiments.organism.images import ATTRIBUTES, CLASSES, render, sample_scene


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


def patch_features(tower: nn.Module, pixel_values: torch.Tensor, kind: str) -> torch.Tensor:
    """What LLaVA hands to the projector: the last layer's hidden states, CLS dropped for CLIP."""
    hidden = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
    return hidden[:, 1:] if kind == "clip" else hidden


class AttributeHeads(nn.Module):
    """One linear classifier per scene attribute over the concatenated patch features (so each patch token must
    describe its own piece of the image, and position stays readable, as the LLM will need)."""

    def __init__(self, hidden: int, n_patches: int):
        super().__init__()
        self.heads = nn.ModuleDict({a: nn.Linear(hidden * n_patches, len(CLASSES[a])) for a in ATTRIBUTES})

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = feats.flatten(1)
        return {a: h(flat) for a, h in self.heads.items()}


def _dataset(processor: Any, n: int, seed: int | random.Random, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    scenes = [sample_scene(rng, size) for _ in range(n)]
    pix = processor(images=[render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    labels = torch.tensor([[s.labels()[a] for a in ATTRIBUTES] for s in scenes])
    return pix, labels


@torch.no_grad()
def attribute_accuracy(tower: nn.Module, heads: AttributeHeads, pix: torch.Tensor, labels: torch.Tensor,
                       kind: str, batch: int = 128) -> dict[str, float]:
    """Held-out accuracy per attribute."""
    correct = torch.zeros(len(ATTRIBUTES))
    for s in range(0, len(pix), batch):
        logits = heads(patch_features(tower, pix[s:s + batch], kind))
        for j, a in enumerate(ATTRIBUTES):
            correct[j] += (logits[a].argmax(-1) == labels[s:s + batch, j]).sum()
    return {a: float(correct[j] / len(pix)) for j, a in enumerate(ATTRIBUTES)}


def pretrain(cfg: Any, image_size: int, seed: int, seed_eval: int, *, progress: bool = True,
             ) -> tuple[nn.Module, Any, pd.DataFrame, dict[str, float]]:
    """Pretrain a tower on attribute classification; returns (tower, processor, log, held-out accuracy)."""
    from tqdm.auto import tqdm
    from transformers import AutoModel, get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    processor = image_processor(cfg, image_size)
    tower = AutoModel.from_config(vision_config(cfg, image_size))
    heads = AttributeHeads(cfg.hidden, (image_size // cfg.patch) ** 2)
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
        logits = heads(patch_features(tower, pix, cfg.kind))
        loss = sum(nn.functional.cross_entropy(logits[a], labels[:, j]) for j, a in enumerate(ATTRIBUTES))
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
