"""The one behaviour evaluation: a loaded model × prompt sets → generations or logit scores → judge → tidy rows.

>>> from vlsafe.probes.models import load
>>> from vlsafe.probes.behavior.datasets import load_prompts
>>> from vlsafe.probes.behavior.evaluate import EvalSet, evaluate_model
>>> gens, rows = evaluate_model(load("default"), [EvalSet(load_prompts("harmful-test", limit=32)),
...                             EvalSet(load_prompts("harmless-test", limit=32), metric="compliance")])

`evaluate_model` is what `vlsafe eval`, the sweep evaluator and the organism's metrics call. Its rows have the
columns `ROW_COLUMNS` (checkpoint, prompt_set, image, metric, n, k, rate, ci_low, ci_high, judge, category,
harmful, mode): per set an overall row (`category` empty), then one row per category, rates with Wilson 95 %
intervals (`vlsafe.probes.behavior.metrics.rate_rows`). When the judge carries a calibration (its measured
sensitivity and specificity; the default judge does), the rows also have `CORRECTED_COLUMNS` (`rate_corrected,
corrected_low, corrected_high`: the Rogan–Gladen rate with an interval carrying the judge's error,
`vlsafe.probes.behavior.calibration`). Metrics (`METRICS`):

- `refusal_rate`, `over_refusal` — the share of prompts refused (the second names a safe-but-edgy set);
- `compliance` — the share not refused (`k` counts compliant answers);
- `accuracy` — the share of generated answers the set's `check(i, response)` accepts (no refusal judge);
- `answer_loglik` — the mean per-token log-likelihood of the set's reference answers, normal 95 % interval.

Generation goes through `vlsafe.probes.behavior.generate` (its cache). With a logit judge (`LOGIT_JUDGES`)
refusal is scored from one forward pass per prompt and `response` stays empty.
`rejudge` judges stored generations again (another or a retrained judge) without the model: the same frames and
rows as had the model generated them; the organism's metrics and the sweep use it when only the judge changed.

`evaluate` runs checkpoints × set specs for `vlsafe eval` (validated before the first model loads, models loaded
one at a time) and, with `out_dir`, writes `generations.jsonl`, `summary.csv`, `figures/` and `run.json`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.behavior.metrics import ROW_COLUMNS

GENERATION_COLUMNS = ("checkpoint", "prompt_set", "id", "category", "label", "prompt", "image", "response",
                      "refused", "judge_score", "judge")
LOGIT_JUDGES = ("logit", "logit-opening", "logit-first_token")
METRICS = ("refusal_rate", "over_refusal", "compliance", "accuracy", "answer_loglik")
__all__ = ["EvalSet", "evaluate_model", "rejudge", "evaluate", "rejudge_run", "ROW_COLUMNS", "GENERATION_COLUMNS",
           "LOGIT_JUDGES", "METRICS"]


@dataclass(frozen=True)
class EvalSet:
    """One prompt set and what to measure on it.

    `prompts` is a `PromptSet`; `images` overrides its records' images (one PIL image / spec / None per prompt);
    `image` labels the rows (default: the image spec every record shares, else empty); `max_new_tokens` overrides
    the evaluation's; `check(i, response)` decides `accuracy`; `references` are the answers `answer_loglik` scores;
    `check_name` is the `judge` of accuracy rows.
    """

    prompts: Any
    metric: str = "refusal_rate"
    image: str = ""
    images: Sequence[Any] | None = None
    max_new_tokens: int | None = None
    check: Callable[[int, str], bool] | None = None
    check_name: str = "exact"
    references: Sequence[str] | None = None

    def __post_init__(self) -> None:
        name = getattr(self.prompts, "name", "?")
        if self.metric not in METRICS:
            raise VlsafeError(f"eval set {name}: unknown metric {self.metric!r} (expected one of {', '.join(METRICS)})")
        if (self.metric == "accuracy") != (self.check is not None):
            raise VlsafeError(f"eval set {name}: metric 'accuracy' and a check(i, response) go together")
        if (self.metric == "answer_loglik") != (self.references is not None):
            raise VlsafeError(f"eval set {name}: metric 'answer_loglik' and references go together")
        if self.images is not None and len(self.images) != len(self.prompts.records):
            raise VlsafeError(f"eval set {name}: {len(self.images)} images for {len(self.prompts.records)} prompts")

    @property
    def label(self) -> str:
        """The `image` of the rows: the given label, else the image spec every record shares, else empty."""
        if self.image or self.images is not None:
            return self.image
        specs = {r.image for r in self.prompts.records}
        return next(iter(specs)) if len(specs) == 1 and isinstance(next(iter(specs)), str) else ""

    def image_list(self) -> list[Any]:
        """One image (PIL, spec or None) per prompt."""
        return list(self.images) if self.images is not None else [r.image for r in self.prompts.records]


def evaluate_model(lm: Any, sets: Sequence[EvalSet], *, checkpoint: str = "model", judge: Any = "default",
                   threshold: float = 0.0, openings: Sequence[str] | None = None, max_new_tokens: int = 64,
                   batch_size: int = 16, seed: int = 0, cache: bool | str | Path = True, precision: str = "fp32",
                   progress: bool = False, gate: Any = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate one loaded model on every set; return (generations, tidy rows), both in the order of `sets`.

    `judge`: a judge name or `Judge` for generated answers, or one of `LOGIT_JUDGES` (refused ⇔ the prompt's
    log-odds refusal score > `threshold`, scoring `openings`). The generations frame has `GENERATION_COLUMNS` plus
    `metric` and `correct` (accuracy sets); `image` is each prompt's spec (the set's label for in-memory images).
    Generation settings (`max_new_tokens`, `batch_size`, `seed`, `cache`, `precision`) go to `generate`;
    `precision` (`fp32`, `bf16` = autocast, `auto`) is also that of the logit judge's and `answer_loglik`'s forwards.
    `gate`: the `vlsafe.probes.gated.Gate` of a gated remedy the model runs under; the generations frame then
    gains `gate_fired` (whether the gate's condition fired on each prompt).
    """
    if not sets:
        raise VlsafeError(f"{checkpoint}: no prompt sets to evaluate")
    scorer = _scorer(lm, judge, threshold, openings, batch_size, progress, precision)
    gen_kw = dict(batch_size=batch_size, seed=seed, cache=cache, progress=progress, precision=precision)
    frames, rows = [], []
    for es in sets:
        if es.metric == "answer_loglik":
            rows.append(_loglik_row(lm, es, checkpoint, batch_size, progress, precision))
            continue
        frame, mode = _outcomes(lm, es, scorer, {**gen_kw, "max_new_tokens": es.max_new_tokens or max_new_tokens})
        frame.insert(0, "checkpoint", checkpoint)
        if gate is not None:  # right after the set's forwards: decisions are looked up by prompt tokens
            frame["gate_fired"] = gate.fired_for(es.prompts, images=es.images)
        frames.append(frame)
        rows.append(_rows(frame, es, checkpoint, mode, getattr(scorer, "calibration", None)))
    empty = pd.DataFrame(columns=[*GENERATION_COLUMNS, "metric", "correct"])
    gens = pd.concat(frames, ignore_index=True) if frames else empty
    table = pd.concat(rows, ignore_index=True)
    return gens, table.astype({"n": "Int64", "k": "Int64"})


