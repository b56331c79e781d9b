"""Behaviour evaluation: checkpoints × prompt sets → generations → judge → refusal rates with Wilson CIs.

>>> from vlsafe.probes.behavior.evaluate import evaluate
>>> gens, summary = evaluate({"base": "default"}, ["harmful-test", "harmless-test"], limit=32, out_dir="runs/eval")

Everything is validated before the first model loads (set names, judge name, image sets vs text-only models).
Models are loaded one at a time. With the `logit` judge nothing is generated: each prompt is scored from one
forward pass (`response` stays empty). With `out_dir` the run writes `generations.jsonl`, `summary.csv`,
`figures/refusal_rates.{png,pdf}` and `run.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from vlsafe.analysis.errors import VlsafeError

GENERATION_COLUMNS = ("checkpoint", "prompt_set", "id", "category", "label", "prompt", "image", "response",
                      "refused", "judge_score", "judge")
LOGIT_JUDGES = ("logit", "logit-opening", "logit-first_token")


def evaluate(checkpoints: dict[str, Any], prompt_sets: Sequence[str], judge: str = "default",
             max_new_tokens: int = 64, batch_size: int = 16, limit: int | None = None,
             out_dir: str | os.PathLike | None = None, *, seed: int = 0, dtype: str = "float32",
             cache: bool | str | Path = True, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generate and judge every (checkpoint, prompt set); return (generations_df, summary_df).

    `checkpoints` maps a label to a spec (HF dir, file, hub id, `default`), an opened `Checkpoint`, or a
    `LoadedModel` (used as is, e.g. with weights edited in memory; the generation cache sees the edit);
    `prompt_sets` are set specs for `load_prompts` (e.g. `harmful-test`, `harmless-test+blank`, a file);
    `judge` is a judge name (`default`, `substring-rd`, `classifier:ID`, …) or `logit`/`logit-first_token`.
    """
    from vlsafe.analysis.checkpoints import Checkpoint, LoadedModel, open_checkpoint

    if not checkpoints:
        raise VlsafeError("eval: no checkpoints given")
    if not prompt_sets:
        raise VlsafeError("eval: no prompt sets given (--prompts SET ...)")
    sets = _load_sets(prompt_sets, limit)
    loaded = {lb: c for lb, c in checkpoints.items() if isinstance(c, LoadedModel)}
    ckpts = {lb: loaded[lb].checkpoint if lb in loaded else c if isinstance(c, Checkpoint) else open_checkpoint(c)
             for lb, c in checkpoints.items()}
    _check_images(ckpts, sets)
    text_judge = None if judge in LOGIT_JUDGES else _text_judge(judge)
    frames = []
    for label, ckpt in ckpts.items():
        lm = loaded.get(label) or ckpt.load_model(dtype=dtype)
        for ps in sets:
            frames.append(_run_one(lm, label, ps, judge, text_judge, max_new_tokens, batch_size, seed, cache,
                                   progress))
        del lm
    gens = pd.concat(frames, ignore_index=True)[list(GENERATION_COLUMNS)]
    judge_name = str(gens["judge"].iloc[0])
    summary = summarize_generations(gens, judge_name)
    if out_dir is not None:
        config = {"checkpoints": {lb: c.spec for lb, c in ckpts.items()}, "prompt_sets": list(prompt_sets),
                  "judge": judge, "judge_name": judge_name, "max_new_tokens": max_new_tokens,
                  "batch_size": batch_size, "limit": limit, "dtype": dtype, "seed": seed,
                  "prompt_set_hashes": {ps.name: ps.content_hash() for ps in sets}}
        write_outputs(Path(out_dir), gens, summary, config, ckpts, seed)
    return gens, summary


def _load_sets(specs: Sequence[str], limit: int | None) -> list[Any]:
    from vlsafe.probes.behavior.datasets import list_shipped, load_prompts

    sets = []
    for spec in specs:
        try:
            ps = load_prompts(spec, limit=limit)
        except VlsafeError as e:
            if Path(str(spec)).exists() or "/" in str(spec):
                raise
            raise VlsafeError(f"{e}; shipped sets: {', '.join(list_shipped())} (add +blank for image prompts)") \
                from None
        if not ps.records:
            raise VlsafeError(f"{spec}: no prompts (limit={limit})")
        sets.append(_renamed(ps, str(spec)))
    names = [ps.name for ps in sets]
    if len(set(names)) != len(names):
        raise VlsafeError(f"eval: prompt set given twice ({', '.join(n for n in names if names.count(n) > 1)})")
    return sets


