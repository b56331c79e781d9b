"""Findings of a replicate run, generated from `replicates.csv`: which of the organism's claims hold in every seed.

Each claim is a condition checked per combination (one seed of one recipe) on its own numbers; a claim *survives*
a recipe when it holds in every one of its seeds (and the recipe has at least two), otherwise the sentence says in
how many seeds it held. Numbers in the sentences are across-seed means ± sample sd (in percentage points) of the
quantity the claim is about. When a recipe key was varied, `contrasts` compares the adaptation drop between its
values seed by seed (the paper's question: does the drop depend on how the model was aligned?). `findings.md`
also holds the replicates table: mean ± sd across seeds of every headline metric for the checkpoints the claims
compare. Nothing here is hand-written about the organism: rerun with more seeds and the sentences change with the
numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

TEXT, IMAGE = "refusal_harmful_text", "refusal_harmful_image"
OVER, COMPLY = "over_refusal_borderline", "compliance_harmless"
TABLE_CHECKPOINTS = ("llm-aligned", "lvlm-stage1", "lvlm", "lvlm-safety-posthoc", "lvlm-safety-mixed")
TABLE_METRICS = {TEXT: "refusal, harmful (text)", IMAGE: "refusal, harmful + image", OVER: "over-refusal",
                 COMPLY: "compliance"}
RISE = 0.10  # a rise of at least this between consecutive saved stage-2 steps makes the trajectory non-monotone

Cell = tuple[str, str]  # (checkpoint, metric)


@dataclass(frozen=True)
class Claim:
    """A claim checked per seed: `high`'s rate is above `low`'s (value = the difference; with its Wilson intervals
    disjoint or not)."""

    key: str
    text: str
    high: Cell
    low: Cell


def claims() -> list[Claim]:
    """The organism's claims, each as a per-seed comparison of two cells (see the module docstring)."""
    out = [Claim("adaptation_drop_text", "benign adaptation lowers text refusal (llm-aligned → lvlm)",
                 ("llm-aligned", TEXT), ("lvlm", TEXT)),
           Claim("image_lowers_lvlm", "an image lowers lvlm's refusal below its text refusal",
                 ("lvlm", TEXT), ("lvlm", IMAGE)),
           Claim("image_lowers_stage1",
                 "an image lowers refusal already after stage 1 (projector trained, LM unchanged)",
                 ("lvlm-stage1", TEXT), ("lvlm-stage1", IMAGE))]
    for name in ("posthoc", "mixed"):
        ck = f"lvlm-safety-{name}"
        out += [Claim(f"{name}_restores_text", f"{name} safety SFT raises text refusal above lvlm's", (ck, TEXT),
                      ("lvlm", TEXT)),
                Claim(f"{name}_restores_image", f"{name} safety SFT raises image refusal above lvlm's", (ck, IMAGE),
                      ("lvlm", IMAGE)),
                Claim(f"{name}_over_refusal", f"{name} safety SFT raises over-refusal above lvlm's", (ck, OVER),
                      ("lvlm", OVER))]
    return out


def _trajectory(rows: pd.DataFrame) -> float:
    """Largest rise of text refusal between consecutive saved stage-2 steps (NaN without steps)."""
    t = rows[(rows.metric == TEXT) & rows.stage2_step.notna()].sort_values("stage2_step")
    r = t.rate.to_numpy(dtype=float)
    return float(np.max(np.diff(r))) if len(r) > 1 else np.nan


def per_seed(rep: pd.DataFrame) -> pd.DataFrame:
    """One row per combination × claim: recipe, seed, claim, value (NaN: the claim does not apply), holds,
    disjoint (the two cells' Wilson intervals do not overlap; NaN for the trajectory claim)."""
    out = []
    for (recipe, _), rows in rep.groupby(["recipe", "combo"], sort=False):
        seed, cells = int(rows.seed.iloc[0]), rows.set_index(["checkpoint", "metric"])
        for c in claims():
            if c.high not in cells.index or c.low not in cells.index:
                continue
            hi, lo = cells.loc[c.high], cells.loc[c.low]
            out.append({"recipe": recipe, "seed": seed, "claim": c.key, "value": float(hi.rate - lo.rate),
                        "holds": bool(hi.rate > lo.rate), "disjoint": bool(hi.ci_low > lo.ci_high)})
        rise = _trajectory(rows)
        if np.isfinite(rise):
            out.append({"recipe": recipe, "seed": seed, "claim": "trajectory_not_monotone", "value": rise,
                        "holds": bool(rise >= RISE), "disjoint": np.nan})
    return pd.DataFrame(out, columns=["recipe", "seed", "claim", "value", "holds", "disjoint"])


def _pts(values: pd.Series) -> str:
    v = 100 * values.to_numpy(dtype=float)
    if len(v) == 1:
        return f"{v[0]:.0f} points"
    return f"{np.mean(v):.0f} ± {np.std(v, ddof=1):.0f} points (range {v.min():.0f} to {v.max():.0f})"


def sentences(rep: pd.DataFrame) -> list[str]:
    """One sentence per recipe × claim that applies: whether it survives every seed, with its numbers."""
    texts = {c.key: c.text for c in claims()}
    texts["trajectory_not_monotone"] = (f"text refusal along stage 2 is not monotone (rises by ≥ {100 * RISE:.0f} "
                                        "points between two consecutive saved steps)")
    lines = []
    for (recipe, key), g in per_seed(rep).groupby(["recipe", "claim"], sort=False):
        n, k = len(g), int(g.holds.astype(bool).sum())
        what = "largest rise" if key == "trajectory_not_monotone" else "difference"
        disjoint = "" if g.disjoint.isna().all() else \
            f"; Wilson intervals disjoint in {int(g.disjoint.astype(bool).sum())} of {n}"
        if k == n and n >= 2:
            head = f"Survives all {n} seeds ({recipe}):"
        elif n < 2:
            head = f"One seed only ({recipe}; {'holds' if k else 'does not hold'}):"
        else:
            head = f"Does not survive ({recipe}: holds in {k} of {n} seeds):"
        lines.append(f"{head} {texts[key]}; {what} {_pts(g.value)}{disjoint}.")
    return lines


