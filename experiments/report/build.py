"""`vlsafe report DIR`: one self-contained HTML page (figures embedded) for any run directory.

Sections mirror the paper: safety dynamics during adaptation; a safety × helpfulness table with intervals;
weight shift; task-vector divergence; the safety direction per layer and its drift; safety-layer curves;
the Pareto fronts of remedies (text; with an image when the sweep has one); the linked layer view; and a
reproducibility block from every `run.json`.
Figures are also written to `DIR/figures/` as PNG and PDF.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Callable

from matplotlib.figure import Figure
import pandas as pd

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.figures import paper_style
from vlsafe.analysis.runinfo import atomic_path
from vlsafe.experiments.report import plots
from vlsafe.experiments.report.discover import Artefacts, discover
from vlsafe.experiments.report.findings import Finding, findings, write_findings
from vlsafe.experiments.report.interactive import TIP_CSS, heatmap_tip, svg_tag, tips_block
from vlsafe.experiments.report.judge_note import calibration_note
from vlsafe.experiments.report.locate_section import locate_section
from vlsafe.experiments.report.plots_corrected import corrected_rows, raw_rows
from vlsafe.experiments.report.plots_pareto import pareto_key, pareto_tips
from vlsafe.experiments.report.roles import checkpoint_roles

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2em}figure{margin:1em 0}.key{max-height:24em;overflow-y:auto}.key td{text-align:left}figcaption{font-size:.85em;
color:#555}table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em
.5em;text-align:right}th{background:#f6f6f6}td:first-child,th:first-child{text-align:left}.missing{color:#888;
font-style:italic}.source{color:#777}ol.findings li{margin:.3em 0}.note{font-size:.8em;color:#666}pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.8em}
"""


def _embed(fig: Figure | None, out_dir: Path, stem: str) -> str | None:
    """Save `fig` as PNG + PDF under `out_dir/figures/` and return it as inline SVG (text kept as text)."""
    if fig is None:
        return None
    figs = out_dir / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    fig.savefig(figs / f"{stem}.pdf")
    fig.savefig(figs / f"{stem}.png", dpi=150)
    return svg_tag(fig, stem=stem)  # (figures are never registered with pyplot: nothing to close)


def _fmt_rate(r: pd.Series) -> str:
    s = f"{r['refusal_rate']:.2f}"
    if pd.notna(r.get("ci_low")) and pd.notna(r.get("ci_high")):
        s += f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
    s += f" (n={int(r['n'])})"
    if pd.notna(r.get("rate_corrected")):  # Rogan–Gladen, for a judge with a measured calibration
        s += f"; corrected {r['rate_corrected']:.2f} [{r['corrected_low']:.2f}, {r['corrected_high']:.2f}]"
    return s


def safety_table(art: Artefacts) -> pd.DataFrame | None:
    """Table-1 style: checkpoint × prompt set refusal rates with Wilson intervals (overall rows only)."""
    frames = [df for _, df in art.all("eval_summary")]
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    if "category" in df.columns:
        df = df[df["category"].isna() | (df["category"].astype(str).isin(["", "all", "nan"]))]
    df = df.assign(cell=df.apply(_fmt_rate, axis=1))
    return df.pivot_table(index="checkpoint", columns="prompt_set", values="cell", aggfunc="first")


def organism_table(art: Artefacts) -> pd.DataFrame | None:
    """Checkpoint × metric (refusal, over-refusal, compliance, VQA accuracy) from an organism `metrics.csv`."""
    m = art.first("organism_metrics")
    if m is None:
        return None
    m = plots._metric_values(m)
    cell = m.apply(lambda r: f"{r['value']:.2f}" + (f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
                                                    if {"ci_low", "ci_high"} <= set(m.columns)
                                                    and pd.notna(r["ci_low"]) else ""), axis=1)
    wide = m.assign(cell=cell).pivot_table(index="checkpoint", columns="metric", values="cell", aggfunc="first")
    cols = [c for c in _ORGANISM_COLUMNS if c in wide.columns] + [c for c in wide.columns if c not in _ORGANISM_COLUMNS]
    wide = wide.reindex(index=list(dict.fromkeys(m["checkpoint"])), columns=cols)
    return wide.rename(columns=_ORGANISM_COLUMNS).rename_axis(columns=None)


_ORGANISM_COLUMNS = {"refusal_harmful_text": "refusal, harmful", "refusal_harmful_image": "refusal, harmful + image",
                     "over_refusal_borderline": "over-refusal", "compliance_harmless": "compliance",
                     "vqa_accuracy": "VQA accuracy"}


def _note(sentence: str) -> str:
    """A caption's extra sentence, with its leading space (empty stays empty)."""
    return f" {sentence}" if sentence else ""


def _section(title: str, body: list[str | None], missing: str) -> str:
    parts = [p for p in body if p]
    inner = "\n".join(parts) if parts else f'<p class="missing">{html.escape(missing)}</p>'
    return f"<h2>{html.escape(title)}</h2>\n{inner}"


