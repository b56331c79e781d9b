"""The report's figures as inline SVG with hover tooltips, all inside the one HTML file (no network fetch).

Figures are written by matplotlib as SVG with real `<text>` elements (`svg.fonttype: none`), so the browser
draws the labels and a check can measure them. Tooltips: a JSON block (`<script id="vlsafe-tips">`) maps SVG
element ids to texts (`points`: Pareto points, `pareto-pt-N`) and heat-map images to their matrices
(`heatmaps`: id → rows, columns, values, label); a small script shows the text of the point under the mouse, or
the row, column and value of the heat-map cell under it.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import matplotlib
import numpy as np
import pandas as pd

TIP_CSS = """#vlsafe-tip{position:absolute;display:none;pointer-events:none;background:#fffff4;border:1px solid #999;
padding:.3em .5em;font-size:.8em;white-space:pre;box-shadow:0 1px 4px rgba(0,0,0,.25);z-index:10}
svg.figure{width:100%;height:auto;display:block}"""

TIP_JS = """<script>(() => {
  const tips = JSON.parse(document.getElementById('vlsafe-tips').textContent);
  const box = document.createElement('div'); box.id = 'vlsafe-tip'; document.body.appendChild(box);
  const show = (e, text) => { box.textContent = text; box.style.display = 'block';
    box.style.left = (e.pageX + 14) + 'px'; box.style.top = (e.pageY + 14) + 'px'; };
  const hide = () => { box.style.display = 'none'; };
  for (const [id, text] of Object.entries(tips.points)) {
    const el = document.getElementById(id); if (!el) continue;
    el.style.cursor = 'help'; el.addEventListener('mousemove', e => show(e, text));
    el.addEventListener('mouseleave', hide); }
  const fmt = v => v === null ? 'n/a' : Number(v).toPrecision(3);
  for (const [id, h] of Object.entries(tips.heatmaps)) {
    const el = document.getElementById(id); if (!el) continue;
    const img = el.tagName.toLowerCase() === 'image' ? el : el.querySelector('image'); if (!img) continue;
    img.addEventListener('mousemove', e => { const r = img.getBoundingClientRect();
      const c = Math.min(h.cols.length - 1, Math.floor((e.clientX - r.left) / r.width * h.cols.length));
      const k = Math.min(h.rows.length - 1, Math.floor((e.clientY - r.top) / r.height * h.rows.length));
      show(e, `${h.title}\\n${h.rows[k]}, layer ${h.cols[c]}\\n${h.label}: ${fmt(h.values[k][c])}`); });
    img.addEventListener('mouseleave', hide); }
})();</script>"""

_PROLOG = re.compile(r"^.*?(?=<svg)", re.S)
_SIZE = re.compile(r'<svg([^>]*?) width="[^"]*" height="[^"]*"')


def svg_tag(fig: Any, *, stem: str) -> str:
    """The figure as an inline `<svg class="figure">` that scales with the page, text kept as text."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg")
    svg = _PROLOG.sub("", buf.getvalue(), count=1)
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, count=1, flags=re.S)
    return _SIZE.sub(rf'<svg\1 class="figure" data-stem="{stem}" role="img" aria-label="{stem}"', svg, count=1)


def heatmap_tip(pivot: pd.DataFrame, *, title: str, label: str) -> dict[str, Any]:
    """The tooltip data of a heat map drawn from `pivot` (rows top to bottom, columns left to right)."""
    vals = pivot.to_numpy(dtype=float)
    return {"title": title, "label": label, "rows": [str(r) for r in pivot.index],
            "cols": [str(c) for c in pivot.columns],
            "values": [[None if np.isnan(v) else float(v) for v in row] for row in vals]}


def tips_block(points: dict[str, str], heatmaps: dict[str, dict[str, Any]]) -> str:
    """The tooltip data and script, to place at the end of the page body."""
    data = json.dumps({"points": points, "heatmaps": heatmaps}).replace("</", "<\\/")
    return f'<script type="application/json" id="vlsafe-tips">{data}</script>{TIP_JS}'
