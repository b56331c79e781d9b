"""A figure check a person would make, run in headless Chromium: the helpers of `test_report_browser.py`.

`CHECK_JS`, injected into a copy of a report page, measures every figure as the browser lays it out and writes
the result into the page (read back with `--dump-dom`): per figure (an inline `svg.figure` inside a `<figure>`)
its rectangle, the pairs of text labels whose boxes overlap, the labels that leave the figure, the data labels
(SVG groups `label-N`) that leave their axes, the legends that lie on an axes' data area, and its caption. It
then hovers the first Pareto point and a heat-map cell and records the tooltip shown.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
WINDOW = "--window-size=1100,9000"
TOL = 1.0  # px: boxes touching by less than this do not count as overlapping

CHECK_JS = """<script>window.addEventListener('load', () => {
  const T = %TOL%, box = el => el.getBoundingClientRect();
  const hit = (a, b) => Math.min(a.right, b.right) - Math.max(a.left, b.left) > T
                      && Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top) > T;
  const within = (a, b) => a.left >= b.left - T && a.right <= b.right + T && a.top >= b.top - T
                          && a.bottom <= b.bottom + T;
  const patch = g => { const p = g && g.querySelector(':scope > g[id^="patch_"] > path'); return p ? box(p) : null; };
  const out = {figures: {}, tips: {}};
  for (const fig of document.querySelectorAll('figure')) {
    const svg = fig.querySelector('svg.figure'); if (!svg) continue;
    const r = box(svg), texts = [...svg.querySelectorAll('text')].filter(t => t.textContent.trim());
    const rects = texts.map(box), f = {overlaps: [], outside: [], label_outside_axes: [], legend_on_data: []};
    for (let i = 0; i < texts.length; i++) {
      for (let j = i + 1; j < texts.length; j++)
        if (hit(rects[i], rects[j])) f.overlaps.push([texts[i].textContent, texts[j].textContent]);
      if (!within(rects[i], r)) f.outside.push(texts[i].textContent);
      const lab = texts[i].closest('g[id^="label-"]');
      const ax = lab && patch(lab.closest('g[id^="axes_"]'));
      if (ax && !within(rects[i], ax)) f.label_outside_axes.push(texts[i].textContent);
    }
    const axes = [...svg.querySelectorAll('g[id^="axes_"]')].map(patch).filter(Boolean);
    for (const lg of svg.querySelectorAll('g[id^="legend_"]'))
      if (axes.some(a => hit(box(lg), a))) f.legend_on_data.push(lg.textContent.trim().slice(0, 60));
    const cap = fig.querySelector('figcaption');
    Object.assign(f, {rect: [r.left, r.top + window.scrollY, r.width, r.height].map(Math.round),
                      n_texts: texts.length, caption: cap ? cap.textContent : '',
                      sources: cap ? [...cap.querySelectorAll('.source code')].map(c => c.textContent) : []});
    out.figures[svg.dataset.stem] = f;
  }
  const tip = () => { const t = document.getElementById('vlsafe-tip'); return t ? t.textContent : null; };
  const hover = (el, x, y) => el.dispatchEvent(new MouseEvent('mousemove', {clientX: x, clientY: y, bubbles: true}));
  const pt = document.getElementById('pareto-pt-1');
  if (pt) { const b = box(pt); hover(pt, b.left + b.width / 2, b.top + b.height / 2); out.tips.pareto = tip(); }
  const hm = document.getElementById('heatmap-weight');
  if (hm) { const b = box(hm), d = JSON.parse(document.getElementById('vlsafe-tips').textContent).heatmaps;
    const h = d['heatmap-weight'], c = h.cols.length - 1, k = h.rows.length - 1;  // the bottom-right cell
    hover(hm, b.left + (c + 0.5) * b.width / h.cols.length, b.top + (k + 0.5) * b.height / h.rows.length);
    out.tips.heatmap = tip(); }
  const ol = document.querySelector('ol.findings');
  out.findings_top = ol ? Math.round(box(ol).top + window.scrollY) : null;
  document.body.setAttribute('data-check', JSON.stringify(out)); });</script>""".replace("%TOL%", str(TOL))


def chromium(*args: str, profile: Path) -> str:
    """Run headless Chromium with the test flags; return its stdout."""
    out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", WINDOW, "--virtual-time-budget=5000",
                          *args], check=True, capture_output=True, text=True, timeout=120)
    return out.stdout


def check_page(page: Path, profile: Path) -> dict:
    """Lay `page` out in Chromium and return what `CHECK_JS` measured."""
    probe = page.with_name(page.stem + ".check.html")
    probe.write_text(page.read_text().replace("</body>", CHECK_JS + "</body>"))
    dom = chromium("--dump-dom", probe.as_uri(), profile=profile)
    m = re.search(r'data-check="([^"]*)"', dom)
    assert m, "Chromium did not run the figure check"
    return json.loads(html.unescape(m.group(1)))


def problems(fig: dict) -> list[str]:
    """What a reader would object to in one measured figure (empty when it passes)."""
    out = [f"labels overlap: {a!r} / {b!r}" for a, b in fig["overlaps"]]
    out += [f"label leaves the figure: {t!r}" for t in fig["outside"]]
    out += [f"label leaves its axes: {t!r}" for t in fig["label_outside_axes"]]
    out += [f"legend on the data: {t!r}" for t in fig["legend_on_data"]]
    if "Source:" not in fig["caption"] or not fig["sources"]:
        out.append("caption names no source table")
    return out
