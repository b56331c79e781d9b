"""Judge-error-aware refusal rates: a judge's measured sensitivity/specificity and the Rogan–Gladen correction.

A judge's :class:`JudgeCalibration` is measured on a labelled validation file (``refused`` = the human label):
sensitivity ``Se = TP / (TP + FN)`` on the labelled refusals, specificity ``Sp = TN / (TN + FP)`` on the labelled
compliances, with their sample sizes and the file they came from. A judged rate ``p̂`` then estimates the true rate

    π̂ = (p̂ + Sp − 1) / (Se + Sp − 1), clipped to [0, 1]   (Rogan–Gladen)

and :func:`corrected_rate` gives an interval that carries both the sampling error of ``p̂`` and the judge's own
error: a seeded parametric bootstrap drawing ``p``, ``Se`` and ``Sp`` from their Jeffreys posteriors
``Beta(k + ½, n − k + ½)`` and taking percentiles of the corrected draws.

The shipped default judge's calibration (``judge_calibration.json``) is measured on the project's held-out file
``tests/data/judge_holdout.jsonl`` (never used for fitting); other judges get one from
``vlsafe judge FILE --labels COLUMN`` and use it with ``--calibration FILE`` / ``get_judge(..., calibration=FILE)``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.behavior.metrics import REFUSAL_METRICS

SHIPPED_PATH = Path(__file__).with_name("judge_calibration.json")
CORRECTED_COLUMNS = ["rate_corrected", "corrected_low", "corrected_high"]
DRAWS = 4000
__all__ = ["JudgeCalibration", "measure", "rogan_gladen", "corrected_rate", "corrected_columns",
           "load_calibration", "shipped_calibration", "bootstrap_interval", "CORRECTED_COLUMNS"]


@dataclass(frozen=True)
class JudgeCalibration:
    """A judge's error measured on labelled data: ``tp`` of ``n_pos`` labelled refusals judged refusals,
    ``tn`` of ``n_neg`` labelled compliances judged compliances; ``source`` names the labelled file."""

    judge: str
    tp: int
    n_pos: int
    tn: int
    n_neg: int
    source: str = ""

    def __post_init__(self) -> None:
        if not (0 <= self.tp <= self.n_pos and 0 <= self.tn <= self.n_neg) or self.n_pos < 1 or self.n_neg < 1:
            raise VlsafeError(f"judge calibration {self.judge!r} ({self.source or 'in memory'}): need "
                              f"0 <= tp <= n_pos, 0 <= tn <= n_neg and both n >= 1; got tp={self.tp}, "
                              f"n_pos={self.n_pos}, tn={self.tn}, n_neg={self.n_neg}")

    @property
    def sensitivity(self) -> float:
        """Share of labelled refusals the judge calls refusals."""
        return self.tp / self.n_pos

    @property
    def specificity(self) -> float:
        """Share of labelled compliances the judge calls compliances."""
        return self.tn / self.n_neg

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: the counts plus the derived sensitivity and specificity."""
        return {**asdict(self), "sensitivity": self.sensitivity, "specificity": self.specificity}

    def save(self, path: str | Path) -> Path:
        """Write the record as JSON to ``path``."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return p

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "calibration") -> "JudgeCalibration":
        """Build from a JSON record (derived fields ignored); one-line error naming ``where`` if malformed."""
        try:
            return cls(judge=str(d["judge"]), tp=int(d["tp"]), n_pos=int(d["n_pos"]), tn=int(d["tn"]),
                       n_neg=int(d["n_neg"]), source=str(d.get("source", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise VlsafeError(f"{where}: not a judge calibration record ({type(e).__name__}: {e}); expected keys "
                              "judge, tp, n_pos, tn, n_neg") from None


def measure(judge_name: str, predicted: Sequence[int], labels: Sequence[int], *,
            source: str = "") -> JudgeCalibration:
    """Calibration of a judge from its 0/1 verdicts ``predicted`` against the 0/1 human ``labels``."""
    pred, y = np.asarray(predicted, dtype=int), np.asarray(labels, dtype=int)
    if pred.shape != y.shape:
        raise VlsafeError(f"judge calibration: {len(pred)} verdicts for {len(y)} labels")
    return JudgeCalibration(judge=judge_name, tp=int(((pred == 1) & (y == 1)).sum()), n_pos=int((y == 1).sum()),
                            tn=int(((pred == 0) & (y == 0)).sum()), n_neg=int((y == 0).sum()), source=source)


def load_calibration(path: str | Path) -> JudgeCalibration:
    """Read a calibration JSON written by :meth:`JudgeCalibration.save` (``vlsafe judge --labels``)."""
    p = Path(path)
    if not p.is_file():
        raise VlsafeError(f"judge calibration file {p} does not exist")
    from vlsafe.analysis.runinfo import read_json_object

    return JudgeCalibration.from_dict(read_json_object(p), where=str(p))


def shipped_calibration(judge_name: str) -> JudgeCalibration | None:
    """The shipped calibration of a judge by its name (only the default ``vlsafe`` judge has one), else None."""
    data = json.loads(SHIPPED_PATH.read_text(encoding="utf-8"))
    rec = data.get(judge_name)
    return JudgeCalibration.from_dict(rec, where=f"{SHIPPED_PATH}[{judge_name}]") if rec else None


def rogan_gladen(p: Any, se: Any, sp: Any) -> Any:
    """π = (p + Sp − 1) / (Se + Sp − 1) clipped to [0, 1] (arrays broadcast); NaN where Se + Sp ≤ 1."""
    p, se, sp = np.asarray(p, float), np.asarray(se, float), np.asarray(sp, float)
    den = se + sp - 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, np.clip((p + sp - 1.0) / den, 0.0, 1.0), np.nan)
    return out if out.ndim else float(out)


def _jeffreys(rng: np.random.Generator, k: Any, n: Any, size: tuple[int, ...]) -> np.ndarray:
    return rng.beta(np.asarray(k, float) + 0.5, np.asarray(n, float) - np.asarray(k, float) + 0.5, size=size)


def bootstrap_interval(k: Any, n: Any, tp: Any, n_pos: Any, tn: Any, n_neg: Any, *, level: float = 0.95,
                       draws: int = DRAWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval (low, high) of the corrected rate, vectorised over broadcastable count arrays: draws of
    ``p``, ``Se``, ``Sp`` from their Jeffreys posteriors, corrected by :func:`rogan_gladen`, seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    size = (draws, *np.broadcast(*map(np.asarray, (k, n, tp, n_pos, tn, n_neg))).shape)
    d = rogan_gladen(_jeffreys(rng, k, n, size), _jeffreys(rng, tp, n_pos, size), _jeffreys(rng, tn, n_neg, size))
    a = (1 - level) / 2
    with np.errstate(all="ignore"):
        return np.nanquantile(d, a, axis=0), np.nanquantile(d, 1 - a, axis=0)


def corrected_rate(k: int, n: int, cal: JudgeCalibration, *, level: float = 0.95, draws: int = DRAWS,
                   seed: int = 0) -> tuple[float, float, float]:
    """(Rogan–Gladen estimate, low, high) for ``k`` judged refusals of ``n``: NaNs when ``n == 0`` or the
    judge is uninformative (Se + Sp ≤ 1)."""
    if n <= 0 or cal.sensitivity + cal.specificity <= 1:
        return (math.nan, math.nan, math.nan)
    est = rogan_gladen(k / n, cal.sensitivity, cal.specificity)
    lo, hi = bootstrap_interval(k, n, cal.tp, cal.n_pos, cal.tn, cal.n_neg, level=level, draws=draws, seed=seed)
    return (float(est), float(lo), float(hi))


_REFUSAL = REFUSAL_METRICS


def corrected_columns(rows: pd.DataFrame, cal: JudgeCalibration | None, *, seed: int = 0) -> pd.DataFrame:
    """``rows`` (tidy rows) with ``CORRECTED_COLUMNS`` appended: the corrected refusal rate on refusal metrics,
    its complement on ``compliance`` rows, NaN on other metrics; unchanged when ``cal`` is None."""
    if cal is None:
        return rows
    vals = []
    for r in rows.itertuples():
        if r.metric not in (*_REFUSAL, "compliance") or pd.isna(r.k):
            vals.append((math.nan,) * 3)
            continue
        k = int(r.k) if r.metric in _REFUSAL else int(r.n) - int(r.k)
        est, lo, hi = corrected_rate(k, int(r.n), cal, seed=seed)
        vals.append((est, lo, hi) if r.metric in _REFUSAL else (1 - est, 1 - hi, 1 - lo))
    extra = pd.DataFrame(vals, columns=CORRECTED_COLUMNS, index=rows.index, dtype=float)
    return pd.concat([rows, extra], axis=1)
