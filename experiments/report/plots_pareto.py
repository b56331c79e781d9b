"""The remedies figure: every sweep point numbered, families by colour and marker, the Pareto front joined.

Names such as `restore-llm[alpha=1.0,layers=L10-19]` do not fit beside a point, so each point gets its number
(its row in `pareto.csv`, from 1) and `pareto_key` is the table that names them; points at the same place share
one label (`2, 4–7`). Labels are placed greedily: the first of a ring of candidate positions, widening, whose box
(measured by matplotlib) hits no other label, no marker and stays inside the axes; a leader line joins a label
placed away from its point. Labels are SVG groups with ids `label-N`, so a check can hold them to their axes. In
the HTML each point is an SVG group with id
`pareto-pt-N` (`pareto-image-pt-N` in the image front), for the tooltips of `pareto_tips`.

Families: the table's `family` column (merge, tuning, activation, gated, reference; `vlsafe sweep` writes it) when present,
else the name before `[`. A sweep with an image harmful set has a second front, `safety_image` vs helpfulness
(`pareto(p, safety="safety_image")`); rows without an image number are left out of it. With a `stage` column, the
front is drawn among the `full` (generated + judged) points only; screened-only points are drawn hollow. With
judge-corrected columns (`safety_corrected` and its interval; `safety_image_corrected` for the image front), each
judged point also shows its corrected rate and interval (`vlsafe.experiments.report.plots_corrected`; legend entry
"corrected for judge error"), and the key and tooltips give it. Judged points carry their raw 95 % Wilson
intervals as thin bars in their colour (safety vertical, helpfulness horizontal; `plots_corrected.draw_raw`).
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from vlsafe.experiments.report.findings_layers import point_names, point_rate
from vlsafe.experiments.report.plots_corrected import (CORRECTED_LABEL, corrected_boxes, corrected_handle,
                                                       corrected_rows, corrected_span, corrected_text,
                                                       draw_corrected, draw_raw, raw_boxes, raw_handle, raw_rows,
                                                       raw_span)
from vlsafe.experiments.report.findings_text import layer_ranges, rate_text

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
FRONT_STYLE = {"color": "0.15", "lw": 1.3, "ls": "-", "alpha": 0.6}  # solid: the judge-corrected bars are dashed
CORRECTED_KEY = CORRECTED_LABEL  # key column suffix: `safety, corrected for judge error`
_RINGS = (4.0, 9.0, 15.0, 22.0, 30.0, 40.0)  # candidate label distances from the point, in points


def pareto_front(p: pd.DataFrame) -> pd.DataFrame:
    """Rows not dominated in (safety, helpfulness), both higher-is-better, sorted by helpfulness."""
    pts = p[["safety", "helpfulness"]].to_numpy(dtype=float)
    keep = [not any((q >= x).all() and (q > x).any() for q in pts) for x in pts]
    return p[keep].sort_values("helpfulness")


FAMILY_ORDER = ("reference", "merge", "tuning", "activation", "gated")  # fixed colours and markers for `family`
SAFETY_LABELS = {"safety": "safety (refusal on harmful prompts)",
                 "safety_image": "safety with an image (refusal on harmful + image)"}


def family(name: str) -> str:
    """The remedy family of a sweep point's name: the part before `[`."""
    return name.split("[")[0]


def families(p: pd.DataFrame) -> list[str]:
    """Each row's family: the `family` column when the table has one, else `family(name)`."""
    if "family" in p.columns:
        return [str(f) for f in p["family"]]
    return [family(n) for n in point_names(p)]


def front_of(p: pd.DataFrame, safety: str = "safety") -> pd.DataFrame:
    """`pareto_front` on (`safety`, helpfulness) among the rows with both numbers and, when some rows come from the
    full evaluation (`stage` = full), among those only."""
    ok = p[safety].notna() & p["helpfulness"].notna()
    if "stage" in p.columns and (p["stage"] == "full").any():
        ok &= p["stage"] == "full"
    pool = p[ok]
    return pareto_front(pool.assign(safety=pool[safety])) if len(pool) else pool


def point_groups(p: pd.DataFrame) -> list[tuple[float, float, list[int]]]:
    """(helpfulness, safety, point numbers) for every distinct position; numbers count rows from 1."""
    groups: dict[tuple[float, float], list[int]] = {}
    for i, (h, s) in enumerate(zip(p["helpfulness"].astype(float), p["safety"].astype(float))):
        groups.setdefault((round(h, 9), round(s, 9)), []).append(i + 1)
    return [(h, s, nums) for (h, s), nums in groups.items()]