def _figure(tag: str | None, caption: str, anchor: str, sources: list[str]) -> str | None:
    """A figure (or table) with its anchor id and a caption naming its source table(s)."""
    if not tag:
        return None
    src = ", ".join(f"<code>{html.escape(s)}</code>" for s in sources)
    return (f'<figure id="{anchor}">{tag}<figcaption>{html.escape(caption)} '
            f'<span class="source">Source: {src}.</span></figcaption></figure>')


def _pareto_block(tag: str | None, p: pd.DataFrame | None) -> str | None:
    """The Pareto figure followed by its key (what each point number is)."""
    if tag is None or p is None:
        return tag
    return tag + '<div class="key">' + pareto_key(p).to_html(index=False, escape=True) + "</div>"


def _remedies(p: pd.DataFrame | None, fig: Callable[[Figure | None, str], str | None],
              sources: list[str], notes: dict[str, str] | None = None) -> list[str | None]:
    """The text front and, when the sweep has image numbers, the image front; the key (after the last) names the
    points of both, with their family, layers and the signal that chose them. `notes` maps a safety channel to the
    sentence naming the judge calibration behind its corrected rates (`judge_note.calibration_note`)."""
    if p is None:
        return []
    common = ("Every sweep point, numbered as in the key; colour and marker: remedy family (merge, tuning, "
              "activation, reference); edged points and dashed line: the Pareto front{}. Hover a point for its rates.")
    stage = " among the generated + judged points (hollow: screened only)" if "stage" in p.columns and (
        p["stage"] == "screen").any() else ""

    def caption(lead: str, safety: str) -> str:
        drawn = (" Grey dashed bar with a tick, right of a point: its safety corrected for judge error, with an "
                 "interval that carries the judge's own error." if not corrected_rows(p, safety).empty else "")
        if not raw_rows(p, safety).empty:
            drawn = (" Thin bars through a judged point: its 95 % Wilson intervals (safety vertical, helpfulness "
                     "horizontal)." + drawn)
        return lead + common.format(stage) + drawn + _note((notes or {}).get(safety, ""))

    text = fig(plots.pareto(p), "pareto")
    image = fig(plots.pareto(p, safety="safety_image"), "pareto_image") if "safety_image" in p.columns else None
    return [_figure(text if image else _pareto_block(text, p), caption("Harmful text prompts. ", "safety"),
                    "fig-pareto", sources),
            _figure(_pareto_block(image, p), caption("Harmful prompts with an image (text-only models left out). ",
                                                     "safety_image"), "fig-pareto-image", sources) if image else None]


def _tips(art: Artefacts) -> str:
    points = pareto_tips(p) if (p := art.first("pareto")) is not None and not p.empty else {}
    heat = {}
    if (d := art.first("diff_layers")) is not None:
        pivot, pair = plots.heatmap_pivot(d)
        if not pivot.empty:
            heat["heatmap-weight"] = heatmap_tip(pivot, title=f"weight shift {pair}".strip(),
                                                 label="rel. Frobenius change")
    return tips_block(points, heat)


def _findings(items: list[Finding]) -> str:
    if not items:
        return '<p class="missing">No findings: the run has none of the tables they are drawn from.</p>'
    lis = "".join(f'<li>{html.escape(f.text)} <a href="#{f.anchor}">{f.link_text}</a></li>' for f in items)
    return (f'<ol class="findings">{lis}</ol><p class="note">Generated from the tables below '
            "(also in <code>findings.md</code>); rates with Wilson 95% intervals.</p>")


def _repro(art: Artefacts) -> str:
    if not art.runs:
        return '<p class="missing">No run.json found.</p>'
    blocks = []
    for path, rec in art.runs:
        keep = {k: rec.get(k) for k in ("command", "kind", "tables", "git_commit", "seed", "created", "versions", "checkpoints",
                                        "config")}
        rel = path.relative_to(art.root)
        blocks.append(f"<details><summary><code>{html.escape(str(rel))}</code> — "
                      f"{html.escape(str(rec.get('command', '?')))}</summary><pre>"
                      f"{html.escape(json.dumps(keep, indent=2, default=str))}</pre></details>")
    return "\n".join(blocks)


