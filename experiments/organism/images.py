"""Synthetic scenes with exact ground truth: identical shapes of one colour on a plain background.

Every scene has a `shape` (circle, square, triangle), a `colour` (red, green, blue, yellow), a `count` (1–3
objects), a `position` (left, right, top, bottom: all objects lie in that half of the image, and their mean box
centre is offset from the image centre mostly in that direction, by a clear margin — so the label is unambiguous
from the pixels) and a `background` (white, black, gray). Drawing is done with PIL *without* anti-aliasing, so every object pixel has exactly the
palette colour, objects never touch (connected components = count), and the ground truth can be re-derived from
the pixels (see `tests/test_synthetic_images.py`).

>>> from vlsafe.experiments.organism.images import sample_scenes, render
>>> scene = sample_scenes(1, seed=0)[0]
>>> scene.caption()          # e.g. 'two red circles on the left of a white background'
>>> render(scene)            # a 64×64 RGB PIL image
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230), "yellow": (240, 210, 20)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = (1, 2, 3)
ATTRIBUTES = ("shape", "colour", "count", "position", "background")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_GAP = 2  # minimum free pixels between two objects (so they never form one connected component)
SIDE_MARGIN = 0.08  # the objects' side must win over the other axis by this fraction of the image size


@dataclass(frozen=True)
class Scene:
    """One synthetic image's exact content; `boxes` are (x0, y0, x1, y1), inclusive pixel bounds."""

    shape: str
    colour: str
    count: int
    position: str
    background: str
    size: int = 64
    boxes: tuple[tuple[int, int, int, int], ...] = field(default=())

    def label(self, attribute: str) -> str:
        """The ground-truth answer for one attribute, as the short string the model should say."""
        return str(self.count) if attribute == "count" else str(getattr(self, attribute))

    def labels(self) -> dict[str, int]:
        """Class indices per attribute (for vision-tower pretraining)."""
        return {a: CLASSES[a].index(self.label(a)) for a in ATTRIBUTES}

    def noun(self) -> str:
        """'red circle' / 'two red circles'."""
        if self.count == 1:
            return f"one {self.colour} {self.shape}"
        return f"{NUMBER_WORDS[self.count]} {self.colour} {self.shape}s"

    def caption(self) -> str:
        """A one-line caption naming every attribute."""
        return f"{self.noun()} on the {self.position} of a {self.background} background"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CLASSES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": tuple(COLOURS), "count": tuple(str(c) for c in COUNTS), "position": POSITIONS,
    "background": tuple(BACKGROUNDS)}


def _region(position: str, size: int) -> tuple[int, int, int, int]:
    half = size // 2
    return {"left": (0, 0, half - 1, size - 1), "right": (half, 0, size - 1, size - 1),
            "top": (0, 0, size - 1, half - 1), "bottom": (0, half, size - 1, size - 1)}[position]


def side_of(boxes: Sequence[tuple[int, int, int, int]], size: int) -> tuple[str, float]:
    """The side of the image the objects' mean box centre lies towards, and the margin (pixels) by which that
    side wins over the other axis: left/right when the horizontal offset from the centre dominates, else
    top/bottom."""
    cx = sum((b[0] + b[2]) / 2 for b in boxes) / len(boxes) - (size - 1) / 2
    cy = sum((b[1] + b[3]) / 2 for b in boxes) / len(boxes) - (size - 1) / 2
    if abs(cx) >= abs(cy):
        return ("left" if cx < 0 else "right"), abs(cx) - abs(cy)
    return ("top" if cy < 0 else "bottom"), abs(cy) - abs(cx)


def _place(rng: random.Random, count: int, region: tuple[int, int, int, int], obj: int, position: str,
           size: int) -> list[tuple[int, ...]]:
    """`count` non-touching obj×obj boxes inside `region` whose group lies unambiguously towards `position`
    (rejection sampling; restarts on a dead end)."""
    x0, y0, x1, y1 = region
    margin = 1
    for _ in range(1000):
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(200):
            x = rng.randint(x0 + margin, x1 - margin - obj + 1)
            y = rng.randint(y0 + margin, y1 - margin - obj + 1)
            b = (x, y, x + obj - 1, y + obj - 1)
            if all(b[2] + _GAP < o[0] or o[2] + _GAP < b[0] or b[3] + _GAP < o[1] or o[3] + _GAP < b[1]
                   for o in boxes):
                boxes.append(b)
                if len(boxes) == count:
                    break
        if len(boxes) == count:
            side, won = side_of(boxes, size)
            if side == position and won >= SIDE_MARGIN * size:
                return boxes
    raise RuntimeError(f"cannot place {count} objects of {obj}px in region {region}")  # not reachable for size >= 48


def sample_scene(rng: random.Random, size: int = 64) -> Scene:
    """One random scene (uniform over attributes; object side 23–28 % of the image)."""
    shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
    count, position = rng.choice(COUNTS), rng.choice(POSITIONS)
    background = rng.choice(tuple(BACKGROUNDS))
    obj = rng.randint(max(4, round(size * 0.23)), max(5, round(size * 0.28)))
    boxes = _place(rng, count, _region(position, size), obj, position, size)
    return Scene(shape, colour, count, position, background, size, tuple(tuple(b) for b in boxes))


def sample_scenes(n: int, seed: int = 0, size: int = 64) -> list[Scene]:
    """`n` scenes from a seeded generator (the same seed gives the same scenes)."""
    rng = random.Random(seed)
    return [sample_scene(rng, size) for _ in range(n)]


def render(scene: Scene) -> Image.Image:
    """Draw `scene` as an RGB image (no anti-aliasing: exact palette colours)."""
    img = Image.new("RGB", (scene.size, scene.size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    fill = COLOURS[scene.colour]
    for x0, y0, x1, y1 in scene.boxes:
        if scene.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif scene.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img