def rejudge(generations: pd.DataFrame, sets: Sequence[EvalSet], *, checkpoint: str = "model",
            judge: Any = "default") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Judge stored generations again — with another judge, or a retrained one — without a model: what
    `evaluate_model(lm, sets, judge=judge)` returns had `lm` generated `generations["response"]`.

    `generations` holds one row per prompt of every set in `sets`, in their order (e.g. the generations frame of
    an earlier `evaluate_model` call, or a `generations.jsonl` read back); its `prompt` column, when present, must
    match the sets' prompts (a one-line error names the set and row otherwise). Accuracy sets are re-checked with
    their `check`; `answer_loglik` sets and the logit judges (no responses to judge) are refused.
    """
    scorer = _response_scorer(judge)
    sizes = [len(es.prompts.records) for es in sets]
    if len(generations) != sum(sizes):
        raise VlsafeError(f"{checkpoint}: {len(generations)} stored generations for {sum(sizes)} prompts "
                          f"in {len(sets)} sets")
    frames, rows, start = [], [], 0
    for es, n in zip(sets, sizes):
        if es.metric == "answer_loglik":
            raise VlsafeError(f"{checkpoint}: set {es.prompts.name} scores reference answers; nothing to re-judge")
        part = generations.iloc[start:start + n]
        _same_prompts(part, es, checkpoint, start)
        frame = _frame(es, scorer, [str(r) for r in part["response"].fillna("")], "generate")
        frame.insert(0, "checkpoint", checkpoint)
        frames.append(frame)
        rows.append(_rows(frame, es, checkpoint, "generate", getattr(scorer, "calibration", None)))
        start += n
    table = pd.concat(rows, ignore_index=True)
    return pd.concat(frames, ignore_index=True), table.astype({"n": "Int64", "k": "Int64"})


def _response_scorer(judge: Any) -> Any:
    """A judge of stored responses (a name or a judge object); the logit judges, which score prompts with a model,
    are refused."""
    from vlsafe.probes.behavior.logit_judge import LogitJudge

    if (isinstance(judge, str) and judge in LOGIT_JUDGES) or isinstance(judge, LogitJudge):
        raise VlsafeError(f"rejudge: the logit judge {getattr(judge, 'name', judge)!r} scores a model, not stored "
                          "responses")
    return _scorer(None, judge, 0.0, None, 1, False)


def _same_prompts(part: pd.DataFrame, es: EvalSet, checkpoint: str, start: int) -> None:
    if "prompt" not in part.columns:
        return
    for i, (stored, r) in enumerate(zip(part["prompt"], es.prompts.records)):
        if stored != r.prompt:
            raise VlsafeError(f"{checkpoint}: stored generation {start + i} (set {es.prompts.name}, prompt {r.id}) "
                              f"is for another prompt: {str(stored)[:60]!r}")


def _scorer(lm: Any, judge: Any, threshold: float, openings: Sequence[str] | None, batch_size: int,
            progress: bool, precision: str = "fp32") -> Any:
    if isinstance(judge, str) and judge in LOGIT_JUDGES:
        from vlsafe.probes.behavior.logit_judge import LogitJudge

        kind = "first_token" if judge == "logit-first_token" else "opening"
        return LogitJudge(lm, threshold=threshold, kind=kind, openings=openings, batch_size=batch_size,
                          progress=progress, precision=precision)
    from vlsafe.probes.behavior.judges import get_judge

    return get_judge(judge) if isinstance(judge, str) else judge


def _outcomes(lm: Any, es: EvalSet, scorer: Any, gen_kw: dict[str, Any]) -> tuple[pd.DataFrame, str]:
    """Per-prompt outcomes of one set (without `checkpoint`) and the mode (`generate` or `logit`)."""
    from vlsafe.probes.behavior.logit_judge import LogitJudge

    mode = "logit" if isinstance(scorer, LogitJudge) and es.metric != "accuracy" else "generate"
    if mode == "logit":
        responses = [""] * len(es.prompts.records)
    else:
        from vlsafe.probes.behavior.generate import generate

        responses = generate(lm, es.prompts, images=es.images, **gen_kw)
    return _frame(es, scorer, responses, mode), mode


def _frame(es: EvalSet, scorer: Any, responses: list[str], mode: str) -> pd.DataFrame:
    """The per-prompt outcomes of one set (without `checkpoint`) given its responses (empty in logit mode)."""
    records, images = es.prompts.records, es.image_list()
    refused, scores, correct, name = _judged(es, scorer, responses, images, mode)
    label = es.label or None
    rows = [{"prompt_set": es.prompts.name, "id": r.id, "category": r.category, "label": r.label, "prompt": r.prompt,
             "image": im if im is None or isinstance(im, str) else label, "response": resp, "refused": ref,
             "judge_score": score, "judge": name, "metric": es.metric, "correct": ok}
            for r, im, resp, ref, score, ok in zip(records, images, responses, refused, scores, correct)]
    return pd.DataFrame(rows)


def _judged(es: EvalSet, scorer: Any, responses: list[str], images: list[Any], mode: str
            ) -> tuple[list[Any], list[Any], list[Any], str]:
    """(refused 0/1, judge score, correct, judge name) per prompt; accuracy sets are checked, not judged."""
    n = len(responses)
    if es.check is not None:
        return [None] * n, [None] * n, [bool(es.check(i, r)) for i, r in enumerate(responses)], es.check_name
    if mode == "logit":
        verdicts = scorer.judge(None, es.prompts.prompts, images=images)
    else:
        verdicts = scorer.judge(responses, es.prompts.prompts)
    return [int(bool(v.refused)) for v in verdicts], [float(v.score) for v in verdicts], [None] * n, scorer.name


def _rows(frame: pd.DataFrame, es: EvalSet, checkpoint: str, mode: str, calibration: Any) -> pd.DataFrame:
    from vlsafe.probes.behavior.calibration import corrected_columns
    from vlsafe.probes.behavior.metrics import rate_rows

    if es.metric == "accuracy":
        hit = frame["correct"].astype(int)
    elif es.metric == "compliance":
        hit = 1 - frame["refused"].astype(int)
    else:
        hit = frame["refused"].astype(int)
    rows = rate_rows(frame.assign(_hit=hit), "_hit", checkpoint=checkpoint, prompt_set=es.prompts.name,
                     metric=es.metric, judge=str(frame["judge"].iloc[0]), image=es.label, mode=mode)
    return corrected_columns(rows, None if es.check is not None else calibration)


def _loglik_row(lm: Any, es: EvalSet, checkpoint: str, batch_size: int, progress: bool,
                precision: str) -> pd.DataFrame:
    from vlsafe.analysis.placement import compute_precision, input_device
    from vlsafe.probes.behavior.helpfulness import answer_loglik
    from vlsafe.probes.behavior.metrics import mean_row

    with compute_precision(precision, input_device(lm.model)):
        vals = answer_loglik(lm, es.prompts, list(es.references or []), images=es.images, batch_size=batch_size,
                             progress=progress)
    return mean_row(vals, checkpoint=checkpoint, prompt_set=es.prompts.name, metric=es.metric,
                    judge="reference answers", image=es.label, mode="loglik")


# ----------------------------------------------------------------------------------------------------- vlsafe eval

def evaluate(checkpoints: dict[str, Any], prompt_sets: Sequence[str], *, judge: str = "default",
             max_new_tokens: int = 64, batch_size: int = 16, limit: int | None = None,
             out_dir: str | os.PathLike | None = None, seed: int = 0, dtype: str = "float32",
             cache: bool | str | Path = True, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generate and judge every (checkpoint, prompt set); return (generations_df, summary_df).

    `checkpoints` maps a label to a spec (HF dir, file, hub id, `default`), an opened `Checkpoint`, or a
    `LoadedModel` (used as is, e.g. with weights edited in memory; the generation cache sees the edit);
    `prompt_sets` are set specs for `load_prompts` (e.g. `harmful-test`, `harmless-test+blank`, a file);
    `judge` is a judge name (`default`, `substring-rd`, `classifier:ID`, …) or `logit`/`logit-first_token`.
    The summary is the `summary.csv` view (`vlsafe.probes.behavior.metrics.eval_summary`) of `evaluate_model`'s
    refusal-rate rows; with `out_dir` the tidy rows themselves are written as `metrics.csv` (the schema every
    evaluation shares: checkpoint, prompt_set, image, metric, n, k, rate, ci_low, ci_high, judge, …).
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
    scorer = judge if judge in LOGIT_JUDGES else _scorer(None, judge, 0.0, None, batch_size, progress)
    gens, rows = [], []
    for label, ckpt in ckpts.items():
        lm = loaded.get(label) or ckpt.load_model(dtype=dtype)
        g, r = evaluate_model(lm, [EvalSet(ps) for ps in sets], checkpoint=label, judge=scorer,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, cache=cache,
                              progress=progress)
        gens.append(g)
        rows.append(r)
        del lm
    config = {"checkpoints": {lb: c.spec for lb, c in ckpts.items()}, "prompt_sets": list(prompt_sets),
              "judge": judge, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "limit": limit,
              "dtype": dtype, "seed": seed, "prompt_set_hashes": {ps.name: ps.content_hash() for ps in sets}}
    return _finish(gens, rows, scorer, out_dir, config, ckpts)


def _finish(gens: list[pd.DataFrame], rows: list[pd.DataFrame], scorer: Any, out_dir: str | os.PathLike | None,
            config: dict[str, Any], ckpts: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(generations, summary) of an evaluation's per-checkpoint frames and rows; with `out_dir`, its files (the
    judge's name and calibration added to `config`)."""
    from vlsafe.probes.behavior.metrics import eval_summary

    generations = pd.concat(gens, ignore_index=True)[list(GENERATION_COLUMNS)]
    metrics = pd.concat(rows, ignore_index=True)
    summary = eval_summary(metrics)
    if out_dir is not None:
        from vlsafe.probes.behavior.eval_outputs import write_outputs

        config = {**config, "judge_name": str(generations["judge"].iloc[0]),
                  "judge_calibration": _calibration_record(scorer)}
        write_outputs(Path(out_dir), generations, summary, config, ckpts, config.get("seed", 0), metrics=metrics)
    return generations, summary


