"""The report in a real browser: headless Chromium renders it and every figure is visibly drawn.

Needs Debian's `chromium`, which `make test` installs. Outside `make test` it is skipped when absent; under
`make test` (VLSAFE_REQUIRE_CHROMIUM=1, as on CI) a missing browser fails the test instead of skipping it.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlsafe.experiments.report import build_report
from test_report import _make_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


_RECTS_JS = """<script>window.addEventListener('load', () => {
  const r = [...document.images].map(i => { const b = i.getBoundingClientRect();
    return [i.alt, i.naturalWidth, Math.round(b.left), Math.round(b.top + window.scrollY),
            Math.round(b.width), Math.round(b.height)]; });
  document.body.setAttribute('data-rects', JSON.stringify(r)); });</script>"""
WINDOW = "--window-size=1100,9000"


def _chromium(*args: str, profile: Path) -> str:
    out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", WINDOW, "--virtual-time-budget=5000",
                          *args], check=True, capture_output=True, text=True, timeout=120)
    return out.stdout


def image_rects(page: Path, profile: Path) -> list[list]:
    """[alt, naturalWidth, x, y, w, h] of every <img>, as laid out by Chromium at the screenshot's width."""
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", _RECTS_JS + "</body>"))
    dom = _chromium("--dump-dom", probe.as_uri(), profile=profile)
    m = re.search(r'data-rects="([^"]*)"', dom)
    assert m, "Chromium did not run the layout probe"
    return json.loads(html.unescape(m.group(1)))


def region_visible(shot: np.ndarray, x: int, y: int, w: int, h: int) -> bool:
    """True when the screenshot region holds a drawn figure: enough ink and contrast, not a blank box."""
    crop = shot[y:y + h, x:x + w]
    if crop.size == 0:
        return False
    ink = (crop.min(axis=2) < 200).mean()
    return bool(ink > 0.02 and crop.std() > 20)


REQUIRED = os.environ.get("VLSAFE_REQUIRE_CHROMIUM") == "1"


@pytest.mark.skipif(CHROMIUM is None and not REQUIRED, reason="chromium not installed (make test installs it)")
def test_report_figures_visible_in_chromium(tmp_path: Path) -> None:
    assert CHROMIUM is not None, "chromium is required here (VLSAFE_REQUIRE_CHROMIUM=1) but not installed"
    _make_run(tmp_path)
    page = build_report(tmp_path)
    n_figs = len(re.findall(r"<img ", page.read_text()))
    rects = image_rects(page, tmp_path / "profile")
    assert len(rects) == n_figs == 8
    shot_png = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot_png}", page.as_uri(), profile=tmp_path / "profile")
    shot = np.asarray(Image.open(shot_png).convert("RGB")).astype(int)
    for alt, natural_width, x, y, w, h in rects:
        assert natural_width > 0, f"{alt} did not decode"
        assert w > 200 and h > 100, f"{alt} laid out too small ({w}x{h})"
        assert y + h <= shot.shape[0], f"{alt} below the screenshot"
        assert region_visible(shot, x, y, w, h), f"{alt} is blank on screen"


def test_region_visible_tells_blank_from_drawn() -> None:
    img = np.full((200, 300, 3), 255, int)
    assert not region_visible(img, 0, 0, 300, 200)
    img[50:150, 20:280] = 30
    img[60:140, 30:270] = 250
    assert region_visible(img, 0, 0, 300, 200)
