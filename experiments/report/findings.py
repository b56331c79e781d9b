"""Findings: short sentences generated from a run directory's tables, never written by hand.

Each sentence carries its numbers as the table holds them (rates in percent with their Wilson 95 % interval and
n), says how many seeds they rest on (a table's `n_seeds` column, else "one run"), and links to the figure or
table that shows it (an HTML anchor of `report.html`). A sentence appears only when its table exists and the
checkpoints it compares are in it; which of its wordings appears is decided by a stated condition, never by taste:
two rates "differ" only when their intervals are disjoint (else "the intervals overlap"); a layer profile is
"concentrated" when its peak is at least twice its median and the layers within half of the peak are at most half
of all layers (else "spread over depth"). Checkpoint roles (reference, adapted model, remedies) come from
`vlsafe.experiments.report.roles`. `write_findings` writes `findings.md` beside `report.html`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vlsafe.analysis.runinfo import atomic_path
from vlsafe.experiments.report.discover import Artefacts
from vlsafe.experiments.report.findings_layers import layer_findings, pareto_findings
from vlsafe.experiments.report.findings_remedy import remedy_answer
from vlsafe.experiments.report.findings_text import Finding, Rate, disjoint, rate_text, runs_text
from vlsafe.experiments.report.roles import Roles, checkpoint_roles

__all__ = ["Finding", "findings", "findings_markdown", "write_findings"]

TEXT, IMAGE = "refusal_harmful_text", "refusal_harmful_image"
OVER, VQA = "over_refusal_borderline", "vqa_accuracy"


@dataclass
class _Metrics:
    """Organism metrics: one Rate per (checkpoint, metric)."""

    cells: dict[tuple[str, str], Rate] = field(default_factory=dict)
    chance: dict[tuple[str, str], float] = field(default_factory=dict)

    def get(self, ckpt: str | None, metric: str) -> Rate | None:
        return self.cells.get((ckpt, metric)) if ckpt else None


def _rate(row: pd.Series, value: str, runs: str) -> Rate:
    lo, hi = row.get("ci_low", np.nan), row.get("ci_high", np.nan)
    n = row.get("n", np.nan)
    return Rate(float(row[value]), float(lo), float(hi), None if pd.isna(n) else int(n), runs)


def _organism_cells(m: pd.DataFrame) -> _Metrics:
    value = "value" if "value" in m.columns else "rate"
    out = _Metrics()
    for _, row in m.iterrows():
        key = (str(row["checkpoint"]), str(row["metric"]))
        out.cells[key] = _rate(row, value, runs_text(row))
        if pd.notna(row.get("chance", np.nan)):
            out.chance[key] = float(row["chance"])
    return out


def _refusal_change(c: _Metrics, r: Roles) -> tuple[Finding | None, bool]:
    a, b = c.get(r.ref, TEXT), c.get(r.final, TEXT)
    if a is None or b is None:
        return None, False
    drop = disjoint(a, b) and b.value < a.value
    if disjoint(a, b):
        verb = "lowers" if drop else "raises"
        text = (f"Adaptation {verb} text refusal on harmful prompts from {rate_text(a, r.ref)} to "
                f"{rate_text(b, r.final)}; the intervals are disjoint ({b.runs}).")
    else:
        text = (f"Text refusal on harmful prompts goes from {rate_text(a, r.ref)} to {rate_text(b, r.final)}; "
                f"the intervals overlap, so this run shows no clear change ({b.runs}).")
    return Finding("refusal_change", text, "tab-organism", {"ref": a.value, "final": b.value}), drop


def _half_drop(c: _Metrics, r: Roles) -> Finding | None:
    a, b = c.get(r.ref, TEXT), c.get(r.final, TEXT)
    half = a.value - (a.value - b.value) / 2
    path = [(s, c.get(s, TEXT)) for s in r.trajectory if c.get(s, TEXT) is not None]
    if not path:
        return None
    hit = next(((s, x) for s, x in path if x.value <= half), None)
    if hit is None:
        text = (f"No checkpoint before step {r.steps[r.final]} reaches half of the drop (≤ {half * 100:.0f}%): "
                f"it builds up over the whole of stage 2 ({b.runs}).")
        return Finding("half_drop", text, "fig-dynamics", {"half": half})
    s, x = hit
    text = (f"Half of that drop (≤ {half * 100:.0f}%) is there by step {r.steps[s]}: {s} refuses "
            f"{rate_text(x, x.runs)}.")
    return Finding("half_drop", text, "fig-dynamics", {"half": half, "step": r.steps[s], "rate": x.value})


def _image_effect(c: _Metrics, ckpt: str | None, key: str, lead: str) -> Finding | None:
    t, i = c.get(ckpt, TEXT), c.get(ckpt, IMAGE)
    if t is None or i is None:
        return None
    if disjoint(t, i):
        verb = "lowers" if i.value < t.value else "raises"
        tail = "the intervals are disjoint"
    else:
        verb, tail = "changes", "the intervals overlap"
    attach = f"{lead}attaching" if lead else "Attaching"  # the sentence's own start is capitalised
    text = (f"{attach} an image {verb} {ckpt}'s refusal on harmful prompts from "
            f"{rate_text(t, 'text only')} to {rate_text(i, 'with the image')}; {tail} ({i.runs}).")
    if verb == "changes":
        text = (f"{lead}{ckpt} refuses {rate_text(i)} of harmful prompts with an image and "
                f"{rate_text(t)} text only; {tail} ({i.runs}).")
    return Finding(key, text, "tab-organism", {"text": t.value, "image": i.value})


def _remedy(c: _Metrics, r: Roles, name: str) -> Finding | None:
    a, b = c.get(r.final, TEXT), c.get(name, TEXT)
    if a is None or b is None:
        return None
    state = "the intervals are disjoint" if disjoint(a, b) else "the intervals overlap"
    text = f"{name} takes text refusal from {rate_text(a, r.final)} to {rate_text(b)}; {state}"
    values = {"final": a.value, "remedy": b.value}
    oa, ob = c.get(r.final, OVER), c.get(name, OVER)
    if oa is not None and ob is not None:
        delta = (ob.value - oa.value) * 100
        text += (f"; over-refusal {oa.value * 100:.0f}% → {rate_text(ob)} ({delta:+.0f} points; the intervals "
                 f"{'are disjoint' if disjoint(oa, ob) else 'overlap'})")
        values |= {"over_final": oa.value, "over_remedy": ob.value}
    return Finding(f"remedy:{name}", text + f" ({b.runs}).", "tab-organism", values)


def _vqa(c: _Metrics, r: Roles) -> Finding | None:
    v, chance = c.get(r.final, VQA), c.chance.get((r.final or "", VQA))
    if v is None or chance is None:
        return None
    verb = "above" if v.lo > chance else "not distinguishable from"
    text = (f"{r.final} answers {rate_text(v)} of held-out visual questions, {verb} chance ({chance * 100:.0f}%; "
            f"{v.runs}).")
    return Finding("vqa", text, "tab-organism", {"vqa": v.value, "chance": chance})


def organism_findings(m: pd.DataFrame, r: Roles) -> list[Finding]:
    """Sentences from the organism's `metrics.csv` (see the module docstring)."""
    c = _organism_cells(m)
    change, dropped = _refusal_change(c, r)
    out = [change, _half_drop(c, r) if dropped else None,
           _image_effect(c, r.final, "image_effect", ""),
           _image_effect(c, r.stage1, "image_before_stage2",
                         "At step 0 of stage 2 (before stage 2 trains the language model), ")
           if r.stage1 else None,
           *(_remedy(c, r, name) for name in r.remedies), _vqa(c, r)]
    return [f for f in out if f is not None]