def _cost(box: Any, others: list[Any], inside: Any) -> float:
    hit = sum(max(0.0, min(box.x1, o.x1) - max(box.x0, o.x0)) * max(0.0, min(box.y1, o.y1) - max(box.y0, o.y0))
              for o in others)
    out = box.width * box.height - max(0.0, min(box.x1, inside.x1) - max(box.x0, inside.x0)) * max(
        0.0, min(box.y1, inside.y1) - max(box.y0, inside.y0))
    return hit + 10 * out


def _candidates() -> list[tuple[float, float, str, str]]:
    out = []
    for r in _RINGS:
        for k in (1, 7, 3, 5, 0, 4, 2, 6):  # diagonals first, then sides
            a = k * math.pi / 4
            dx, dy = round(r * math.cos(a), 3), round(r * math.sin(a), 3)
            out.append((dx, dy, "left" if dx > 0 else "right" if dx < 0 else "center",
                        "bottom" if dy > 0 else "top" if dy < 0 else "center"))
    return out


def place_labels(ax: Any, items: list[tuple[float, float, str]], *, fontsize: float = 6.5,
                 marker_pt: float = 4.0, avoid: list[Any] | None = None) -> list[Any]:
    """Annotate (x, y, text) items without overlaps where the axes leave room (see the module docstring); `avoid`
    adds display-space boxes (other marks) the labels keep off like the markers."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72.0
    inside = ax.get_window_extent(renderer)
    pts = ax.transData.transform([(x, y) for x, y, _ in items]) if items else []
    taken = [plt.matplotlib.transforms.Bbox.from_extents(u - marker_pt * px, v - marker_pt * px,
                                                         u + marker_pt * px, v + marker_pt * px) for u, v in pts]
    taken += list(avoid or [])
    texts = []
    for k, (x, y, label) in enumerate(sorted(items, key=lambda t: (-t[1], t[0]))):
        best: tuple[float, Any, Any] | None = None
        for dx, dy, ha, va in _candidates():
            t = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                            fontsize=fontsize, annotation_clip=False)
            box = t.get_window_extent(renderer).expanded(1.0, 1.0).padded(1.5 * px)
            cost = _cost(box, taken, inside)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, t, box)
            else:
                t.remove()
            if cost == 0:
                break
        _, t, box = best
        if math.hypot(*t.xyann) > _RINGS[0] + 0.5:  # away from its point: redraw it with a leader line
            xyann, ha, va = t.xyann, t.get_ha(), t.get_va()
            t.remove()
            t = ax.annotate(label, (x, y), xytext=xyann, textcoords="offset points", ha=ha, va=va,
                            fontsize=fontsize, annotation_clip=False, arrowprops={
                                "arrowstyle": "-", "lw": 0.4, "color": "0.45", "shrinkA": 0, "shrinkB": 2})
        t.set_gid(f"label-{k + 1}")
        taken.append(box)
        texts.append(t)
    return texts


def pareto(p: pd.DataFrame, *, safety: str = "safety") -> plt.Figure | None:
    """`safety` vs helpfulness of every remedy point, numbered (see `pareto_key`), coloured by family, the Pareto
    front joined (see the module docstring)."""
    if p.empty or safety not in p.columns or p[safety].isna().all():
        return None
    from vlsafe.analysis.figures import agg_figure, checkpoint_colors

    p = p.reset_index(drop=True)
    fam_of = families(p)
    fams = sorted(dict.fromkeys(fam_of), key=lambda f: (FAMILY_ORDER.index(f) if f in FAMILY_ORDER else 99, f))
    colors, front = checkpoint_colors(fams), front_of(p, safety)
    screened = (p["stage"] == "screen").to_numpy() if "stage" in p.columns else [False] * len(p)
    prefix = "pareto-pt" if safety == "safety" else "pareto-image-pt"
    fig, ax = agg_figure((6.8, 3.6))
    ax.plot(front["helpfulness"], front["safety"], **FRONT_STYLE, zorder=1)
    shown = p[p[safety].notna()]
    for i in shown.index:
        on, fam = i in front.index, fam_of[i]
        face = "none" if screened[i] else colors[fam]
        ax.scatter(p.loc[i, "helpfulness"], p.loc[i, safety], s=30 if on else 18, zorder=3,
                   marker=MARKERS[fams.index(fam) % len(MARKERS)], facecolors=face,
                   edgecolors="k" if on else colors[fam], alpha=1.0 if on else 0.6, linewidths=0.5,
                   gid=f"{prefix}-{i + 1}")
    corrected, raw = corrected_rows(shown, safety), raw_rows(shown, safety)
    draw_raw(ax, raw, [colors[fam_of[i]] for i in raw.index], safety)
    draw_corrected(ax, corrected, safety)
    spans = raw_span(raw, safety)
    for col, setter in (("helpfulness", ax.set_xlim), (safety, ax.set_ylim)):
        lo, hi = float(shown[col].min()), float(shown[col].max())
        if col == safety and (span := corrected_span(corrected, safety)) is not None:
            lo, hi = min(lo, span[0]), max(hi, span[1])
        if col in spans:
            lo, hi = min(lo, spans[col][0]), max(hi, spans[col][1])
        pad = max(0.08, (hi - lo) * 0.12)
        setter(max(lo - pad, -0.03) if lo >= 0 else lo - pad, min(hi + pad, 1.03) if hi <= 1 else hi + pad)
    loglik = "helpfulness_kind" in p.columns and (p["helpfulness_kind"] == "loglik").any()
    ax.set_xlabel("helpfulness (answer log-likelihood)" if loglik else "helpfulness (compliance on harmless prompts)")
    ax.set_ylabel(SAFETY_LABELS.get(safety, safety))
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], **FRONT_STYLE, label="Pareto front")] + [
        Line2D([], [], ls="", marker=MARKERS[i % len(MARKERS)], color=colors[f], markeredgecolor="k",
               markeredgewidth=0.5, ms=5, label=f) for i, f in enumerate(fams)]
    if any(screened):
        handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgecolor="0.35", ms=5,
                              label="screened only"))
    if not raw.empty:
        handles.append(raw_handle())
    if not corrected.empty:
        handles.append(corrected_handle())
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=7,
              title="family (edged: on the front)", title_fontsize=7)
    fig.canvas.draw()
    fig.set_layout_engine("none")  # freeze the layout: the labels are placed in pixels of this one
    groups = point_groups(shown.assign(safety=shown[safety]))
    place_labels(ax, [(h, s, layer_ranges([int(shown.index[n - 1]) + 1 for n in nums])) for h, s, nums in groups],
                 avoid=corrected_boxes(ax, corrected, safety) + raw_boxes(ax, raw, safety))
    return fig


def pareto_key(p: pd.DataFrame) -> pd.DataFrame:
    """The figures' key: point number, name, family, layers and the signal that chose them, the stage its numbers
    come from, rates with intervals (and the judge-corrected safety where the table has it), on the text (and
    image) front or not."""
    p = p.reset_index(drop=True)
    names, front = point_names(p), set(front_of(p).index)
    key = pd.DataFrame({"#": range(1, len(p) + 1), "point": names, "family": families(p)})
    for col, label in (("layers", "layers"), ("layer_signal", "chosen by"), ("stage", "stage")):
        if col in p.columns:
            key[label] = p[col].fillna("").astype(str)
    for col, label in (("safety", "safety"), ("safety_image", "safety (image)"), ("helpfulness", "helpfulness"),
                       ("over_refusal", "over-refusal")):
        if col in p.columns:
            key[label] = [rate_text(point_rate(r, col)) if pd.notna(r[col]) else "" for _, r in p.iterrows()]
        if col.startswith("safety") and not corrected_rows(p, col).empty:
            key[f"{label}, {CORRECTED_KEY}"] = [corrected_text(r, col) if pd.notna(r[col]) else ""
                                                for _, r in p.iterrows()]
    key["front"] = ["yes" if i in front else "" for i in range(len(p))]
    if "safety_image" in p.columns and p["safety_image"].notna().any():
        image = set(front_of(p, "safety_image").index)
        key["image front"] = ["yes" if i in image else "" for i in range(len(p))]
    return key


def pareto_tips(p: pd.DataFrame) -> dict[str, str]:
    """Tooltip text per point (SVG ids `pareto-pt-N`, and `pareto-image-pt-N` with an image front): number, name,
    layers, rates with intervals, and the other points at the same place."""
    key = pareto_key(p)
    where = {n: nums for _, _, nums in point_groups(p.reset_index(drop=True)) for n in nums}
    image = "safety_image" in p.columns and p["safety_image"].notna().any()
    tips = {}
    for _, r in key.iterrows():
        lines = [f"#{r['#']} {r['point']}"] + [f"{c}: {r[c]}" for c in key.columns if c not in ("#", "point")
                                                and str(r[c])]
        others = [n for n in where[r["#"]] if n != r["#"]]
        if others:
            lines.append(f"same place as #{layer_ranges(others)}")
        tips[f"pareto-pt-{r['#']}"] = "\n".join(lines)
        if image and str(r.get("safety (image)", "")):
            tips[f"pareto-image-pt-{r['#']}"] = "\n".join(lines[:-1] if others else lines)
    return tips