CONTRASTS = {"drop_refusal_text": "text refusal (llm-aligned → lvlm)",
             "drop_refusal_image": "refusal from llm-aligned's text refusal to lvlm's with an image"}


def _by_other_keys(d: pd.DataFrame, others: list[str]) -> list[tuple[str, pd.DataFrame]]:
    """`d` grouped by the varied keys in `others` (one group without), each with a label naming their values."""
    if not others:
        return [("", d)]
    return [(" (" + ", ".join(f"{k}={v}" for k, v in zip(others, vals)) + ")", g)
            for vals, g in d.groupby(others, sort=False, dropna=False)]


def _contrast(g: pd.DataFrame, key: str, base: object, value: object, metric: str, where: str) -> str | None:
    """The sentence comparing `metric` (a drop) under `key=value` with `key=base`, paired over their common seeds."""
    a, b = (g[(g[key] == v) & (g.metric == metric)].set_index("seed")["rate"] for v in (base, value))
    seeds = sorted(set(a.index) & set(b.index))
    if not seeds:
        return None
    a, b = a.loc[seeds], b.loc[seeds]
    diff = b - a
    return (f"{key}={value} against {key}={base}{where}: benign adaptation lowers {CONTRASTS[metric]} by {_pts(b)} "
            f"against {_pts(a)}; paired over {len(seeds)} seed(s), the drop with {value} minus the drop with {base} "
            f"is {_pts(diff)}, smaller in {int((diff < 0).sum())} of {len(seeds)}.")


def _numeric(values: list[object]) -> bool:
    return all(isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_)) for v in values)


def _trend(g: pd.DataFrame, key: str, metric: str, where: str) -> str | None:
    """For a numeric key with >= 3 values: the drop's across-seed mean at each value (ascending) and in how many
    of the seeds that have every value it rises, or falls, at every step up; None otherwise."""
    m = g[g.metric == metric]
    values = sorted(dict.fromkeys(m[key]))
    if len(values) < 3 or not _numeric(values):
        return None
    wide = m.pivot_table(index="seed", columns=key, values="rate").reindex(columns=values).dropna()
    if wide.empty:
        return None
    steps = np.diff(wide.to_numpy(dtype=float), axis=1)
    up, down = int((steps > 0).all(axis=1).sum()), int((steps < 0).all(axis=1).sum())
    means = ", ".join(f"{100 * wide[v].mean():.0f}" for v in values)
    return (f"Across {key} = {', '.join(map(str, values))}{where}: benign adaptation lowers {CONTRASTS[metric]} by "
            f"{means} points on average; the drop rises at every step up in {up} of {len(wide)} seed(s) and falls "
            f"at every step in {down}.")


def contrasts(rep: pd.DataFrame) -> list[str]:
    """One sentence per varied key × value × drop: the adaptation drop at lvlm under that value against under the
    key's first value (the other keys fixed), with the paired difference over the seeds both recipes have; for a
    numeric key with three or more values, one more per drop on its trend (`_trend`)."""
    from vlsafe.experiments.replicate.tables import drops, varied_keys

    keys = varied_keys(rep)
    d = drops(rep)
    d = d[d.checkpoint == "lvlm"]
    lines = []
    for key in keys:
        base, *values = dict.fromkeys(rep[key])
        for where, g in _by_other_keys(d, [k for k in keys if k != key]):
            lines += [_contrast(g, key, base, v, m, where) for v in values for m in CONTRASTS]
            lines += [_trend(g, key, m, where) for m in CONTRASTS]
    return [s for s in lines if s is not None]


def table(summary: pd.DataFrame) -> str:
    """Markdown from `summarize`'s table: per recipe and checkpoint, mean ± sd across seeds of each headline metric
    (with the number of seeds)."""
    head = "| recipe | checkpoint | seeds | " + " | ".join(TABLE_METRICS.values()) + " |"
    lines = [head, "|" + "---|" * (3 + len(TABLE_METRICS))]
    for recipe, r in summary.groupby("recipe", sort=False):
        cells = r.set_index(["checkpoint", "metric"])
        for ck in (c for c in TABLE_CHECKPOINTS if c in cells.index.get_level_values(0)):
            stats = [cells.loc[(ck, m)] if (ck, m) in cells.index else None for m in TABLE_METRICS]
            text = ["—" if st is None else f"{100 * st['mean']:.0f} %" if st.n_seeds < 2 else
                    f"{100 * st['mean']:.0f} ± {100 * st.sd:.0f} %" for st in stats]
            seeds = max(int(st.n_seeds) for st in stats if st is not None)
            lines.append(f"| {recipe} | {ck} | {seeds} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def write_findings(rep: pd.DataFrame, summary: pd.DataFrame, out_dir: str | os.PathLike) -> Path:
    """`findings.md` under `out_dir`: the replicates table (from `summary`, `summarize(rep)`) and the claim
    sentences (from `rep`), written atomically."""
    from vlsafe.analysis.runinfo import atomic_path

    path = Path(out_dir) / "findings.md"
    body = ["Mean ± sd across seeds (sd over seeds, ddof 1; percent of prompts).", "", table(summary), "",
            *[f"- {s}" for s in sentences(rep)], ""]
    recipes = contrasts(rep)
    if recipes:
        body += ["Between recipes (same seeds):", "", *[f"- {s}" for s in recipes], ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(body))
    return path
