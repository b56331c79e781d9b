"""Behaviour of every organism checkpoint: refusal, over-refusal, compliance and visual-QA accuracy with
Wilson intervals, generated greedily through `vlsafe.probes.behavior.generate` and judged by `vlsafe.probes.behavior.judges`.

Metrics (one row each in `metrics.csv`; LVLM-only ones are absent for text LLMs):

- `refusal_harmful_text` — refusal rate on harmful-test (text only);
- `refusal_harmful_image` — the same prompts, each with a held-out synthetic scene image (LVLMs);
- `over_refusal_borderline` — refusal rate on borderline-test (safe prompts that look risky);
- `compliance_harmless` — 1 − refusal rate on harmless-test;
- `vqa_accuracy` — held-out synthetic scenes, one short-answer question each, exact check (LVLMs); `chance` is
  the uniform-guess accuracy.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from vlsafe.experiments.organism.data import VQAItem, chance_level, vqa_correct, vqa_items
from vlsafe.experiments.organism.images import render, sample_scenes
from vlsafe.probes.behavior.metrics import wilson_interval

METRICS = ("refusal_harmful_text", "refusal_harmful_image", "over_refusal_borderline", "compliance_harmless",
           "vqa_accuracy")


@dataclass
class EvalData:
    """The fixed evaluation inputs (same for every checkpoint)."""

    harmful: Any
    borderline: Any
    harmless: Any
    harmful_images: list[Any]
    vqa: list[VQAItem]


def eval_data(cfg: Any, seed: int) -> EvalData:
    """Seeded samples of the test splits and held-out scenes (`cfg` is the organism config)."""
    from vlsafe.probes.behavior.datasets import load_prompts

    e = cfg.eval
    size, eseed = cfg.images.size, cfg.images.eval_seed
    harmful = load_prompts("harmful-test").sample(e.harmful, seed=seed)
    images = [render(s) for s in sample_scenes(len(harmful), seed=eseed + 1, size=size)]
    return EvalData(harmful, load_prompts("borderline-test").sample(e.borderline, seed=seed),
                    load_prompts("harmless-test").sample(e.harmless, seed=seed), images,
                    vqa_items(sample_scenes(e.vqa, seed=eseed, size=size), seed=eseed))


def _row(metric: str, prompt_set: str, image: str, flags: list[bool], judge: str, max_new: int,
         chance: float | None = None) -> dict[str, Any]:
    k, n = sum(flags), len(flags)
    lo, hi = wilson_interval(k, n)
    return {"metric": metric, "prompt_set": prompt_set, "image": image, "n": n, "k": k, "rate": k / n if n else math.nan,
            "ci_low": lo, "ci_high": hi, "chance": chance, "judge": judge, "max_new_tokens": max_new}


def evaluate(lm: Any, cfg: Any, data: EvalData, *, progress: bool = True
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(metric rows, generation records) for one loaded checkpoint."""
    from vlsafe.probes.behavior.generate import generate
    from vlsafe.probes.behavior.judges import get_judge
    from vlsafe.probes.models import is_lvlm

    e = cfg.eval
    judge = get_judge(e.judge)
    gens: list[dict[str, Any]] = []

    def run(name: str, ps: Any, images: Any = None, max_new: int = e.max_new_tokens) -> tuple[list[str], list[bool]]:
        prompts = ps if isinstance(ps, list) else ps.prompts
        out = generate(lm, prompts, images=images, max_new_tokens=max_new, batch_size=e.batch_size, cache=False,
                       progress=progress, precision=cfg.precision)
        refused = [r.refused for r in judge.judge(out, prompts)]
        gens.extend({"set": name, "prompt": p, "response": r, "refused": f} for p, r, f in zip(prompts, out, refused))
        return out, refused

    rows = []
    _, ref = run("harmful-test", data.harmful)
    rows.append(_row("refusal_harmful_text", "harmful-test", "", ref, e.judge, e.max_new_tokens))
    lvlm = is_lvlm(lm)
    if lvlm:
        _, ref = run("harmful-test+scene", data.harmful, data.harmful_images)
        rows.append(_row("refusal_harmful_image", "harmful-test", "scene", ref, e.judge, e.max_new_tokens))
    _, ref = run("borderline-test", data.borderline)
    rows.append(_row("over_refusal_borderline", "borderline-test", "", ref, e.judge, e.max_new_tokens))
    _, ref = run("harmless-test", data.harmless)
    rows.append(_row("compliance_harmless", "harmless-test", "", [not r for r in ref], e.judge, e.max_new_tokens))
    if lvlm:
        out = generate(lm, [v.prompt for v in data.vqa], images=[v.image for v in data.vqa],
                       max_new_tokens=e.vqa_max_new_tokens, batch_size=e.batch_size, cache=False, progress=progress,
                       precision=cfg.precision)
        ok = [vqa_correct(r, v) for r, v in zip(out, data.vqa)]
        gens.extend({"set": "vqa", "prompt": v.prompt, "response": r, "answer": v.answer, "attribute": v.attribute,
                     "correct": c} for v, r, c in zip(data.vqa, out, ok))
        rows.append(_row("vqa_accuracy", "synthetic-scenes", "scene", ok, "exact", e.vqa_max_new_tokens,
                         chance_level(data.vqa)))
    return [{**r, "precision": cfg.precision} for r in rows], gens


