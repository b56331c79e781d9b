"""Findings generated from planted tables: the expected sentences exactly, numbers equal to the tables'."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vlsafe.analysis.runinfo import write_run_json
from vlsafe.experiments.report import build_report
from vlsafe.experiments.report.discover import discover
from vlsafe.experiments.report.findings import findings
from vlsafe.probes.behavior.metrics import wilson_interval

N = 60


def _row(ckpt: str, step: float, metric: str, k: int, n: int = N, **extra) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"checkpoint": ckpt, "stage2_step": step, "metric": metric, "n": n, "k": k, "rate": k / n,
            "ci_low": lo, "ci_high": hi, **extra}


def _metrics(text: dict[str, int], image: dict[str, int] | None = None) -> pd.DataFrame:
    steps = {"llm-base": np.nan, "llm-aligned": np.nan, "lvlm-stage1": 0, "lvlm-step-24": 24, "lvlm-step-48": 48,
             "lvlm": 96, "lvlm-safety-posthoc": np.nan}
    rows = [_row(c, steps[c], "refusal_harmful_text", k) for c, k in text.items()]
    rows += [_row(c, steps[c], "refusal_harmful_image", k) for c, k in (image or {}).items()]
    rows += [_row(c, steps[c], "over_refusal_borderline", k, 40) for c, k in (("lvlm", 3), ("lvlm-safety-posthoc", 6))]
    rows += [_row("lvlm", 96, "vqa_accuracy", 50, chance=0.3)]
    return pd.DataFrame(rows)


def _run(root: Path, tables: dict[str, tuple[str, pd.DataFrame]], kind: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, df in tables.values():
        df.to_csv(root / name, index=False)
    write_run_json(root, kind=kind, tables={k: name for k, (name, _) in tables.items()})


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _cell(m: pd.DataFrame, ckpt: str, metric: str, who: str | None = None) -> str:
    r = m[(m["checkpoint"] == ckpt) & (m["metric"] == metric)].iloc[0]
    return f"{_pct(r['rate'])} [{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}] ({who or ckpt}, n = {r['n']})"


CLEAR = {"llm-base": 3, "llm-aligned": 54, "lvlm-stage1": 54, "lvlm-step-24": 32, "lvlm-step-48": 44, "lvlm": 35,
         "lvlm-safety-posthoc": 53}


def test_clear_drop_gives_the_drop_sentences_with_the_tables_numbers(tmp_path: Path) -> None:
    m = _metrics(CLEAR, image={"lvlm-stage1": 21, "lvlm": 18})
    _run(tmp_path, {"organism_metrics": ("metrics.csv", m)}, "organism")
    found = {f.key: f for f in findings(discover(tmp_path))}
    assert list(found) == ["refusal_change", "half_drop", "image_effect", "image_before_stage2",
                           "remedy:lvlm-safety-posthoc", "vqa"]
    drop = found["refusal_change"]
    assert drop.text.startswith(f"Adaptation lowers text refusal on harmful prompts from "
                                f"{_cell(m, 'llm-aligned', 'refusal_harmful_text')} to "
                                f"{_cell(m, 'lvlm', 'refusal_harmful_text')}; the intervals are disjoint")
    assert "(one run)" in drop.text and drop.anchor == "tab-organism"
    assert drop.values == {"ref": 54 / N, "final": 35 / N}
    half = found["half_drop"]  # (54 + 35) / 2 / 60 = 74 %; step 24 refuses 32/60 ≤ that, step 48 is the later one
    assert half.values["step"] == 24 and half.values["rate"] == 32 / N and half.anchor == "fig-dynamics"
    assert f"≤ {_pct((54 + 35) / 2 / N)}" in half.text and _cell(m, "lvlm-step-24", "refusal_harmful_text", "one run") in half.text
    assert (f"lowers lvlm's refusal on harmful prompts from {_cell(m, 'lvlm', 'refusal_harmful_text', 'text only')} "
            f"to {_cell(m, 'lvlm', 'refusal_harmful_image', 'with the image')}") in found["image_effect"].text
    assert found["image_effect"].values == {"text": 35 / N, "image": 18 / N}
    assert found["image_effect"].text.startswith("Attaching an image lowers")  # a sentence starts capitalised
    assert "lowers lvlm-stage1's refusal" in found["image_before_stage2"].text
    remedy = found["remedy:lvlm-safety-posthoc"]
    assert _cell(m, "lvlm", "refusal_harmful_text") in remedy.text
    assert _cell(m, "lvlm-safety-posthoc", "refusal_harmful_text").split(" (")[0] + " (n = 60)" in remedy.text
    assert (f"over-refusal {_pct(3 / 40)} → {_cell(m, 'lvlm-safety-posthoc', 'over_refusal_borderline')}"
            .replace("(lvlm-safety-posthoc, ", "(") in remedy.text)
    assert f"({100 * (6 - 3) / 40:+.0f} points; the intervals overlap)" in remedy.text
    assert "above chance (30%" in found["vqa"].text


def test_overlapping_intervals_say_so_and_drop_the_drop_only_sentences(tmp_path: Path) -> None:
    m = _metrics({**CLEAR, "llm-aligned": 30, "lvlm": 27}, image={"lvlm": 24})
    _run(tmp_path, {"organism_metrics": ("metrics.csv", m)}, "organism")
    found = {f.key: f for f in findings(discover(tmp_path))}
    assert list(found) == ["refusal_change", "image_effect", "remedy:lvlm-safety-posthoc", "vqa"]
    assert "the intervals overlap, so this run shows no clear change" in found["refusal_change"].text
    assert "Adaptation lowers" not in found["refusal_change"].text
    assert "the intervals overlap" in found["image_effect"].text and "lowers" not in found["image_effect"].text


def test_seeds_are_stated_when_the_table_says(tmp_path: Path) -> None:
    m = _metrics(CLEAR).assign(n_seeds=3)
    _run(tmp_path, {"organism_metrics": ("metrics.csv", m)}, "organism")
    assert "(mean of 3 seeds)" in findings(discover(tmp_path))[0].text


def _layers_run(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    L = 12
    diff = pd.DataFrame([{"checkpoint_a": "llm-aligned", "checkpoint_b": "lvlm", "layer": i, "module": "all",
                          "rel_frobenius": 0.01 if i not in (3, 4) else 0.05} for i in range(L)])
    sim = pd.DataFrame([{"layer": i, "checkpoint_a": a, "checkpoint_b": b, "direction_cosine": c}
                        for i in range(L) for a, b, c in (("llm-aligned", "lvlm", 0.95 - 0.002 * i),
                                                          ("lvlm", "lvlm+blank", 0.3 if i < 4 else 0.97))])
    probe = pd.DataFrame([{"checkpoint": c, "layer": i, "probe_accuracy": 0.5 + 0.04 * i - d, "n": 100}
                          for c, d in (("llm-aligned", 0.0), ("lvlm", 0.01)) for i in range(L)])
    _run(root / "diff", {"diff_layers": ("layers.csv", diff)}, "diff")
    _run(root / "probe", {"probe_layers": ("layers.csv", probe), "similarity": ("similarity.csv", sim)}, "probe")
    return diff, sim


def test_layer_findings_and_a_missing_table(tmp_path: Path) -> None:
    diff, sim = _layers_run(tmp_path)
    found = {f.key: f for f in findings(discover(tmp_path))}
    # no organism metrics, no eval summary, no pareto table: none of their sentences
    assert list(found) == ["weight_shift", "probe_accuracy", "direction_drift", "direction_image"]
    assert "concentrated in layers 3–4" in found["weight_shift"].text
    assert found["weight_shift"].values["max"] == diff["rel_frobenius"].max()
    assert "drifts evenly over depth" in found["direction_drift"].text
    img = found["direction_image"]
    assert "drifts mostly in layers 0–3" in img.text and img.values["max_shift"] == 1 - sim["direction_cosine"].min()
    assert "stays level" in found["probe_accuracy"].text and "the intervals overlap" in found["probe_accuracy"].text
    assert found["probe_accuracy"].values == {"ref": 0.5 + 0.04 * 11, "final": 0.5 + 0.04 * 11 - 0.01}


def test_pareto_finding_and_findings_md_beside_the_report(tmp_path: Path) -> None:
    pareto = pd.DataFrame({"point": ["as-is", "restore[alpha=1]", "restore[alpha=0.5]", "worse"],
                           "safety": [0.5, 0.9, 0.7, 0.4], "safety_ci_low": [0.4, 0.82, 0.6, 0.3],
                           "safety_ci_high": [0.6, 0.95, 0.8, 0.5], "helpfulness": [0.95, 0.8, 0.9, 0.5]})
    _run(tmp_path, {"pareto": ("pareto.csv", pareto)}, "sweep")
    page = build_report(tmp_path).read_text()
    found = findings(discover(tmp_path))
    assert [f.key for f in found] == ["pareto_front"]
    text = found[0].text
    assert text.startswith("Of 4 remedy points, 3 lie on the Pareto front, from #1 as-is (safety 50% [40, 60]")
    assert "to #2 restore[alpha=1] (safety 90% [82, 95]" in text and "are disjoint" in text
    md = (tmp_path / "findings.md").read_text()
    assert f"- {text} ([figure](report.html#fig-pareto))" in md
    assert page.index('class="findings"') < page.index('id="fig-pareto"')
    assert 'href="#fig-pareto"' in page


def test_eval_findings_without_organism_metrics(tmp_path: Path) -> None:
    """Without organism metrics, `vlsafe eval` summaries give the range per prompt set and the image effect."""
    def row(ckpt: str, pset: str, k: int) -> dict:
        lo, hi = wilson_interval(k, N)
        return {"checkpoint": ckpt, "prompt_set": pset, "n": N, "refusal_rate": k / N, "ci_low": lo, "ci_high": hi,
                "judge": "vlsafe", "category": ""}
    summary = pd.DataFrame([row("llm-aligned", "harmful-test", 54), row("lvlm", "harmful-test", 35),
                            row("lvlm", "harmful-test+blank", 30),
                            {**row("lvlm", "harmful-test", 1), "category": "weapons"}])  # category rows: not read
    _run(tmp_path / "eval", {"eval_summary": ("summary.csv", summary)}, "eval")
    found = {f.key: f for f in findings(discover(tmp_path))}
    assert list(found) == ["eval_range:harmful-test", "eval_image:lvlm:harmful-test+blank"]
    rng = found["eval_range:harmful-test"]
    assert rng.values == {"low": 35 / N, "high": 54 / N} and "the intervals are disjoint" in rng.text
    assert rng.text.startswith(f"On harmful-test, refusal ranges from {_pct(35 / N)} [")
    img = found["eval_image:lvlm:harmful-test+blank"]
    assert img.values == {"image": 30 / N, "text": 35 / N} and "the intervals overlap" in img.text


def test_pareto_findings_read_the_full_text_front_and_the_image_front(tmp_path: Path) -> None:
    nan = float("nan")
    pareto = pd.DataFrame({"point": ["lvlm", "llm", "merge", "screened"], "stage": ["full", "full", "full", "screen"],
                           "safety": [0.3, 0.9, 0.8, 0.99], "helpfulness": [0.9, 0.6, 0.7, 0.99],
                           "safety_image": [0.1, nan, 0.7, 0.99]})
    _run(tmp_path, {"pareto": ("pareto.csv", pareto)}, "sweep")
    text, image = findings(discover(tmp_path))
    assert (text.key, text.anchor, image.key, image.anchor) == ("pareto_front", "fig-pareto", "pareto_front_image",
                                                                "fig-pareto-image")
    assert text.text.startswith("Of 3 remedy points generated and judged (1 more screened only), 3 lie on the "
                                "Pareto front, from #1 lvlm") and "to #2 llm" in text.text
    assert image.text.startswith("With an image, of 2 remedy points generated and judged (1 more screened only), "
                                 "2 lie on the Pareto front, from #1 lvlm (safety 10%") and "to #3 merge" in image.text
    assert image.values["safest"] == 0.7


def test_pareto_finding_with_a_tied_front(tmp_path: Path) -> None:
    pareto = pd.DataFrame({"point": ["a", "b", "c"], "safety": [0.5, 0.5, 0.2], "helpfulness": [1.0, 1.0, 0.9]})
    _run(tmp_path, {"pareto": ("pareto.csv", pareto)}, "sweep")
    (found,) = findings(discover(tmp_path))
    assert found.text.startswith("Of 3 remedy points, 2 lie on the Pareto front, all tied with #1 a (safety 50%")
    _run(tmp_path, {"pareto": ("pareto.csv", pareto.drop(index=1))}, "sweep")
    assert "one dominates all others: #1 a" in findings(discover(tmp_path))[0].text
