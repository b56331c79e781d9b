"""The files of `vlsafe eval`: `generations.jsonl`, `summary.csv`, `metrics.csv` (the tidy rows of the one
evaluation), `figures/refusal_rates.{png,pdf}`, `run.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd


def write_outputs(out: Path, gens: pd.DataFrame, summary: pd.DataFrame, config: dict[str, Any],
                  ckpts: dict[str, Any], seed: int, *, metrics: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write generations.jsonl, summary.csv, metrics.csv (when given), figures/ and run.json into `out` (each
    atomically)."""
    from vlsafe.analysis.runinfo import atomic_path, write_csv, write_run_json

    written: dict[str, Path] = {}
    with atomic_path(out / "generations.jsonl") as tmp:
        with tmp.open("w", encoding="utf-8") as f:
            for row in gens.to_dict(orient="records"):
                f.write(json.dumps(_jsonable(row), ensure_ascii=False) + "\n")
    written["generations.jsonl"] = out / "generations.jsonl"
    written["summary.csv"] = write_csv(out / "summary.csv", summary)
    tables = {"eval_summary": "summary.csv", "eval_generations": "generations.jsonl"}
    if metrics is not None:
        written["metrics.csv"] = write_csv(out / "metrics.csv", metrics)
        tables["eval_metrics"] = "metrics.csv"
    for p in refusal_figure(summary, out / "figures"):
        written[str(p.relative_to(out))] = p
    written["run.json"] = write_run_json(out, kind="eval", tables=tables, config=config, checkpoints=ckpts,
                                         seed=seed, extra={"outputs": sorted(written)})
    return written


def read_run(run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame, dict[str, Any]]:
    """(config, stored generations, checkpoint records) of a `vlsafe eval` run directory; one-line errors naming
    the file when it is not one (no run.json, another kind of run, no generations, a checkpoint without rows)."""
    from vlsafe.analysis.errors import VlsafeError

    from vlsafe.analysis.runinfo import read_json_object

    run_json, gens_file = run_dir / "run.json", run_dir / "generations.jsonl"
    record = read_json_object(run_json)
    config = record.get("config")
    if record.get("kind") != "eval" or not isinstance(config, dict) \
            or not all(k in config for k in ("checkpoints", "prompt_sets")):
        raise VlsafeError(f"{run_json}: not a `vlsafe eval` run (kind {record.get('kind')!r})")
    try:
        stored = pd.read_json(gens_file, lines=True, dtype=False, convert_dates=False)
    except (OSError, ValueError) as e:
        raise VlsafeError(f"{gens_file}: cannot read the stored generations ({type(e).__name__})") from None
    missing = [c for c in ("checkpoint", "prompt", "response") if c not in stored.columns]
    if missing:
        raise VlsafeError(f"{gens_file}: no column {missing[0]!r}")
    have, want = set(stored["checkpoint"]), set(config["checkpoints"])
    if have != want:
        odd = sorted(want - have) or sorted(have - want)
        raise VlsafeError(f"{gens_file}: generations of checkpoints {sorted(have)}, run.json names {sorted(want)} "
                          f"({odd[0]!r} differs)")
    return config, stored, record.get("checkpoints") or {}


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if v is None or (isinstance(v, float) and v != v) or v is pd.NA:
            out[k] = None
        elif hasattr(v, "item"):
            out[k] = v.item()
        else:
            out[k] = v
    return out


def refusal_figure(summary: pd.DataFrame, fig_dir: Path) -> list[Path]:
    """Bar chart of overall refusal rates with Wilson CIs, grouped by prompt set, one colour per checkpoint."""
    import numpy as np

    from vlsafe.analysis.figures import checkpoint_colors, new_figure, paper_style, save_figure

    overall = overall_rows(summary)
    if overall.empty:
        return []
    labels = list(dict.fromkeys(overall["checkpoint"]))
    sets = list(dict.fromkeys(overall["prompt_set"]))
    colors = checkpoint_colors(labels)
    fig, ax = new_figure("page" if len(sets) * len(labels) > 6 else "column")
    width = 0.8 / len(labels)
    with paper_style():
        for k, lb in enumerate(labels):
            sub = overall[overall["checkpoint"] == lb].set_index("prompt_set").reindex(sets)
            x = np.arange(len(sets)) + (k - (len(labels) - 1) / 2) * width
            rate = sub["refusal_rate"].to_numpy(float)
            err = np.vstack([rate - sub["ci_low"].to_numpy(float), sub["ci_high"].to_numpy(float) - rate])
            ax.bar(x, rate, width, yerr=err, capsize=2, color=colors[lb], label=lb, error_kw={"linewidth": 0.6})
        tilt = len(sets) > 2
        ax.set_xticks(np.arange(len(sets)), sets, rotation=20 if tilt else 0, ha="right" if tilt else "center",
                      rotation_mode="anchor" if tilt else "default")  # a tilted label ends under its group
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(f"refusal rate ({overall['judge'].iloc[0]}), Wilson 95% CI")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, fig_dir, "refusal_rates")


def overall_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The per-(checkpoint, prompt set) rows of a summary (empty `category`), without the per-category rows."""
    if "category" in summary.columns:
        return summary[summary["category"].isna() | (summary["category"].astype(str) == "")]
    return summary
