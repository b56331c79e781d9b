"""Images for image-conditioned prompt variants, named by a short spec string.

Specs: ``blank`` (uniform mid-grey), ``noise`` or ``noise:SEED`` (seeded uniform RGB noise), or a path to an image
file. The spec string is what a :class:`~vlsafe.probes.behavior.datasets.PromptRecord` stores in ``image``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlsafe.analysis.errors import VlsafeError

BLANK_GREY = (128, 128, 128)


def parse_image_spec(spec: str) -> tuple[str, int | Path | None]:
    """``("blank", None)``, ``("noise", seed)`` or ``("path", Path)``; a bad spec raises :class:`VlsafeError`."""
    text = str(spec).strip()
    if text == "blank":
        return "blank", None
    if text == "noise" or text.startswith("noise:"):
        seed = text.partition(":")[2] or "0"
        try:
            value = int(seed)
        except ValueError:
            raise VlsafeError(f"{text}: noise seed must be a non-negative integer, e.g. noise:0") from None
        if value < 0:
            raise VlsafeError(f"{text}: noise seed must be a non-negative integer, e.g. noise:0")
        return "noise", value
    path = Path(text).expanduser()
    if not text or not path.is_file():
        raise VlsafeError(f"{text or '(empty)'}: not an image spec (blank, noise:SEED) or an existing image file")
    return "path", path


def make_image(spec: str, size: int = 224) -> Image.Image:
    """An RGB image for ``spec``; ``size`` (pixels per side) applies to ``blank`` and ``noise``, files keep theirs."""
    kind, arg = parse_image_spec(spec)
    if kind == "blank":
        return Image.new("RGB", (size, size), BLANK_GREY)
    if kind == "noise":
        pixels = np.random.default_rng(int(arg)).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        return Image.fromarray(pixels)
    try:
        with Image.open(arg) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise VlsafeError(f"{arg}: cannot read image ({type(exc).__name__})") from None
