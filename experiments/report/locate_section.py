"""The report's "Where safety is lost" section, from a `vlsafe locate` run's tables (to be wired into
`vlsafe.experiments.report.build` by the caller).

>>> html = locate_section({"patching": pt, "signals": sig, "signals_corr": corr, "shift": sh}, embed=embed)

`embed(fig, stem)` returns an `<img>` tag (e.g. `build._embed` bound to the output directory) or None. Every
sentence under "Findings" is generated from the numbers (`findings`); nothing is hand-written.
"""

from __future__ import annotations

import html
import math
from typing import Any, Callable, Mapping

import pandas as pd

TITLE = "Where safety is lost"


def _ci(r: Mapping[str, Any], value: str = "recovered") -> str:
    return f"{r[value]:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"


def _patching_findings(pt: pd.DataFrame) -> list[str]:
    out = []
    what = "Patching"
    if "method" in pt.columns and (pt["method"] == "attribution").any():
        what = "Attribution estimate (first order, not patched)"
    for image, g in pt[pt["direction"] == "restore"].groupby("image", sort=False):
        cond = "text only" if image in ("none", "text") else f"with image {image}"
        ok = g.dropna(subset=["recovered"])
        if ok.empty:
            out.append(f"{what} ({cond}): recovery undefined at every site — the two checkpoints score alike on "
                       f"these prompts ({int(g['n_dropped'].max())} prompts dropped).")
            continue
        parts = ok[ok["component"] != "resid"]
        if not parts.empty:
            top = parts.loc[parts["recovered"].idxmax()]
            out.append(f"{what} ({cond}): the single component that restores most is layer {int(top['layer'])} "
                       f"{top['component']} ({_ci(top)} of the gap, n = {int(top['n'])}).")
        resid = ok[ok["component"] == "resid"].sort_values("layer")
        half = resid[resid["recovered"] >= 0.5]
        if not resid.empty:
            out.append(f"{what} ({cond}): the residual stream restores half the gap from layer "
                       f"{int(half['layer'].iloc[0])} on ({_ci(half.iloc[0])})." if not half.empty else
                       f"{what} ({cond}): no single residual-stream layer restores half the gap "
                       f"(max {resid['recovered'].max():.2f}).")
    return out


def _corr_findings(corr: pd.DataFrame) -> list[str]:
    ok = corr.dropna(subset=["spearman", "ci_low", "ci_high"])
    if ok.empty:
        return ["Signals: too few layers (or constant signals) for any rank correlation."]
    agree = ok[(ok["ci_low"] > 0) | (ok["ci_high"] < 0)]
    out = [f"Signals: {a['signal_a']} and {a['signal_b']} {'agree' if a['spearman'] > 0 else 'disagree'} "
           f"(Spearman {_ci(a, 'spearman')}, {int(a['n_layers'])} layers)." for _, a in agree.iterrows()]
    out.append(f"Signals: {len(ok) - len(agree)} of {len(ok)} signal pairs have an interval that includes 0.")
    return out


def _shift_findings(sh: pd.DataFrame) -> list[str]:
    g = sh[(sh["label"] == "harmful") & sh["refusal_projection"].notna()]
    if g.empty:
        return []
    top = g.loc[g["refusal_projection"].abs().idxmax()]
    return [f"Image shift: the largest move along the refusal direction is {top['refusal_projection']:+.3g} "
            f"({top['condition']}, layer {int(top['layer'])}, position {top['position']}; relative norm "
            f"{top['relative_norm']:.2f})."]


def findings(tables: Mapping[str, pd.DataFrame | None]) -> list[str]:
    """One sentence per finding, generated from the `patching`, `signals_corr` and `shift` tables present."""
    out: list[str] = []
    if tables.get("patching") is not None:
        out += _patching_findings(tables["patching"])
    if tables.get("signals_corr") is not None:
        out += _corr_findings(tables["signals_corr"])
    if tables.get("shift") is not None:
        out += _shift_findings(tables["shift"])
    return out


def _corr_matrix(corr: pd.DataFrame) -> str:
    names = list(dict.fromkeys([*corr["signal_a"], *corr["signal_b"]]))
    m = pd.DataFrame("", index=names, columns=names)
    for _, r in corr.iterrows():
        cell = "" if math.isnan(r["spearman"]) else f"{r['spearman']:.2f}"
        m.loc[r["signal_a"], r["signal_b"]] = m.loc[r["signal_b"], r["signal_a"]] = cell
    return m.to_html(escape=True)


def locate_section(tables: Mapping[str, pd.DataFrame | None],
                   figure: Callable[[str, Any, str], str | None] | None = None) -> str:
    """HTML of the section: findings, the signals on one layer axis, the patching heat-map (text vs image) and
    the correlation matrix. Missing tables leave their part out; no table at all gives a one-line note."""
    from vlsafe.experiments.locate_figures import patching_heatmap, signals_figure

    parts = [f"<h2>{html.escape(TITLE)}</h2>"]
    found = findings(tables)
    if not found and all(tables.get(k) is None for k in ("patching", "signals")):
        return parts[0] + '\n<p class="missing">No vlsafe locate run.</p>'
    parts.append("<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in found) + "</ul>")
    figs = [("signals", signals_figure, "Every localisation signal per layer (one shared layer axis)."),
            ("patching", patching_heatmap, "Recovered fraction per layer and component (restore and break; "
                                           "text and image; text positions patched).")]
    for key, make, caption in figs:
        if figure is not None and tables.get(key) is not None:
            block = figure(key, make(tables[key]), caption)
            if block:
                parts.append(block)
    if tables.get("signals_corr") is not None and len(tables["signals_corr"]):
        parts.append("<p>Spearman rank correlation between signals over layers (intervals in "
                     "signals_corr.csv):</p>" + _corr_matrix(tables["signals_corr"]))
    return "\n".join(parts)
