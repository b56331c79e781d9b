"""Behaviour of every organism checkpoint: refusal, over-refusal, compliance and visual-QA accuracy with
Wilson intervals, from the one evaluation `vlsafe.probes.behavior.evaluate.evaluate_model` (greedy generation,
judged by `vlsafe.probes.behavior.judges`; the VQA answers checked exactly by `vqa_correct`).

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from vlsafe.analysis.errors import VlsafeError
from vlsafe.experiments.organism.data import VQAItem, chance_level, vqa_correct, vqa_items
from vlsafe.experiments.organism.images import render, sample_scenes

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


# (metric, image label) of the one evaluation's rows → the organism's metric name
NAMES = {("refusal_rate", ""): "refusal_harmful_text", ("refusal_rate", "scene"): "refusal_harmful_image",
         ("over_refusal", ""): "over_refusal_borderline", ("compliance", ""): "compliance_harmless",
         ("accuracy", "scene"): "vqa_accuracy"}


def eval_sets(data: EvalData, lvlm: bool, vqa_max_new_tokens: int) -> list[Any]:
    """The organism's `EvalSet`s in evaluation order (the image ones only for an LVLM)."""
    from vlsafe.probes.behavior.datasets import PromptRecord, PromptSet
    from vlsafe.probes.behavior.evaluate import EvalSet

    sets = [EvalSet(data.harmful)]
    if lvlm:
        sets.append(EvalSet(data.harmful, image="scene", images=data.harmful_images))
    sets += [EvalSet(data.borderline, metric="over_refusal"), EvalSet(data.harmless, metric="compliance")]
    if lvlm:
        vqa = PromptSet("synthetic-scenes", [PromptRecord(id=f"vqa-{i}", prompt=v.prompt)
                                             for i, v in enumerate(data.vqa)])
        sets.append(EvalSet(vqa, metric="accuracy", image="scene", images=[v.image for v in data.vqa],
                            max_new_tokens=vqa_max_new_tokens, check=lambda i, r: vqa_correct(r, data.vqa[i]),
                            check_name="exact"))
    return sets