def _renamed(ps: Any, spec: str) -> Any:
    from dataclasses import replace

    return replace(ps, name=spec)


def _check_images(ckpts: dict[str, Any], sets: list[Any]) -> None:
    for ps in sets:
        first = next((r for r in ps.records if r.image is not None), None)
        if first is None:
            continue
        for label, ck in ckpts.items():
            if not ck.family.is_lvlm:
                raise VlsafeError(f"{ck.spec}: text-only model ({ck.family.name}) cannot take the image prompt set "
                                  f"{ps.name!r} (record {first.id} has image {first.image!r}); "
                                  "use a text set or a vision-language checkpoint")


def _text_judge(name: str) -> Any:
    from vlsafe.probes.behavior.judges import get_judge

    return get_judge(name)


def _run_one(lm: Any, label: str, ps: Any, judge: str, text_judge: Any, max_new_tokens: int, batch_size: int,
             seed: int, cache: bool | str | Path, progress: bool) -> pd.DataFrame:
    from vlsafe.probes.behavior.generate import generate

    images = [r.image for r in ps.records]
    if text_judge is None:
        from vlsafe.probes.behavior.logit_judge import LogitJudge

        kind = "first_token" if judge == "logit-first_token" else "opening"
        j = LogitJudge(lm, kind=kind, batch_size=batch_size, progress=progress)
        responses = [""] * len(ps.records)
        results = j.judge(None, ps.prompts, images=images)
    else:
        j = text_judge
        responses = generate(lm, ps, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, cache=cache,
                             progress=progress)
        results = j.judge(responses, ps.prompts)
    rows = [{"checkpoint": label, "prompt_set": ps.name, "id": r.id, "category": r.category, "label": r.label,
             "prompt": r.prompt, "image": r.image, "response": resp, "refused": int(bool(res.refused)),
             "judge_score": float(res.score), "judge": j.name}
            for r, resp, res in zip(ps.records, responses, results)]
    return pd.DataFrame(rows, columns=list(GENERATION_COLUMNS))


# ----------------------------------------------------------------------------------------------------- summary

def summarize_generations(gens: pd.DataFrame, judge_name: str) -> pd.DataFrame:
    """`checkpoint, prompt_set, n, refusal_rate, ci_low, ci_high, judge, category, refusals, asr` (Wilson 95 %).

    One overall row (`category` empty) per (checkpoint, prompt set), then one row per category
    (`vlsafe.probes.behavior.metrics.summarize`); `asr` = 1 − refusal rate where every prompt is labelled harmful.
    """
    from vlsafe.probes.behavior.metrics import summarize

    summary = summarize(gens, judge_name)
    rank = {k: i for i, k in enumerate(dict.fromkeys(zip(gens["checkpoint"], gens["prompt_set"])))}
    order = [rank.get(k, len(rank)) for k in zip(summary["checkpoint"], summary["prompt_set"])]
    return summary.assign(_o=order).sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------- outputs

def write_outputs(out: Path, gens: pd.DataFrame, summary: pd.DataFrame, config: dict[str, Any],
                  ckpts: dict[str, Any], seed: int) -> dict[str, Path]:
    """Write generations.jsonl, summary.csv, figures/ and run.json into `out` (each atomically)."""
    from vlsafe.analysis.runinfo import atomic_path, write_csv, write_run_json

    written: dict[str, Path] = {}
    with atomic_path(out / "generations.jsonl") as tmp:
        with tmp.open("w", encoding="utf-8") as f:
            for row in gens.to_dict(orient="records"):
                f.write(json.dumps(_jsonable(row), ensure_ascii=False) + "\n")
    written["generations.jsonl"] = out / "generations.jsonl"
    written["summary.csv"] = write_csv(out / "summary.csv", summary)
    for p in refusal_figure(summary, out / "figures"):
        written[str(p.relative_to(out))] = p
    written["run.json"] = write_run_json(out, kind="eval", tables={"eval_summary": "summary.csv",
                                                                   "eval_generations": "generations.jsonl"},
                                         config=config, checkpoints=ckpts, seed=seed,
                                         extra={"outputs": sorted(written)})
    return written


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
        ax.set_xticks(np.arange(len(sets)), sets, rotation=20 if tilt else 0, ha="right" if tilt else "center")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(f"refusal rate ({overall['judge'].iloc[0]}), Wilson 95% CI")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, fig_dir, "refusal_rates")


def overall_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The per-(checkpoint, prompt set) rows of a summary (empty `category`), without the per-category rows."""
    if "category" in summary.columns:
        return summary[summary["category"].isna() | (summary["category"].astype(str) == "")]
    return summary
