"""The synthetic scene generator: the ground truth is re-derived from the pixels alone."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from vlsafe.experiments.organism.images import BACKGROUNDS, CLASSES, COLOURS, render, sample_scenes


def _decode(img) -> dict[str, str]:
    """Recover every attribute from the pixels (no access to the Scene)."""
    a = np.asarray(img).astype(int)
    size = a.shape[0]
    colours = Counter(map(tuple, a.reshape(-1, 3)))
    assert len(colours) == 2, f"expected exactly background + one object colour, got {len(colours)} colours"
    corner = tuple(a[0, 0]) if tuple(a[0, 0]) in colours else None
    bg_rgb = max(colours, key=colours.get) if corner is None else corner
    obj_rgb = next(c for c in colours if c != bg_rgb)
    background = next(k for k, v in BACKGROUNDS.items() if v == bg_rgb)
    colour = next(k for k, v in COLOURS.items() if v == obj_rgb)
    mask = (a == np.array(obj_rgb)).all(-1)
    labelled, count = ndimage.label(mask)  # 4-connectivity
    _, n8 = ndimage.label(mask, structure=np.ones((3, 3)))
    assert n8 == count, "objects touch diagonally"
    ys, xs = np.nonzero(mask)
    half = size // 2
    halves = {"left": xs.max() < half, "right": xs.min() >= half, "top": ys.max() < half, "bottom": ys.min() >= half}
    fills, centres = [], []
    for k in range(1, count + 1):
        yy, xx = np.nonzero(labelled == k)
        box = (yy.max() - yy.min() + 1) * (xx.max() - xx.min() + 1)
        fills.append(len(yy) / box)
        centres.append(((xx.max() + xx.min()) / 2, (yy.max() + yy.min()) / 2))
    dx, dy = np.mean(centres, axis=0) - (size - 1) / 2
    side = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("top" if dy < 0 else "bottom")
    assert abs(abs(dx) - abs(dy)) >= 0.08 * size - 1e-9, "position is ambiguous"
    assert halves[side], "objects spill out of their half"
    fill = float(np.mean(fills))
    shape = "square" if fill > 0.95 else "circle" if fill > 0.66 else "triangle"
    return {"background": background, "colour": colour, "count": str(count), "position": side, "shape": shape,
            "fills": fills}


def test_ground_truth_recovered_from_pixels():
    scenes = sample_scenes(300, seed=11)
    for i, s in enumerate(scenes):
        d = _decode(render(s))
        assert d["background"] == s.background, i
        assert d["colour"] == s.colour, i
        assert d["count"] == str(s.count), i
        assert d["position"] == s.position, i
        assert d["shape"] == s.shape, (i, s.shape, d["fills"])


def test_boxes_hold_every_object_pixel_and_labels_match():
    for s in sample_scenes(50, seed=3):
        a = np.asarray(render(s))
        mask = (a == np.array(COLOURS[s.colour])).all(-1)
        inside = np.zeros_like(mask)
        for x0, y0, x1, y1 in s.boxes:
            inside[y0:y1 + 1, x0:x1 + 1] = True
            assert mask[y0:y1 + 1, x0:x1 + 1].any()
        assert not (mask & ~inside).any()
        assert len(s.boxes) == s.count
        assert {a: CLASSES[a][i] for a, i in s.labels().items()} == {
            "shape": s.shape, "colour": s.colour, "count": str(s.count), "position": s.position,
            "background": s.background}


def test_seeded_and_covers_every_value():
    a, b = sample_scenes(20, seed=5), sample_scenes(20, seed=5)
    assert a == b and [render(x).tobytes() for x in a] == [render(x).tobytes() for x in b]
    assert sample_scenes(20, seed=6) != a
    many = sample_scenes(400, seed=0)
    for attr, values in CLASSES.items():
        seen = {s.label(attr) for s in many}
        assert seen == set(values), attr


@pytest.mark.parametrize("size", [48, 64, 96])
def test_other_sizes(size):
    for s in sample_scenes(30, seed=size, size=size):
        d = _decode(render(s))
        assert d["count"] == str(s.count) and d["colour"] == s.colour and d["position"] == s.position
        assert render(s).size == (size, size)