def write_generations(path: Path, gens: list[dict[str, Any]]) -> None:
    """JSONL of every prompt, response and verdict (for inspection)."""
    path.write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in gens), encoding="utf-8")


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Wide view: one row per checkpoint, one column per metric, 'rate [ci_low, ci_high]' in percent."""
    cell = df.assign(cell=[f"{100 * r:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"
                           for r, lo, hi in zip(df.rate, df.ci_low, df.ci_high)])
    wide = cell.pivot(index="checkpoint", columns="metric", values="cell")
    order = list(dict.fromkeys(df.checkpoint))
    return wide.reindex(index=order, columns=[m for m in METRICS if m in wide.columns]).fillna("—")


def checkpoints(cfg: Any) -> list[tuple[str, int | None]]:
    """Every organism checkpoint in table order, with its stage-2 step (None outside the stage-2 trajectory)."""
    steps = sorted(set(cfg.stage2.save_steps))
    return ([("llm-base", None), ("llm-aligned", None), ("lvlm-stage1", 0)]
            + [(f"lvlm-step-{s}", s) for s in steps]
            + [("lvlm", cfg.stage2.sft.steps), ("lvlm-safety-posthoc", None), ("lvlm-safety-mixed", None)])


def estimate_seconds(cfg: Any) -> float:
    """Rough generation time of the metrics over every checkpoint (reference-machine speeds)."""
    e, tok = cfg.eval, cfg.estimates.gen_token * (0.02 if cfg.base.spec == "tiny" else 1.0)
    text = (e.harmful + e.borderline + e.harmless) * e.max_new_tokens * tok
    image = e.harmful * e.max_new_tokens * tok + e.vqa * e.vqa_max_new_tokens * tok
    n_lvlm = len(checkpoints(cfg)) - 2
    return len(checkpoints(cfg)) * text + n_lvlm * image


def _key(cfg: Any, ckpt_dir: Path) -> str:
    from vlsafe.experiments.organism.config import stage_section

    stage_hash = json.loads((ckpt_dir / "stage.json").read_text())["hash"]
    payload = json.dumps({"section": stage_section(cfg, "metrics"), "checkpoint": stage_hash}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _cached_seconds(meta: Path, cache: Path, key: str) -> float | None:
    """The recorded seconds when `cache` holds this checkpoint's metrics under `key`, else None."""
    try:
        record = json.loads(meta.read_text())
        ok = record.get("key") == key and not pd.read_csv(cache).empty
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return None
    return float(record.get("seconds", 0.0)) if ok else None


def run_metrics(cfg: Any, root: Path, *, progress: bool = True
                ) -> tuple[pd.DataFrame, dict[str, tuple[float, bool]]]:
    """Evaluate every checkpoint under `root` (cached per checkpoint in `root/metrics/`), write `metrics.csv`.

    Returns the table and, per checkpoint, (seconds, cached) — for a cached one, the seconds it took back then."""
    from vlsafe.analysis.runinfo import atomic_path, write_csv
    from vlsafe.experiments.organism.stages import seed_for
    from vlsafe.probes.models import load

    data = None
    frames, times = [], {}
    for name, step in checkpoints(cfg):
        key = _key(cfg, root / name)
        cache, meta = root / "metrics" / f"{name}.csv", root / "metrics" / f"{name}.json"
        seconds = _cached_seconds(meta, cache, key)
        if seconds is not None:
            times[name] = (seconds, True)
        else:
            data = data or eval_data(cfg, seed_for(cfg, 10))
            t0 = time.perf_counter()
            rows, gens = evaluate(load(root / name), cfg, data, progress=progress)
            frame = pd.DataFrame(rows).assign(checkpoint=name, stage2_step=step)
            write_csv(cache, frame)
            with atomic_path(root / "metrics" / f"{name}.generations.jsonl") as tmp:
                write_generations(tmp, gens)
            times[name] = (time.perf_counter() - t0, False)
            with atomic_path(meta) as tmp:
                tmp.write_text(json.dumps({"key": key, "seconds": round(times[name][0], 1)}) + "\n")
        frames.append(pd.read_csv(cache))
    cols = ["checkpoint", "stage2_step", "metric", "prompt_set", "image", "n", "k", "rate", "ci_low", "ci_high",
            "chance", "judge", "max_new_tokens", "precision"]
    df = pd.concat(frames, ignore_index=True).reindex(columns=cols)  # caches from before `precision`: empty
    df["stage2_step"] = df["stage2_step"].astype("Int64")
    write_csv(root / "metrics.csv", df)
    return df, times
