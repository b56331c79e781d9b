"""Replicate findings on a planted `replicates.csv`: a claim survives exactly when it holds in every seed, the
numbers in the sentences are the planted ones, the table's means and sds are the planted ones."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from vlsafe.experiments.replicate import summarize
from vlsafe.experiments.replicate.findings import contrasts, per_seed, sentences, table, write_findings

CELLS = {("llm-aligned", "refusal_harmful_text", None): 0.9, ("lvlm-stage1", "refusal_harmful_text", 0): 0.9,
         ("lvlm-stage1", "refusal_harmful_image", 0): 0.7, ("lvlm", "refusal_harmful_text", 60): 0.55,
         ("lvlm", "refusal_harmful_image", 60): 0.3, ("lvlm", "over_refusal_borderline", 60): 0.1,
         ("lvlm-step-30", "refusal_harmful_text", 30): 0.3,
         ("lvlm-safety-posthoc", "refusal_harmful_text", None): 0.9,
         ("lvlm-safety-posthoc", "refusal_harmful_image", None): 0.85,
         ("lvlm-safety-posthoc", "over_refusal_borderline", None): 0.2}


def _rep(shift: dict[int, dict[tuple[str, str], float]], *, n: int = 60) -> pd.DataFrame:
    """Three seeds of one recipe; `shift[seed][(checkpoint, metric)]` moves a planted cell in that seed."""
    rows = []
    for seed in (0, 1, 2):
        for (ck, metric, step), rate in CELLS.items():
            rate = rate + shift.get(seed, {}).get((ck, metric), 0.0) + 0.01 * seed
            half = 1.0 / np.sqrt(n)  # any interval of fixed half-width: only its overlap matters here
            rows.append({"combo": f"seed-{seed}", "recipe": "base", "seed": seed, "checkpoint": ck,
                         "stage2_step": step, "metric": metric, "n": n, "k": round(rate * n), "rate": rate,
                         "ci_low": rate - half, "ci_high": rate + half})
    return pd.DataFrame(rows).astype({"stage2_step": "Int64"})


def _line(lines: list[str], fragment: str) -> str:
    found = [s for s in lines if fragment in s]
    assert len(found) == 1, (fragment, lines)
    return found[0]


def test_claims_survive_only_when_every_seed_holds():
    lines = sentences(_rep({}))
    assert _line(lines, "benign adaptation lowers text refusal").startswith("Survives all 3 seeds (base):")
    # seed 1's lvlm refuses more than llm-aligned: the claim holds in 2 of 3 seeds
    broken = sentences(_rep({1: {("lvlm", "refusal_harmful_text"): 0.40}}))
    assert _line(broken, "benign adaptation lowers").startswith("Does not survive (base: holds in 2 of 3 seeds):")
    assert _line(broken, "an image lowers lvlm's").startswith("Survives")  # lvlm image 0.31 < text 0.96 in seed 1


def test_numbers_are_the_planted_ones():
    rep = _rep({2: {("lvlm", "refusal_harmful_text"): -0.15}})
    drops = [100 * (0.9 - 0.55), 100 * (0.9 - 0.55), 100 * (0.9 - 0.40)]  # the 0.01·seed offsets cancel
    line = _line(sentences(rep), "benign adaptation lowers text refusal")
    m = re.search(r"difference (\d+) ± (\d+) points \(range (\d+) to (\d+)\)", line)
    assert m is not None, line
    assert [int(x) for x in m.groups()] == [round(np.mean(drops)), round(np.std(drops, ddof=1)), round(min(drops)),
                                           round(max(drops))]
    # planted intervals have half-width 1/sqrt(60) ≈ 0.13: the 35-point drop is disjoint, a 7-point gap is not
    assert "Wilson intervals disjoint in 3 of 3" in line
    assert "disjoint in 0 of 3" in _line(sentences(rep), "posthoc safety SFT raises over-refusal")


def test_trajectory_claim_uses_consecutive_steps():
    seeds = per_seed(_rep({}))
    traj = seeds[seeds.claim == "trajectory_not_monotone"]
    # steps 0 → 30 → 60: 0.9 → 0.3 → 0.55, largest rise 0.25 in every seed
    assert traj.value.to_numpy() == pytest.approx([0.25, 0.25, 0.25]) and traj.holds.all()
    flat = _rep({s: {("lvlm", "refusal_harmful_text"): -0.25} for s in (0, 1, 2)})
    assert _line(sentences(flat), "not monotone").startswith("Does not survive (base: holds in 0 of 3 seeds):")


def test_absent_cells_give_no_claim_and_table_stats(tmp_path):
    rep = _rep({0: {("lvlm", "refusal_harmful_image"): 0.05}})
    lines = sentences(rep)
    assert not any("mixed" in s for s in lines)  # no lvlm-safety-mixed rows planted
    md = table(summarize(rep))
    image = [0.3 + 0.05, 0.3 + 0.01, 0.3 + 0.02]
    expect = f"{100 * np.mean(image):.0f} ± {100 * np.std(image, ddof=1):.0f} %"
    row = _line(md.splitlines(), "| base | lvlm |")
    assert row.split(" | ")[4] == expect and row.split(" | ")[2] == "3"
    assert "| — |" in _line(md.splitlines(), "| base | llm-aligned |")  # the LLM has no image metric
    path = write_findings(rep, summarize(rep), tmp_path)
    assert path.read_text().count("\n- ") == len(lines) and md in path.read_text()


def test_one_seed_says_so():
    rep = _rep({})
    lines = sentences(rep[rep.seed == 0])
    assert all(s.startswith("One seed only (base; ") for s in lines) and "±" not in " ".join(lines)


def _two_recipes(strong: dict[int, dict[tuple[str, str], float]]) -> pd.DataFrame:
    """The planted seeds under alignment_strength=moderate and (shifted by `strong`) under =strong."""
    parts = []
    for value, shift in (("moderate", {}), ("strong", strong)):
        part = _rep(shift).assign(recipe=f"alignment_strength-{value}", alignment_strength=value)
        parts.append(part.assign(combo=part.combo + f"__{value}"))
    return pd.concat(parts, ignore_index=True)


def test_recipe_contrast_pairs_seeds():
    # strong keeps 30 more points of lvlm's text refusal in seeds 0 and 1, 5 fewer in seed 2
    rep = _two_recipes({0: {("lvlm", "refusal_harmful_text"): 0.30}, 1: {("lvlm", "refusal_harmful_text"): 0.30},
                        2: {("lvlm", "refusal_harmful_text"): -0.05}})
    lines = contrasts(rep)
    assert len(lines) == 2 and all(s.startswith("alignment_strength=strong against alignment_strength=moderate:")
                                   for s in lines)
    text = _line(lines, "lowers text refusal")
    strong, moderate = [5.0, 5.0, 40.0], [35.0, 35.0, 35.0]
    diff = np.subtract(strong, moderate)
    want = (f"by {np.mean(strong):.0f} ± {np.std(strong, ddof=1):.0f} points (range 5 to 40) against 35 ± 0 points "
            f"(range 35 to 35); paired over 3 seed(s), the drop with strong minus the drop with moderate is "
            f"{np.mean(diff):.0f} ± {np.std(diff, ddof=1):.0f} points (range -30 to 5), smaller in 2 of 3.")
    assert text.endswith(want), text
    assert _line(lines, "with an image").endswith("smaller in 0 of 3.")
    two = contrasts(rep[rep.seed != 2])
    assert len(two) == 2 and all("paired over 2 seed(s)" in s for s in two)
    assert contrasts(_rep({})) == []  # nothing varied, nothing contrasted


def test_findings_file_holds_the_contrasts(tmp_path):
    rep = _two_recipes({})
    text = write_findings(rep, summarize(rep), tmp_path).read_text()
    assert "Between recipes (same seeds):" in text and all(f"- {s}" in text for s in contrasts(rep))


def test_trend_over_a_numeric_key():
    """stage2.sft.steps = 64, 128, 256 with planted lvlm text refusals: the drop rises at every step in seeds 0 and
    1, not in seed 2; the sentence's means are recomputed from the planted drops."""
    lvlm = {64: (0.60, 0.70, 0.50), 128: (0.50, 0.40, 0.60), 256: (0.20, 0.30, 0.55)}  # per seed 0, 1, 2
    parts = []
    for steps, rates in lvlm.items():
        shift = {seed: {("lvlm", "refusal_harmful_text"): r - CELLS["lvlm", "refusal_harmful_text", 60]}
                 for seed, r in enumerate(rates)}
        part = _rep(shift).assign(recipe=f"stage2.sft.steps-{steps}", **{"stage2.sft.steps": steps})
        parts.append(part.assign(combo=part.combo + f"__{steps}"))
    rep = pd.concat(parts, ignore_index=True)
    line = _line(contrasts(rep), "Across stage2.sft.steps = 64, 128, 256: benign adaptation lowers text")
    drop = {s: [0.9 + 0.01 * seed - (r + 0.01 * seed) for seed, r in enumerate(rates)] for s, rates in lvlm.items()}
    means = ", ".join(f"{100 * np.mean(drop[s]):.0f}" for s in (64, 128, 256))
    assert line.endswith(f"by {means} points on average; the drop rises at every step up in 2 of 3 seed(s) and "
                         "falls at every step in 0."), line
    assert not [s for s in contrasts(_two_recipes({})) if s.startswith("Across")]  # two string values: no trend