def evaluate(lm: Any, cfg: Any, data: EvalData, *, progress: bool = True
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(metric rows, generation records) for one loaded checkpoint, from the overall rows of the one evaluation
    (`vlsafe.probes.behavior.evaluate.evaluate_model`; its `judge` column here is the configured judge name)."""
    from vlsafe.probes.behavior.evaluate import evaluate_model
    from vlsafe.probes.models import is_lvlm

    e = cfg.eval
    gens, rows = evaluate_model(lm, eval_sets(data, is_lvlm(lm), e.vqa_max_new_tokens), judge=e.judge,
                                max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, cache=False,
                                progress=progress, precision=cfg.precision)
    return _metric_rows(rows, cfg, data), _records(gens, data)


def rejudge_records(records: list[dict[str, Any]], cfg: Any, data: EvalData
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(metric rows, generation records) of a checkpoint's stored generation records judged again by
    `cfg.eval.judge` (`vlsafe.probes.behavior.evaluate.rejudge`): what `evaluate` gives for the same responses."""
    from vlsafe.probes.behavior.evaluate import rejudge

    lvlm = any(r["set"] == "vqa" for r in records)
    stored = pd.DataFrame({"prompt": [r["prompt"] for r in records], "response": [r["response"] for r in records]})
    gens, rows = rejudge(stored, eval_sets(data, lvlm, cfg.eval.vqa_max_new_tokens), judge=cfg.eval.judge)
    return _metric_rows(rows, cfg, data), _records(gens, data)


def _metric_rows(rows: pd.DataFrame, cfg: Any, data: EvalData) -> list[dict[str, Any]]:
    """The organism's metric rows from the overall rows of the one evaluation."""
    e, out = cfg.eval, []
    for r in rows[rows["category"] == ""].itertuples():
        vqa = r.metric == "accuracy"
        out.append({"metric": NAMES[(r.metric, r.image)], "prompt_set": r.prompt_set, "image": r.image, "n": int(r.n),
                    "k": int(r.k), "rate": r.rate, "ci_low": r.ci_low, "ci_high": r.ci_high,
                    "chance": chance_level(data.vqa) if vqa else None, "judge": r.judge if vqa else e.judge,
                    "max_new_tokens": e.vqa_max_new_tokens if vqa else e.max_new_tokens, "precision": cfg.precision})
    return out


def _records(gens: pd.DataFrame, data: EvalData) -> list[dict[str, Any]]:
    """The generation records of `metrics/<checkpoint>.generations.jsonl`."""
    out: list[dict[str, Any]] = []
    vqa = iter(data.vqa)
    for g in gens.itertuples():
        if g.metric == "accuracy":
            v = next(vqa)
            out.append({"set": "vqa", "prompt": g.prompt, "response": g.response, "answer": v.answer,
                        "attribute": v.attribute, "correct": bool(g.correct)})
        else:
            name = g.prompt_set + (f"+{g.image}" if isinstance(g.image, str) and g.image else "")
            out.append({"set": name, "prompt": g.prompt, "response": g.response, "refused": bool(g.refused)})
    return out


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


def checkpoints(cfg: Any, names: list[str] | None = None) -> list[tuple[str, int | None]]:
    """Every organism checkpoint (or those in `names`) in table order, with its stage-2 step (None outside the
    stage-2 trajectory)."""
    every = ([("llm-base", None), ("llm-aligned", None), ("lvlm-stage1", 0)]
             + [(f"lvlm-step-{s}", s) for s in cfg.stage2_saves]
             + [("lvlm", cfg.stage2.sft.steps), ("lvlm-safety-posthoc", None), ("lvlm-safety-mixed", None)])
    return every if names is None else [(n, s) for n, s in every if n in names]


def estimate_seconds(cfg: Any) -> float:
    """Rough generation time of the metrics over every checkpoint (reference-machine speeds)."""
    e, tok = cfg.eval, cfg.estimates.gen_token * (0.02 if cfg.base.spec == "tiny" else 1.0)
    text = (e.harmful + e.borderline + e.harmless) * e.max_new_tokens * tok
    image = e.harmful * e.max_new_tokens * tok + e.vqa * e.vqa_max_new_tokens * tok
    n_lvlm = len(checkpoints(cfg)) - 2
    return len(checkpoints(cfg)) * text + n_lvlm * image


def _key(cfg: Any, ckpt_dir: Path, *, judged: bool = True, fingerprint: bool = True) -> str:
    """The cache key of a checkpoint's metrics: the metrics config, the checkpoint's stage hash and the judge's
    version (`judges.keyed_fingerprint`; left out for the version every earlier cache was judged by).

    `fingerprint=False` leaves the judge's version out (the key every cache written before it was keyed had);
    `judged=False` leaves the judge out altogether: the generation key, equal for caches whose responses are the
    same whichever judge labelled them."""
    from vlsafe.experiments.organism.config import stage_section
    from vlsafe.probes.behavior.judges import keyed_fingerprint

    stage_hash = json.loads((ckpt_dir / "stage.json").read_text())["hash"]
    section = stage_section(cfg, "metrics")
    if not judged:
        section = {**section, "eval": {k: v for k, v in section["eval"].items() if k != "judge"}}
    record = {"section": section, "checkpoint": stage_hash}
    if judged and fingerprint and (fp := keyed_fingerprint(cfg.eval.judge)) is not None:
        record["judge_fingerprint"] = fp  # a retrained judge re-judges
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _cached_seconds(meta: Path, cache: Path, key: str) -> float | None:
    """The recorded seconds when `cache` holds this checkpoint's metrics under `key`, else None."""
    try:
        record = json.loads(meta.read_text())
        ok = record.get("key") == key and not pd.read_csv(cache).empty
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return None
    return float(record.get("seconds", 0.0)) if ok else None


def metrics_cached(cfg: Any, root: Path, names: list[str] | None = None) -> bool:
    """True when `root/metrics.csv` exists and every checkpoint's metrics (or those in `names`) are cached for the
    current config."""
    try:
        return (root / "metrics.csv").is_file() and all(
            _cached_seconds(root / "metrics" / f"{n}.json", root / "metrics" / f"{n}.csv", _key(cfg, root / n))
            is not None for n, _ in checkpoints(cfg, names))
    except (OSError, ValueError, KeyError):
        return False


def _reuse_metrics(root: Path, name: str, key: str, reuse: list[Path]) -> float | None:
    """Link checkpoint `name`'s cached metrics from another organism root holding them under the same key (the
    same checkpoint hash and eval config); returns their recorded seconds, or None when no root has them."""
    from vlsafe.experiments.organism.build import link_file

    files = (f"{name}.csv", f"{name}.generations.jsonl", f"{name}.json")  # the record last: it marks them valid
    for other in reuse:
        src = other / "metrics"
        if other.resolve() == root.resolve() or not (src / files[1]).is_file():
            continue
        seconds = _cached_seconds(src / files[2], src / files[0], key)
        if seconds is not None:
            for f in files:
                link_file(src / f, root / "metrics" / f)
            return seconds
    return None


def _stored_generations(cfg: Any, root: Path, name: str, gen_key: str) -> tuple[list[dict[str, Any]], float] | None:
    """(generation records, their recorded seconds) of checkpoint `name` when `root/metrics` holds its responses
    under the generation key `gen_key` (the current settings) judged by another judge (or another version of it),
    else None. A record from before the field counts when its key is what an unversioned judge gave."""
    meta, path = root / "metrics" / f"{name}.json", root / "metrics" / f"{name}.generations.jsonl"
    try:
        record = json.loads(meta.read_text())
        same = (record["generation_key"] == gen_key if "generation_key" in record
                else record.get("key") == _key(cfg, root / name, fingerprint=False))
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if same else []
    except (OSError, ValueError, KeyError):
        return None
    return (records, float(record.get("seconds", 0.0))) if records else None


def _write_metrics(root: Path, name: str, step: int | None, result: tuple[list[Any], list[Any]],
                   keys: tuple[str, str], seconds: float, *, rejudged: bool = False) -> None:
    """Cache one checkpoint's metric rows and generation records (`result`) under (key, generation key), the
    record (`{name}.json`) last."""
    from vlsafe.analysis.runinfo import atomic_path, write_csv, write_json

    rows, gens = result
    key, generation_key = keys
    write_csv(root / "metrics" / f"{name}.csv", pd.DataFrame(rows).assign(checkpoint=name, stage2_step=step))
    with atomic_path(root / "metrics" / f"{name}.generations.jsonl") as tmp:
        write_generations(tmp, gens)
    record = {"key": key, "generation_key": generation_key, "seconds": round(seconds, 1)}
    write_json(root / "metrics" / f"{name}.json", {**record, **({"rejudged": True} if rejudged else {})})


def run_metrics(cfg: Any, root: Path, *, progress: bool = True, reuse: list[Path] | tuple[Path, ...] = (),
                names: list[str] | None = None) -> tuple[pd.DataFrame, dict[str, tuple[float, bool]]]:
    """Evaluate every checkpoint under `root` (or those in `names`; cached per checkpoint in `root/metrics/`),
    write `metrics.csv`.

    A checkpoint whose metrics another organism root in `reuse` holds under the same key (same checkpoint stage
    hash, same eval config) gets them hard-linked instead of evaluated. One whose stored generations were made with
    the same settings but judged by another judge, or another version of it, is judged again from them
    (`rejudge_records`; nothing generated, the record says `rejudged`). Returns the table and, per checkpoint,
    (seconds, cached) — for a cached or linked one, the seconds it took back then."""
    from vlsafe.analysis.runinfo import write_csv
    from vlsafe.experiments.organism.stages import seed_for
    from vlsafe.probes.models import load

    data: EvalData | None = None  # sampled on first need
    frames, times = [], {}
    for name, step in checkpoints(cfg, names):
        key = _key(cfg, root / name)
        cache, meta = root / "metrics" / f"{name}.csv", root / "metrics" / f"{name}.json"
        seconds = _cached_seconds(meta, cache, key)
        if seconds is None:
            seconds = _reuse_metrics(root, name, key, [Path(r) for r in reuse])
        gen_key = _key(cfg, root / name, judged=False)
        if seconds is None and (stored := _stored_generations(cfg, root, name, gen_key)) is not None:
            data = data or eval_data(cfg, seed_for(cfg, 10))
            try:
                result = rejudge_records(stored[0], cfg, data)
            except VlsafeError:  # stored for other prompts (a changed prompt file): generate them again
                pass
            else:
                seconds = stored[1]
                _write_metrics(root, name, step, result, (key, gen_key), seconds, rejudged=True)
        if seconds is not None:
            times[name] = (seconds, True)
        else:
            data = data or eval_data(cfg, seed_for(cfg, 10))
            t0 = time.perf_counter()
            result = evaluate(load(root / name), cfg, data, progress=progress)
            times[name] = (time.perf_counter() - t0, False)
            _write_metrics(root, name, step, result, (key, gen_key), times[name][0])
        frames.append(pd.read_csv(cache))
    cols = ["checkpoint", "stage2_step", "metric", "prompt_set", "image", "n", "k", "rate", "ci_low", "ci_high",
            "chance", "judge", "max_new_tokens", "precision"]
    df = pd.concat(frames, ignore_index=True).reindex(columns=cols)  # caches from before `precision`: empty
    df["stage2_step"] = df["stage2_step"].astype("Int64")
    write_csv(root / "metrics.csv", df)
    return df, times