def _sections(art: Artefacts, fig: Callable[[Figure | None, str], str | None]) -> list[str]:
    diff, probe, sim = art.first("diff_layers"), art.first("probe_layers"), art.first("similarity")
    metrics, table, organism = art.first("organism_metrics"), safety_table(art), organism_table(art)
    roles = checkpoint_roles(metrics=metrics, diff=diff, probe=probe, sim=sim)
    notes = {s: calibration_note(art, "pareto", [f"{s}_corrected"], first_only=True)
             for s in ("safety", "safety_image")}

    def src(*kinds: str) -> list[str]:
        return [p.relative_to(art.root).as_posix() for k in kinds if (p := art.first_path(k)) is not None]

    def show(kind: str, draw: Callable[[pd.DataFrame], Figure | None], stem: str) -> str | None:
        df = art.first(kind)
        return fig(draw(df), stem) if df is not None else None

    return [
        _section("Safety dynamics during adaptation", [_figure(fig(plots.dynamics(
            metrics, art.first("dynamics")), "dynamics"),
            "Safety metrics and mean weight shift vs adaptation step (paper Figure 2 axis).", "fig-dynamics",
            src("organism_metrics", "dynamics"))],
            "No step-indexed checkpoints in this run (organism metrics or diff dynamics.csv)."),
        _section("Safety and helpfulness per checkpoint",
                 [_figure(organism.to_html(na_rep="–", escape=True) if organism is not None else None,
                          "Organism metrics: refusal and over-refusal rates, compliance, visual-QA accuracy; "
                          "Wilson 95% intervals.", "tab-organism", src("organism_metrics")),
                  _figure(table.to_html(na_rep="–", escape=True) if table is not None else None,
                          "Refusal rate per prompt set (vlsafe eval; on harmless prompts this is over-refusal), "
                          "Wilson 95% intervals; where the judge has a calibration, also the rate corrected for "
                          "its measured sensitivity and specificity (Rogan–Gladen), with an interval that carries "
                          "the judge's own error." + _note(calibration_note(art, "eval_summary", ["rate_corrected"])),
                          "tab-eval", art.sources("eval_summary"))],
                 "No eval summary.csv or organism metrics.csv in this run."),
        _section("Weight shift", [_figure(show("diff_layers", plots.weight_heatmap, "weight_heatmap"),
                                          "Relative Frobenius change per layer and module; hover a cell for its value.", "fig-weight-heatmap",
                                          src("diff_layers"))],
                 "No diff layers.csv (run `vlsafe diff`)."),
        _section("Task-vector divergence", [_figure(show("taskvectors", plots.taskvector_cosine, "taskvec"),
                                                    "Cosine between task vectors per layer.", "fig-taskvec",
                                                    src("taskvectors"))],
                 "No taskvectors.csv (run `vlsafe diff --base`)."),
        _section("Safety direction per layer and its drift", [
            _figure(show("probe_layers", plots.probe_accuracy, "probe"),
                    "Linear-probe accuracy (harmful vs harmless) per layer; dashed: shuffled-label control.",
                    "fig-probe", src("probe_layers")),
            _figure(show("similarity", plots.direction_similarity, "direction_cos"),
                    "Cosine of the difference-in-means direction between checkpoints.", "fig-direction-cos",
                    src("similarity"))],
            "No probe outputs (run `vlsafe probe`)."),
        _section("Safety-layer curves", [_figure(show("safety_layers", plots.safety_layer_curves, "safety_layers"),
                                                 "Last-token cosine of normal/malicious pairs per layer, one panel per checkpoint.",
                                                 "fig-safety-layers", src("safety_layers"))],
                 "No safety_layers.csv."),
        locate_section({k: art.first(k) for k in ("patching", "signals", "signals_corr", "shift")},
                       figure=lambda key, f, caption: _figure(fig(f, f"locate_{key}"), caption, f"fig-locate-{key}",
                                                              src(key))),
        _section("Remedies: safety vs helpfulness", _remedies(art.first("pareto"), fig, src("pareto"), notes),
                 "No pareto.csv (run `vlsafe sweep`)."),
        _section("Linked layer view", [_figure(fig(plots.linked_layer_view(diff, sim, probe, roles=roles), "linked"),
                                               "Weight shift, direction shift and probe accuracy on one layer axis.",
                                               "fig-linked", src("diff_layers", "similarity", "probe_layers"))],
                 "Needs at least two of: diff layers.csv, probe similarity.csv, probe layers.csv."),
        _section("Reproducibility", [_repro(art)], ""),
    ]


def build_report(run_dir: str | Path, title: str = "vlsafe report") -> Path:
    """Write `run_dir/report.html` (self-contained, findings first), `run_dir/findings.md` and
    `run_dir/figures/report_*`; return the HTML path."""
    root = Path(run_dir)
    if not root.is_dir():
        raise VlsafeError(f"{root}: not a run directory")
    art = discover(root)
    if not art.runs:
        raise VlsafeError(f"{root}: no vlsafe outputs found (no run.json under it)")
    fig: Callable[[Figure | None, str], str | None] = lambda f, stem: _embed(f, root, f"report_{stem}")
    found = findings(art)
    with paper_style():
        body = _section("Findings", [_findings(found)], "") + "".join(_sections(art, fig))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}{TIP_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>Run directory: <code>{html.escape(str(root))}</code></p>{body}{_tips(art)}</body></html>")
    write_findings(root, found)
    out = root / "report.html"
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
