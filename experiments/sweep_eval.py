"""Sweep evaluation: one checkpoint → safety, over-refusal and helpfulness with intervals; the Pareto table and
figure.

- `mode: fast` — the logit refusal score (`vlsafe.probes.behavior.logit_judge.LogitJudge`, one forward pass per
  prompt, no generation): a prompt counts as refused when its log-odds score is > `threshold`.
- `mode: full` — greedy generation (`vlsafe.probes.behavior.generate`) judged by a refusal judge
  (`vlsafe.probes.behavior.judges.get_judge`): the numbers to report.

safety = refusal rate on the harmful set; over_refusal = refusal rate on the borderline (safe-but-edgy) set;
helpfulness = compliance (1 − refusal) on the harmless set, or with `helpfulness: loglik` the mean per-token
log-likelihood of reference answers (`vlsafe.probes.behavior.helpfulness.answer_loglik`, references = the greedy
answers of `eval.reference`). Rates carry Wilson 95 % intervals; log-likelihoods a normal 95 % interval.
"""

from __future__ import annotations

import json
import math
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


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson 95 % score interval for k successes out of n (`vlsafe.probes.behavior.metrics.wilson_interval`)."""
    from vlsafe.probes.behavior.metrics import wilson_interval

    lo, hi = wilson_interval(k, n)
    return float(lo), float(hi)


def _prompt_set(spec: str, limit: int | None) -> Any:
    from vlsafe.probes.behavior.datasets import load_prompts

    ps = load_prompts(spec, limit=limit)
    if len(ps) == 0:
        raise VlsafeError(f"eval set '{spec}' is empty")
    return ps


def _images(ps: Any) -> list[Any] | None:
    specs = [r.image for r in ps.records]
    return None if all(s is None for s in specs) else specs


def _refusals(lm: Any, ps: Any, cfg: EvalConfig, out_dir: Path | None, tag: str) -> list[bool]:
    if cfg.mode == "fast":
        from vlsafe.probes.behavior.logit_judge import LogitJudge

        judge = LogitJudge(lm, threshold=cfg.threshold, kind=cfg.score_kind, openings=cfg.openings,
                           batch_size=cfg.batch_size)
        return [r.refused for r in judge.judge(None, ps.prompts, images=_images(ps))]
    from vlsafe.probes.behavior.generate import generate
    from vlsafe.probes.behavior.judges import get_judge

    responses = generate(lm, ps, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=False)
    results = get_judge(cfg.judge).judge(responses, ps.prompts)
    if out_dir is not None:
        rows = [{"prompt_set": ps.name, "id": r.id, "prompt": r.prompt, "image": r.image, "response": resp,
                 "refused": int(v.refused), "judge_score": v.score}
                for r, resp, v in zip(ps.records, responses, results)]
        with (out_dir / "generations.jsonl").open("a") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
    return [v.refused for v in results]


def _rate(values: list[bool], invert: bool = False) -> dict[str, float]:
    k = sum(bool(v) != invert for v in values)
    lo, hi = wilson(k, len(values))
    return {"value": k / len(values), "ci_low": lo, "ci_high": hi, "n": len(values)}


def reference_answers(cfg: EvalConfig) -> list[str] | None:
    """Greedy answers of `cfg.reference` to the harmless set (cached by the generation cache)."""
    if cfg.helpfulness != "loglik":
        return None
    if cfg.reference is None:
        raise VlsafeError("eval.helpfulness 'loglik' needs eval.reference (the checkpoint whose answers are scored)")
    from vlsafe.probes.behavior.generate import generate
    from vlsafe.probes.models import load

    lm = load(cfg.reference)
    return generate(lm, _prompt_set(cfg.harmless, cfg.limit), max_new_tokens=cfg.max_new_tokens,
                    batch_size=cfg.batch_size, progress=False)


def _loglik(lm: Any, ps: Any, refs: list[str], cfg: EvalConfig) -> dict[str, float]:
    from vlsafe.probes.behavior.helpfulness import answer_loglik

    vals = answer_loglik(lm, ps, refs, batch_size=cfg.batch_size)
    half = 1.96 * float(np.std(vals, ddof=1)) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
    mean = float(np.mean(vals))
    return {"value": mean, "ci_low": mean - half, "ci_high": mean + half, "n": len(vals)}


def evaluate_point(spec: str, cfg: EvalConfig, refs: list[str] | None = None,
                   out_dir: Path | None = None) -> dict[str, Any]:
    """`{safety, safety_ci_low, …, over_refusal…, helpfulness…, n_*}` for checkpoint `spec`."""
    from vlsafe.probes.models import load

    lm = load(spec)
    out: dict[str, Any] = {"eval_mode": cfg.mode}
    for channel, which in CHANNELS.items():
        ps = _prompt_set(getattr(cfg, which), cfg.limit)
        if channel == "helpfulness" and cfg.helpfulness == "loglik":
            r = _loglik(lm, ps, refs or [], cfg)
        else:
            r = _rate(_refusals(lm, ps, cfg, out_dir, which), invert=channel == "helpfulness")
        out.update({channel: r["value"], f"{channel}_ci_low": r["ci_low"], f"{channel}_ci_high": r["ci_high"],
                    f"n_{which}": r["n"]})
    del lm
    return out


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
