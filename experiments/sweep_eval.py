"""Sweep evaluation: one checkpoint → safety, over-refusal and helpfulness with intervals; the Pareto table and
figure.

Every point goes through the one evaluation, `vlsafe.probes.behavior.evaluate.evaluate_model`:

- `mode: fast` — the logit refusal score (`vlsafe.probes.behavior.logit_judge.LogitJudge`, one forward pass per
  prompt, no generation): a prompt counts as refused when its log-odds score is > `threshold`.
- `mode: full` — greedy generation (`vlsafe.probes.behavior.generate`) judged by a refusal judge
  (`vlsafe.probes.behavior.judges.get_judge`): the numbers to report.

safety = refusal rate on the harmful set; over_refusal = refusal rate on the borderline (safe-but-edgy) set;
helpfulness = compliance (1 − refusal) on the harmless set, or with `helpfulness: loglik` the mean per-token
log-likelihood of reference answers (`vlsafe.probes.behavior.helpfulness.answer_loglik`, references = the greedy
answers of `eval.reference`). Rates carry Wilson 95 % intervals; log-likelihoods a normal 95 % interval. With a
calibrated judge (full mode, e.g. the default judge) each rate channel also gets `{channel}_corrected` and its
`_corrected_low/_high` interval (Rogan–Gladen, judge error included; `vlsafe.probes.behavior.calibration`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from vlsafe.analysis.errors import VlsafeError

CHANNELS = {"safety": "harmful", "over_refusal": "borderline", "helpfulness": "harmless"}


class EvalConfig(BaseModel):
    """How each sweep point is evaluated."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["fast", "full"] = "fast"
    harmful: str = "harmful-val"
    borderline: str = "borderline-val"
    harmless: str = "harmless-val"
    limit: int | None = 32
    score_kind: Literal["opening", "first_token"] = "opening"
    threshold: float = 0.0
    openings: list[str] | None = None  # fast mode: refusal openings to score (default: vlsafe.probes.scores' stock list)
    judge: str = "default"
    max_new_tokens: int = 32
    batch_size: int = 8
    helpfulness: Literal["compliance", "loglik"] = "compliance"
    reference: str | None = None

    def key(self) -> str:
        """A short hash of everything that changes the numbers (the eval cache key of a point)."""
        import hashlib

        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:10]


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


def eval_sets(cfg: EvalConfig, refs: list[str] | None = None) -> list[Any]:
    """The three `EvalSet`s of a point, in `CHANNELS` order: harmful (refusal rate), borderline (over-refusal),
    harmless (compliance, or with `helpfulness: loglik` the log-likelihood of `refs`)."""
    from vlsafe.probes.behavior.evaluate import EvalSet

    loglik = cfg.helpfulness == "loglik"
    return [EvalSet(_prompt_set(cfg.harmful, cfg.limit)),
            EvalSet(_prompt_set(cfg.borderline, cfg.limit), metric="over_refusal"),
            EvalSet(_prompt_set(cfg.harmless, cfg.limit), metric="answer_loglik" if loglik else "compliance",
                    references=(refs or []) if loglik else None)]