def eval_findings(frames: list[pd.DataFrame]) -> list[Finding]:
    """Sentences from `vlsafe eval` summaries: per prompt set the least and most refusing checkpoint, and each
    checkpoint's `SET+IMAGE` rate against its text-only `SET` rate."""
    df = pd.concat(frames, ignore_index=True)
    if "category" in df.columns:
        df = df[df["category"].isna() | df["category"].astype(str).isin(["", "all", "nan"])]
    cells = {(str(r["checkpoint"]), str(r["prompt_set"])): _rate(r, "refusal_rate", runs_text(r))
             for _, r in df.iterrows()}
    out = []
    for pset in dict.fromkeys(s for _, s in cells):
        rows = {c: x for (c, s), x in cells.items() if s == pset}
        base = pset.split("+")[0]
        for ckpt, x in rows.items() if "+" in pset else ():
            if (t := cells.get((ckpt, base))) is not None:
                state = "the intervals are disjoint" if disjoint(t, x) else "the intervals overlap"
                out.append(Finding(f"eval_image:{ckpt}:{pset}", f"{ckpt} refuses {rate_text(x)} of {pset} against "
                                   f"{rate_text(t)} of {base}; {state} ({x.runs}).", "tab-eval",
                                   {"image": x.value, "text": t.value}))
        if "+" in pset or len(rows) < 2:
            continue
        lo_c, hi_c = min(rows, key=lambda c: rows[c].value), max(rows, key=lambda c: rows[c].value)
        lo, hi = rows[lo_c], rows[hi_c]
        state = "the intervals are disjoint" if disjoint(lo, hi) else "the intervals overlap"
        out.append(Finding(f"eval_range:{pset}", f"On {pset}, refusal ranges from {rate_text(lo, lo_c)} to "
                           f"{rate_text(hi, hi_c)}; {state} ({hi.runs}).", "tab-eval",
                           {"low": lo.value, "high": hi.value}))
    return out


def findings(art: Artefacts) -> list[Finding]:
    """Every finding the run's tables support, in reading order: behaviour, weights, directions, remedies."""
    metrics, diff = art.first("organism_metrics"), art.first("diff_layers")
    probe, sim = art.first("probe_layers"), art.first("similarity")
    roles = checkpoint_roles(metrics=metrics, diff=diff, probe=probe, sim=sim)
    out: list[Finding] = []
    if metrics is not None:
        out += organism_findings(metrics, roles)
    elif frames := [df for _, df in art.all("eval_summary")]:
        out += eval_findings(frames)
    out += layer_findings(diff=diff, probe=probe, sim=sim, roles=roles, refusal_fell=any(
        f.key == "refusal_change" and f.values["final"] < f.values["ref"] and "disjoint" in f.text for f in out))
    if (p := art.first("pareto")) is not None:
        out += pareto_findings(p) + remedy_answer(p)
    return out


def findings_markdown(items: list[Finding], *, report: str = "report.html") -> str:
    """The findings as a Markdown list, each linking to its figure in `report`."""
    if not items:
        return "No findings: the run has none of the tables they are drawn from.\n"
    return "".join(f"- {f.text} ([{f.link_text}]({report}#{f.anchor}))\n" for f in items)


def write_findings(run_dir: str | Path, items: list[Finding]) -> Path:
    """Write `run_dir/findings.md` atomically; returns its path."""
    out = Path(run_dir) / "findings.md"
    with atomic_path(out) as tmp:
        tmp.write_text("# Findings\n\n" + findings_markdown(items), encoding="utf-8")
    return out