def rejudge_run(run_dir: str | os.PathLike, *, judge: str = "default", out_dir: str | os.PathLike
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Judge a `vlsafe eval` run's stored responses again (`judge`) and write a complete eval run to `out_dir`
    (it may be `run_dir`): the same files, with the new labels, rates and intervals. No model is loaded, so the
    checkpoints need not exist any more; the prompt sets are loaded again and must still hold the prompts the
    responses answer. Returns (generations_df, summary_df) like `evaluate`."""
    from vlsafe.probes.behavior.eval_outputs import read_run

    scorer = _response_scorer(judge)
    config, stored, checkpoints = read_run(Path(run_dir))
    sets = _load_sets(config["prompt_sets"], config.get("limit"))
    for ps in sets:
        if config.get("prompt_set_hashes", {}).get(ps.name) not in (None, ps.content_hash()):
            raise VlsafeError(f"{run_dir}: prompt set {ps.name} changed since the run; its stored responses answer "
                              "other prompts")
    gens, rows = [], []
    for label in dict.fromkeys(stored["checkpoint"]):  # the run's order (run.json sorts its keys)
        g, r = rejudge(stored[stored["checkpoint"] == label].reset_index(drop=True),
                       [EvalSet(ps) for ps in sets], checkpoint=label, judge=scorer)
        gens.append(g)
        rows.append(r)
    before = {"run": str(run_dir), "judge": config.get("judge"), "judge_name": config.get("judge_name")}
    return _finish(gens, rows, scorer, out_dir, {**config, "judge": judge, "rejudged_from": before}, checkpoints)


def _calibration_record(scorer: Any) -> dict[str, Any] | None:
    cal = getattr(scorer, "calibration", None)
    return cal.to_dict() if cal is not None else None


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
        sets.append(replace(ps, name=str(spec)))
    names = [ps.name for ps in sets]
    if len(set(names)) != len(names):
        raise VlsafeError(f"eval: prompt set given twice ({', '.join(n for n in names if names.count(n) > 1)})")
    return sets


def _check_images(ckpts: dict[str, Any], sets: list[Any]) -> None:
    for ps in sets:
        first = next((r for r in ps.records if r.image is not None), None)
        if first is None:
            continue
        for ck in ckpts.values():
            if not ck.family.is_lvlm:
                raise VlsafeError(f"{ck.spec}: text-only model ({ck.family.name}) cannot take the image prompt set "
                                  f"{ps.name!r} (record {first.id} has image {first.image!r}); "
                                  "use a text set or a vision-language checkpoint")