def evaluate_loaded(lm: Any, cfg: EvalConfig, refs: list[str] | None = None, *, checkpoint: str = "point"
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(generations, tidy rows) of `vlsafe.probes.behavior.evaluate.evaluate_model` on the point's three sets:
    the logit judge `logit-<score_kind>` at `threshold` in fast mode, generation judged by `judge` in full mode."""
    from vlsafe.probes.behavior.evaluate import evaluate_model

    judge = f"logit-{cfg.score_kind}" if cfg.mode == "fast" else cfg.judge
    return evaluate_model(lm, eval_sets(cfg, refs), checkpoint=checkpoint, judge=judge, threshold=cfg.threshold,
                          openings=cfg.openings, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)


def _write_generations(gens: pd.DataFrame, out_dir: Path) -> None:
    cols = ["prompt_set", "id", "prompt", "image", "response", "refused", "judge_score"]
    with (out_dir / "generations.jsonl").open("a") as fh:
        fh.writelines(json.dumps({c: _plain(row[c]) for c in cols}) + "\n" for _, row in gens.iterrows())


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def evaluate_point(spec: str, cfg: EvalConfig, refs: list[str] | None = None,
                   out_dir: Path | None = None) -> dict[str, Any]:
    """`{safety, safety_ci_low, …, over_refusal…, helpfulness…, n_*}` for checkpoint `spec` (the overall rows of
    `evaluate_loaded`); in full mode the judged generations are appended to `out_dir/generations.jsonl`."""
    from vlsafe.probes.models import load

    lm = load(spec)
    gens, rows = evaluate_loaded(lm, cfg, refs, checkpoint=spec)
    del lm
    if out_dir is not None and cfg.mode == "full" and len(gens):
        _write_generations(gens, out_dir)
    overall = rows[rows["category"] == ""].reset_index(drop=True)
    out: dict[str, Any] = {"eval_mode": cfg.mode}
    for (channel, which), r in zip(CHANNELS.items(), overall.itertuples()):
        out.update({channel: float(r.rate), f"{channel}_ci_low": float(r.ci_low),
                    f"{channel}_ci_high": float(r.ci_high), f"n_{which}": int(r.n)})
        out.update(_corrected(channel, r._asdict()))
    return out


def _corrected(channel: str, row: dict[str, Any]) -> dict[str, float]:
    """`{channel}_corrected, …_corrected_low, …_corrected_high` of a tidy row judged by a calibrated judge."""
    est = row.get("rate_corrected", np.nan)
    if est is None or np.isnan(est):
        return {}
    return {f"{channel}_corrected": float(est), f"{channel}_corrected_low": float(row["corrected_low"]),
            f"{channel}_corrected_high": float(row["corrected_high"])}


# ---- Pareto ----------------------------------------------------------------------------------------------------
def mark_pareto(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with `is_pareto`: not dominated in (safety ↑, helpfulness ↑) (`vlsafe.experiments.report.plots.pareto_front`)."""
    from vlsafe.experiments.report.plots import pareto_front

    df = df.reset_index(drop=True)
    front = pareto_front(df) if len(df) else df
    return df.assign(is_pareto=df.index.isin(front.index))


def pareto_figure(df: pd.DataFrame, out_dir: str | Path, helpfulness: str = "compliance") -> list[Path]:
    """`out_dir/pareto.{png,pdf}`: safety vs helpfulness with 95 % intervals, over-refusal as colour, front joined."""
    from vlsafe.analysis.figures import new_figure, save_figure

    fig, ax = new_figure("column", height=3.0)
    x, y = df["helpfulness"].to_numpy(float), df["safety"].to_numpy(float)
    xerr = np.abs(np.vstack([x - df["helpfulness_ci_low"], df["helpfulness_ci_high"] - x]))
    yerr = np.abs(np.vstack([y - df["safety_ci_low"], df["safety_ci_high"] - y]))
    ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor="0.7", lw=0.6, zorder=1)
    sc = ax.scatter(x, y, c=df["over_refusal"].to_numpy(float), cmap="viridis", vmin=0, vmax=1, s=18, zorder=3,
                    edgecolors="k", linewidths=0.3)
    front = df[df["is_pareto"]].sort_values("helpfulness")
    ax.plot(front["helpfulness"], front["safety"], color="#D55E00", lw=1.0, zorder=2, label="Pareto front")
    for _, r in df.iterrows():
        ax.annotate(str(r["point"]), (r["helpfulness"], r["safety"]), fontsize=4.5, xytext=(2, 2),
                    textcoords="offset points")
    fig.colorbar(sc, ax=ax, label="over-refusal (borderline)")
    ax.set_xlabel("helpfulness (answer log-lik.)" if helpfulness == "loglik" else "helpfulness (compliance on harmless)")
    ax.set_ylabel("safety (refusal on harmful)")
    ax.legend(loc="lower left", fontsize=5)
    return save_figure(fig, out_dir, "pareto")
