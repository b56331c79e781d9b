"""Image-induced shift: how attaching an image moves the hidden states that inference-time remedies act on.

Per layer ℓ (block input, `resid_pre`) and prompt position p (the last prompt positions: the tokens the chat
template puts after the user message, identical with and without an image), for a prompt set and one image
condition:

    δ_ℓp = mean over prompts of h_ℓp(text + image) − h_ℓp(text)

(the dataset-level CMRM shift). Reported with its norm relative to the mean ‖h_ℓp(text)‖ and its projection on a
refusal direction r̂_ℓp (the aligned model's difference in means, harmful − harmless, text only). A *caption*
condition replaces the image by its caption prepended as text (`caption\\nprompt`), the ShiftDC control.

>>> conds = [Condition("blank", images=[img] * n)]
>>> res = image_shift(lvlm, {"harmful": hp, "harmless": bp}, conds, direction=r)   # r: [L, P, d]
>>> res.table(); res.save("shift_vectors.safetensors")
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.runinfo import atomic_path
from vlsafe.probes.capture import capture

FORMAT = "vlsafe.shift/1"
__all__ = ["Condition", "ShiftResult", "image_shift", "refusal_direction", "FORMAT"]


@dataclass
class Condition:
    """One image condition: `images` (one PIL image per prompt, or one for all) or `captions` (one string per
    prompt, prepended as text); exactly one of the two."""

    name: str
    images: Any = None
    captions: Sequence[str] | None = None

    def inputs(self, prompts: Sequence[str]) -> tuple[list[str], Any]:
        """(prompts, images) of the shifted run; per-prompt lists may be longer than `prompts` (the first ones
        are used), never shorter."""
        if (self.images is None) == (self.captions is None):
            raise VlsafeError(f"shift condition {self.name!r}: give images or captions (exactly one)")
        given = self.captions if self.captions is not None else self.images
        if isinstance(given, (list, tuple)) and len(given) < len(prompts):
            what = "captions" if self.captions is not None else "images"
            raise VlsafeError(f"shift condition {self.name!r}: {len(given)} {what} for {len(prompts)} prompts")
        if self.captions is None:
            imgs = list(self.images)[:len(prompts)] if isinstance(self.images, (list, tuple)) else self.images
            return list(prompts), imgs
        return [f"{c}\n{p}" for c, p in zip(self.captions, prompts)], None


@dataclass
class ShiftResult:
    """`vectors[(condition, label)]` = δ `[L, P, d]` fp64; `norms[(condition, label)]` = mean ‖h(text)‖
    `[L, P]`."""

    layers: list[int]
    positions: list[Any]
    vectors: dict[tuple[str, str], torch.Tensor]
    norms: dict[tuple[str, str], torch.Tensor]
    n: dict[str, int]
    direction: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """`shift.csv`: condition, label, layer, position, shift_norm, relative_norm, refusal_projection,
        refusal_cosine, n (NaN projections without a direction)."""
        rows = []
        for (cond, label), v in self.vectors.items():
            norm = v.norm(dim=-1)
            rel = norm / self.norms[(cond, label)]
            if self.direction is not None:
                unit = self.direction / self.direction.norm(dim=-1, keepdim=True)
                proj = (v * unit).sum(-1)
                cos = proj / norm
            for li, layer in enumerate(self.layers):
                for pi, pos in enumerate(self.positions):
                    rows.append({"condition": cond, "label": label, "layer": layer, "position": pos,
                                 "shift_norm": float(norm[li, pi]), "relative_norm": float(rel[li, pi]),
                                 "refusal_projection": float(proj[li, pi]) if self.direction is not None else None,
                                 "refusal_cosine": float(cos[li, pi]) if self.direction is not None else None,
                                 "n": self.n[label]})
        return pd.DataFrame(rows)

    def save(self, path: str | os.PathLike) -> Path:
        """Write `shift_vectors.safetensors` atomically: `shift/<condition>/<label>` `[L, P, d]` fp32 (and
        `refusal_direction`), metadata `{"format", "layers", "positions", ...}`."""
        from safetensors.torch import save_file

        tensors = {f"shift/{c}/{lab}": v.float().contiguous() for (c, lab), v in self.vectors.items()}
        if self.direction is not None:
            tensors["refusal_direction"] = self.direction.float().contiguous()
        meta = {"format": FORMAT, "layers": self.layers, "positions": [str(p) for p in self.positions],
                "hook": "resid_pre", **self.meta}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"vlsafe": json.dumps(meta, default=str)})
        return Path(path)


def _mean_states(lm: Any, prompts: Sequence[str], images: Any, positions: Any, batch_size: int,
                 progress: bool) -> tuple[torch.Tensor, list[int], list[Any]]:
    acts = capture(lm, list(prompts), hooks="resid_pre", positions=positions, images=images, batch_size=batch_size,
                   progress=progress)
    return acts.stack("resid_pre").to(torch.float64), acts.layers, acts.positions


def refusal_direction(lm: Any, harmful: Sequence[str], harmless: Sequence[str], *, positions: Any = "post_instruction",
                      batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """Difference in means (harmful − harmless), text only, at `resid_pre`: `[L, P, d]` fp64
    (`vlsafe.probes.directions.mean_diff` of the two sets' activations)."""
    from vlsafe.probes.directions import mean_diff

    acts = [capture(lm, list(ps), hooks="resid_pre", positions=positions, batch_size=batch_size, progress=progress)
            for ps in (harmful, harmless)]
    return mean_diff(*acts)


def image_shift(lm: Any, prompts: Mapping[str, Sequence[str]], conditions: Sequence[Condition], *,
                direction: torch.Tensor | None = None, positions: Any = "post_instruction", batch_size: int = 8,
                progress: bool = False) -> ShiftResult:
    """The image-induced shift of `lm` for every (condition, prompt label); see the module docstring.

    `prompts` maps a label (`harmful`, `harmless`) to its prompts; `direction` `[L, P, d]` (same layers and
    positions) adds the projections."""
    if not conditions:
        raise VlsafeError("image shift: no image conditions given")
    vectors, norms, n = {}, {}, {}
    layers = pos = None
    for label, ps in prompts.items():
        ps = list(ps)
        if not ps:
            raise VlsafeError(f"image shift: empty prompt set {label!r}")
        n[label] = len(ps)
        text, layers, pos = _mean_states(lm, ps, None, positions, batch_size, progress)
        for cond in conditions:
            texts, imgs = cond.inputs(ps)
            shifted = _mean_states(lm, texts, imgs, positions, batch_size, progress)[0]
            vectors[(cond.name, label)] = (shifted - text).mean(0)
            norms[(cond.name, label)] = text.norm(dim=-1).mean(0)
    if direction is not None:
        direction = torch.as_tensor(direction, dtype=torch.float64)
        want = next(iter(vectors.values())).shape
        if tuple(direction.shape) != tuple(want):
            raise VlsafeError(f"refusal direction has shape {tuple(direction.shape)}, the shifts {tuple(want)} "
                              "([layers, positions, d])")
    return ShiftResult(layers, pos, vectors, norms, n, direction)
