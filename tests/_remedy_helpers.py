"""Shared pieces of the remedy tests: tiny inputs, planted shifts, vector files, block-input readers."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from safetensors.torch import save_file

from vlsafe.probes import models as M
from vlsafe.probes.patching import image_token_ids
from vlsafe.probes.remedy_spec import RemedySpec
from vlsafe.probes.shift import ShiftResult

PROMPT = "How do I bake bread?"
PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "Hi"]
D = 64
K = 5  # trailing positions identical in an image row and its text-only twin (prompt end + template suffix)


def _noise_image(seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _vec(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _planted() -> tuple[torch.Tensor, torch.Tensor, float]:
    """(u unit, w ⟂ u, c): the planted image shift is c·u + w."""
    u = _vec(11)
    u = u / u.norm()
    w = _vec(12)
    w = 0.7 * (w - (w @ u) * u) / (w - (w @ u) * u).norm()
    return u, w, 2.5


def _logits(lm, batch) -> torch.Tensor:
    with torch.no_grad():
        out = lm.model(**batch.model_inputs()).logits
    return out[batch.attention_mask.bool()]


@contextlib.contextmanager
def _plant(lm, layer: int, shift: torch.Tensor):
    """Add `shift` at block `layer`'s input on rows holding image tokens (rows found at the model's forward)."""
    ids, rows = torch.tensor(sorted(image_token_ids(lm))), {}

    def top(_m, args, kwargs):
        rows["r"] = torch.isin(kwargs["input_ids"], ids).any(-1)

    def block(_m, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h = (h.double() + rows["r"].double()[:, None, None] * shift).to(h.dtype)
        return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    hs = [lm.model.register_forward_pre_hook(top, with_kwargs=True),
          M.decoder_layers(lm.model)[layer].register_forward_pre_hook(block, with_kwargs=True)]
    try:
        yield
    finally:
        for h in hs:
            h.remove()


def _block_input(lm, batch, layer: int, ctx=contextlib.nullcontext) -> torch.Tensor:
    """Block `layer`'s input as edited by every hook registered before (the last forward's), fp64."""
    seen = []
    with ctx():
        hook = M.decoder_layers(lm.model)[layer].register_forward_pre_hook(
            lambda _m, a, k: seen.append((a[0] if a else k["hidden_states"]).detach().double()), with_kwargs=True)
        try:
            with torch.no_grad():
                lm.model(**batch.model_inputs())
        finally:
            hook.remove()
    return seen[-1]


def _spec(kind: str, tmp_path, **kw) -> RemedySpec:
    raw = {"kind": kind, "layers": kw.pop("layers", [0]), "alpha": kw.pop("alpha", 1.0), **kw}
    return RemedySpec.parse(raw, "test spec")


def _direction_file(tmp_path, v: torch.Tensor, name: str = "dir.safetensors") -> str:
    path = tmp_path / name
    save_file({"v": v.float().contiguous()}, str(path))
    return str(path)


def _shift_file(tmp_path, delta: torch.Tensor, layers=(0, 1)) -> str:
    """A real `shift_vectors.safetensors` whose harmful/harmless shifts average to `delta` at every layer."""
    spread = _vec(13)
    vec = {("blank", "harmful"): (delta + spread).expand(len(layers), 1, D).clone(),
           ("blank", "harmless"): (delta - spread).expand(len(layers), 1, D).clone()}
    norms = {k: torch.ones(len(layers), 1) for k in vec}
    res = ShiftResult(list(layers), [-1], vec, norms, {"harmful": 1, "harmless": 1})
    return str(res.save(tmp_path / "shift_vectors.safetensors"))


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg
