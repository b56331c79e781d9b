"""Sweep evaluation: one checkpoint → safety, over-refusal and helpfulness with intervals; the Pareto table and
figure.

Every point goes through the one evaluation, `vlsafe.probes.behavior.evaluate.evaluate_model`:

- `mode: fast` — the logit refusal score (`vlsafe.probes.behavior.logit_judge.LogitJudge`, one forward pass per
  prompt, no generation): a prompt counts as refused when its log-odds score is > `threshold`.
- `mode: full` — greedy generation (`vlsafe.probes.behavior.generate`) judged by a refusal judge
  (`vlsafe.probes.behavior.judges.get_judge`): the numbers to report.
- `mode: two-stage` — every point is screened in fast mode (settings under `screen:`; a screening score only,
  never a number to report), then the points on or near the screened front (`keep: {margin, max_points}`: at
  most `max_points` of them, ranked by Pareto layer; see `vlsafe.experiments.sweep_stages`) and every `checkpoint`
  reference get the full evaluation. Each stage is cached per point under its own eval key (`stage_config`, which
  drops `screen` and `keep`), so a `fast` sweep with the same settings, a rerun, a resumed run or a rerun with
  another `keep` reuses it.

`precision` (`fp32`, `bf16`, `auto`) is the forward math of both stages (`vlsafe.analysis.placement.compute_precision`:
bf16 = autocast, weights stay fp32; faster on CPUs with native bf16; scores and greedy answers can differ slightly from
fp32); it enters the eval key only when not `fp32`, so the caches of fp32 sweeps stay valid.

safety = refusal rate on the harmful set; safety_image = refusal rate on `harmful_image` (the harmful prompts with an
image, e.g. `harmful-val+blank`; optional; NaN for a model that takes no images); over_refusal = refusal rate on the
borderline (safe-but-edgy) set;
helpfulness = compliance (1 − refusal) on the harmless set, or with `helpfulness: loglik` the mean per-token
log-likelihood of reference answers (`vlsafe.probes.behavior.helpfulness.answer_loglik`, references = the greedy
answers of `eval.reference`). Rates carry Wilson 95 % intervals; log-likelihoods a normal 95 % interval. With a
calibrated judge (full mode, e.g. the default judge) each rate channel also gets `{channel}_corrected` and its
`_corrected_low/_high` interval (Rogan–Gladen, judge error included; `vlsafe.probes.behavior.calibration`), and
the sweep's `run.json` records that judge's calibration (`judge_calibration`, see `judge_calibration`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vlsafe.analysis.errors import VlsafeError

CHANNELS = {"safety": "harmful", "over_refusal": "borderline", "helpfulness": "harmless"}
IMAGE_CHANNEL = ("safety_image", "harmful_image")
MODES = ("fast", "full", "two-stage")


class ScreenSettings(BaseModel):
    """Stage 1 of `mode: two-stage`: the fast logit refusal score (unset keys take the eval's own)."""

    model_config = ConfigDict(extra="forbid")
    score_kind: Literal["opening", "first_token"] | None = None
    threshold: float | None = None
    openings: list[str] | None = None
    limit: int | None = None


class KeepSettings(BaseModel):
    """Which screened points get the full evaluation: those no point beats by more than `margin` in both safety
    and helpfulness (screened numbers; see `vlsafe.experiments.sweep_stages.keep_near_front`), and of those at
    most `max_points` (None: no cap), the first by Pareto layer (`vlsafe.experiments.sweep_stages.cap_ranks`).
    `checkpoint` references are always evaluated in full and do not count toward `max_points`."""

    model_config = ConfigDict(extra="forbid")
    margin: float = Field(0.05, ge=0)
    max_points: int | None = Field(None, ge=1)

    @field_validator("max_points", mode="before")
    @classmethod
    def _whole(cls, v: Any) -> Any:
        if isinstance(v, bool):  # pydantic would read true as 1
            raise ValueError(f"must be a whole number of points (at least 1), got {v}")
        return v


class EvalConfig(BaseModel):
    """How each sweep point is evaluated."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["fast", "full", "two-stage"] = "fast"
    harmful: str = "harmful-val"
    harmful_image: str | None = None  # e.g. harmful-val+blank: safety_image (LVLMs only)
    borderline: str = "borderline-val"
    harmless: str = "harmless-val"
    limit: int | None = Field(32, ge=1)  # prompts per set
    score_kind: Literal["opening", "first_token"] = "opening"
    threshold: float = 0.0
    openings: list[str] | None = None  # fast mode: refusal openings to score (default: vlsafe.probes.scores' stock list)
    judge: str = "default"
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(8, ge=1)
    helpfulness: Literal["compliance", "loglik"] = "compliance"
    reference: str | None = None
    # both stages' forwards (logit score, generation, answer log-lik.): bf16 = under bf16 autocast, weights stay fp32
    # (faster on CPUs with AVX512-BF16/AMX; greedy outputs and scores can differ slightly from fp32); auto = bf16
    # where the CPU has native bf16, resolved when the config loads (`vlsafe.analysis.placement.resolve_precision`)
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    screen: ScreenSettings | None = None  # two-stage only
    keep: KeepSettings | None = None      # two-stage only

    @model_validator(mode="after")
    def _stages(self) -> "EvalConfig":
        if self.mode != "two-stage" and (self.screen is not None or self.keep is not None):
            raise ValueError(f"screen/keep belong to mode 'two-stage' (mode is '{self.mode}')")
        if self.screen is not None and self.screen.limit is not None and self.screen.limit < 1:
            raise ValueError(f"screen.limit must be at least 1, got {self.screen.limit}")
        from vlsafe.analysis.placement import resolve_precision

        self.precision = resolve_precision(self.precision)  # type: ignore[assignment]  # the key sees the result
        return self

    def key(self, *, fingerprint: bool = True) -> str:
        """A short hash of everything that changes the numbers (the eval cache key of a point), the judge's
        version included (`vlsafe.probes.behavior.judges.judge_fingerprint`; `fingerprint=False` leaves it out: the
        key caches written before versions were keyed had). Optional settings left unset are not hashed, so caches
        written before they existed stay valid."""
        import hashlib

        from vlsafe.probes.behavior.judges import keyed_fingerprint

        d = self.model_dump()
        d = {k: v for k, v in d.items() if not (k in ("harmful_image", "screen", "keep") and v is None)}
        if d["precision"] == "fp32":
            del d["precision"]
        if fingerprint and self.mode != "fast" and (fp := keyed_fingerprint(self.judge)) is not None:
            d["judge_fingerprint"] = fp    # a retrained judge re-judges (fast mode uses the logit score, not it)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]

    def generation_key(self) -> str:
        """The key without the judge: equal for full evaluations whose generations are the same whichever judge
        labels them (`rejudge_point` judges them again instead of generating)."""
        return self.model_copy(update={"judge": ""}).key(fingerprint=False)

    def stage_config(self, stage: Literal["screen", "full"]) -> "EvalConfig":
        """The single-mode config of a two-stage evaluation's `stage` (itself for fast/full configs)."""
        if self.mode != "two-stage":
            return self
        base = self.model_copy(update={"screen": None, "keep": None})
        if stage == "full":
            return base.model_copy(update={"mode": "full"})
        sc = self.screen or ScreenSettings()
        given = {k: v for k, v in sc.model_dump().items() if v is not None}
        return base.model_copy(update={"mode": "fast", **given})


def _prompt_set(spec: str, limit: int | None) -> Any:
    from vlsafe.probes.behavior.datasets import load_prompts

    ps = load_prompts(spec, limit=limit)
    if len(ps) == 0:
        raise VlsafeError(f"eval set '{spec}' is empty")
    return ps


def reference_answers(cfg: EvalConfig) -> list[str] | None:
    """Greedy answers of `cfg.reference` to the harmless set (cached by the generation cache)."""
    if cfg.helpfulness != "loglik":
        return None
    if cfg.reference is None:
        raise VlsafeError("eval.helpfulness 'loglik' needs eval.reference (the checkpoint whose answers are scored)")
    from vlsafe.probes.behavior.helpfulness import reference_answers as answers
    from vlsafe.probes.models import load

    return answers(load(cfg.reference), _prompt_set(cfg.harmless, cfg.limit), max_new_tokens=cfg.max_new_tokens,
                   batch_size=cfg.batch_size, progress=False)


def eval_sets(cfg: EvalConfig, refs: list[str] | None = None, *, images: bool = False) -> list[Any]:
    """The `EvalSet`s of a point, in `CHANNELS` order: harmful (refusal rate), borderline (over-refusal),
    harmless (compliance, or with `helpfulness: loglik` the log-likelihood of `refs`); with `images` and
    `cfg.harmful_image`, the image harmful set last."""
    from vlsafe.probes.behavior.evaluate import EvalSet

    loglik = cfg.helpfulness == "loglik"
    sets = [EvalSet(_prompt_set(cfg.harmful, cfg.limit)),
            EvalSet(_prompt_set(cfg.borderline, cfg.limit), metric="over_refusal"),
            EvalSet(_prompt_set(cfg.harmless, cfg.limit), metric="answer_loglik" if loglik else "compliance",
                    references=(refs or []) if loglik else None)]
    if images and cfg.harmful_image:
        sets.append(EvalSet(_prompt_set(cfg.harmful_image, cfg.limit)))
    return sets


def check_image_set(cfg: EvalConfig) -> None:
    """A `harmful_image` set whose prompts carry no image is a mistake (one-line error naming the set)."""
    if cfg.harmful_image and not any(r.image is not None for r in _prompt_set(cfg.harmful_image, cfg.limit).records):
        raise VlsafeError(f"eval.harmful_image '{cfg.harmful_image}' has no image prompts (add +blank or +scene)")


def evaluate_loaded(lm: Any, cfg: EvalConfig, refs: list[str] | None = None, *, checkpoint: str = "point",
                    gate: Any = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(generations, tidy rows) of `vlsafe.probes.behavior.evaluate.evaluate_model` on the point's sets (the image
    harmful set only for a model that takes images): the logit judge `logit-<score_kind>` at `threshold` in fast
    mode, generation judged by `judge` in full mode, every forward at `cfg.precision`. `gate` (a gated remedy's
    `Gate`) adds `gate_fired`."""
    from vlsafe.probes.behavior.evaluate import evaluate_model
    from vlsafe.probes.models import is_lvlm

    if cfg.mode == "two-stage":
        raise VlsafeError("evaluate_loaded: give one stage's config (EvalConfig.stage_config)")
    judge = f"logit-{cfg.score_kind}" if cfg.mode == "fast" else cfg.judge
    sets = eval_sets(cfg, refs, images=bool(cfg.harmful_image) and is_lvlm(lm))
    return evaluate_model(lm, sets, checkpoint=checkpoint, judge=judge, threshold=cfg.threshold,
                          openings=cfg.openings, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                          gate=gate, precision=cfg.precision)


def _write_generations(gens: pd.DataFrame, out_dir: Path) -> None:
    cols = ["prompt_set", "id", "prompt", "image", "response", "refused", "judge_score"]
    cols += ["gate_fired"] if "gate_fired" in gens.columns else []
    with (out_dir / "generations.jsonl").open("a") as fh:
        fh.writelines(json.dumps({c: _plain(row[c]) for c in cols}) + "\n" for _, row in gens.iterrows())


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def evaluate_point(spec: str, cfg: EvalConfig, refs: list[str] | None = None,
                   out_dir: Path | None = None, *, under: Callable[[Any], Any] | None = None,
                   build: Callable[[], Any] | None = None) -> dict[str, Any]:
    """`{safety, safety_ci_low, …, over_refusal…, helpfulness…, n_*}` for checkpoint `spec` (the overall rows of
    `evaluate_loaded`); with `cfg.harmful_image`, `safety_image…` too (NaN and `n_harmful_image = 0` for a model
    that takes no images). In full mode the judged generations are appended to `out_dir/generations.jsonl`.
    `under(lm)`, when given, returns a context manager the evaluation runs inside (an activation-level remedy); when
    it yields a gate (a gated remedy), `fired_<set>` is the share of each set's prompts on which it fired.
    `build()`, when given, returns the model to evaluate instead of loading `spec` (a merge applied in memory,
    `vlsafe.analysis.merging.load_merged`); `spec` then only labels it."""
    from vlsafe.probes.models import load

    lm = build() if build is not None else load(spec)
    with under(lm) if under is not None else contextlib.nullcontext() as gate:
        gens, rows = evaluate_loaded(lm, cfg, refs, checkpoint=spec, gate=gate)
    del lm
    if out_dir is not None and cfg.mode == "full" and len(gens):
        _write_generations(gens, out_dir)
    return _point_metrics(gens, rows, cfg)


def can_rejudge(cfg: EvalConfig) -> bool:
    """Whether a point's stored generations hold everything `cfg`'s numbers need (full mode, compliance
    helpfulness; answer log-likelihoods are not stored)."""
    return cfg.mode == "full" and cfg.helpfulness == "compliance"


def rejudge_point(stored: pd.DataFrame, cfg: EvalConfig, *, checkpoint: str = "point",
                  out_dir: Path | None = None) -> dict[str, Any]:
    """`evaluate_point`'s metrics from a point's stored generations (`generations.jsonl` of an earlier full
    evaluation with the same `generation_key`), judged again by `cfg.judge`
    (`vlsafe.probes.behavior.evaluate.rejudge`); a gated remedy's `gate_fired` is kept. With `out_dir`, the newly
    judged generations are written there."""
    from vlsafe.probes.behavior.evaluate import rejudge

    if not can_rejudge(cfg):
        raise VlsafeError(f"{checkpoint}: only full evaluations with compliance helpfulness can be re-judged")
    images = bool(cfg.harmful_image) and bool(
        (stored["prompt_set"] == _prompt_set(cfg.harmful_image, cfg.limit).name).any())
    gens, rows = rejudge(stored, eval_sets(cfg, images=images), checkpoint=checkpoint, judge=cfg.judge)
    if "gate_fired" in stored.columns:
        gens["gate_fired"] = stored["gate_fired"].to_numpy()
    if out_dir is not None and len(gens):
        _write_generations(gens, out_dir)
    return _point_metrics(gens, rows, cfg)


def _point_metrics(gens: pd.DataFrame, rows: pd.DataFrame, cfg: EvalConfig) -> dict[str, Any]:
    """The metrics dict of a point from its generations and tidy rows."""
    overall = rows[rows["category"] == ""].reset_index(drop=True)
    out: dict[str, Any] = {"eval_mode": cfg.mode}
    channels = list(CHANNELS.items()) + ([IMAGE_CHANNEL] if cfg.harmful_image else [])
    if "gate_fired" in gens.columns:
        names = [cfg.harmful, cfg.borderline, cfg.harmless] + ([cfg.harmful_image] if cfg.harmful_image else [])
        fired = gens.groupby("prompt_set")["gate_fired"].mean()
        out.update({f"fired_{which}": float(fired.get(_prompt_set(n, cfg.limit).name, np.nan))
                    for (_, which), n in zip(channels, names)})
    for i, (channel, which) in enumerate(channels):
        if i >= len(overall):  # the image set of a text-only model
            out.update({channel: np.nan, f"{channel}_ci_low": np.nan, f"{channel}_ci_high": np.nan,
                        f"n_{which}": 0})
            continue
        r = overall.iloc[i]
        out.update({channel: float(r.rate), f"{channel}_ci_low": float(r.ci_low),
                    f"{channel}_ci_high": float(r.ci_high), f"n_{which}": int(r.n)})
        out.update(_corrected(channel, r.to_dict()))
    return out


def _corrected(channel: str, row: dict[str, Any]) -> dict[str, float]:
    """`{channel}_corrected, …_corrected_low, …_corrected_high` of a tidy row judged by a calibrated judge."""
    est = row.get("rate_corrected", np.nan)
    if est is None or np.isnan(est):
        return {}
    return {f"{channel}_corrected": float(est), f"{channel}_corrected_low": float(row["corrected_low"]),
            f"{channel}_corrected_high": float(row["corrected_high"])}


def judge_calibration(cfg: EvalConfig, table: pd.DataFrame) -> dict[str, Any] | None:
    """The calibration record (`JudgeCalibration.to_dict`: judge, counts, sensitivity, specificity, source) behind
    the table's `*_corrected` columns: that of the full-stage judge `cfg.judge`, the only one that corrects. None when
    no row has a corrected number (fast mode, an uncalibrated judge), so the judge is built only when it carries a
    calibration."""
    cols = [c for c in table.columns if c.endswith("_corrected")]
    if cfg.mode == "fast" or not cols or table[cols].isna().all().all():
        return None
    from vlsafe.probes.behavior.judges import get_judge

    cal = get_judge(cfg.judge).calibration
    return cal.to_dict() if cal is not None else None


# ---- Pareto ----------------------------------------------------------------------------------------------------
FRONTS = {"is_pareto": "safety", "is_pareto_image": "safety_image"}  # front column → the safety it uses


def _on_front(df: pd.DataFrame, safety: str) -> pd.Series:
    """True for rows not dominated in (`safety` ↑, helpfulness ↑) among the rows with numbers; when some rows have
    full-stage numbers, among those only."""
    from vlsafe.experiments.report.plots import pareto_front

    ok = df[safety].notna() & df["helpfulness"].notna()
    if "stage" in df.columns and (df["stage"] == "full").any():
        ok &= df["stage"] == "full"
    pool = df[ok].assign(safety=df.loc[ok, safety])
    front = pareto_front(pool) if len(pool) else pool
    return pd.Series(df.index.isin(front.index), index=df.index)


def mark_pareto(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with `is_pareto`: not dominated in (safety ↑, helpfulness ↑)
    (`vlsafe.experiments.report.plots.pareto_front`), and `is_pareto_image` likewise with `safety_image` when that column exists. When a `stage` column has `full`
    points, only they compete (screened numbers are not comparable with judged ones)."""
    df = df.reset_index(drop=True)
    for col, safety in FRONTS.items():
        if safety in df.columns:
            df[col] = _on_front(df, safety).to_numpy() if len(df) else []
    return df


def pareto_figures(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """`out_dir/pareto.{png,pdf}` (and `pareto_image.{png,pdf}` when the table has an image front) — the report's
    remedies figure (`vlsafe.experiments.report.plots_pareto.pareto`: points numbered, families by colour and
    marker, the front joined, 95 % intervals, screened-only points hollow) — and `pareto_key.csv`, the table that
    names the numbers."""
    from vlsafe.analysis.figures import save_figure
    from vlsafe.analysis.runinfo import write_csv
    from vlsafe.experiments.report.plots_pareto import pareto, pareto_key

    paths: list[Path] = []
    for safety, name in (("safety", "pareto"), ("safety_image", "pareto_image")):
        fig = pareto(df, safety=safety) if safety in df.columns else None
        if fig is not None:
            paths += save_figure(fig, out_dir, name)
    if paths:
        paths.append(write_csv(Path(out_dir) / "pareto_key.csv", pareto_key(df)))
    return paths
