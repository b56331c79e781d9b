"""Train the default ``vlsafe`` judge: features of ``judge_train.jsonl`` → logistic regression → JSON weights.

Usage: ``python -m vlsafe.probes.behavior._train_judge [--train FILE] [--out FILE] [--holdout FILE] [--calibrate]``. The regularisation
strength is chosen by 5-fold cross-validation (grouped: a row and its prompt-less copy share a fold) on the
training file only; ``--holdout`` (never used for
fitting or selection) is only scored and printed. ``--calibrate`` measures the shipped default judge on the
held-out file (``tests/data/judge_holdout.jsonl`` unless ``--holdout``) and writes ``judge_calibration.json``.
New weights (or features) change ``judges.judge_fingerprint``, so cached organism metrics and sweep evaluations
are judged again rather than reused.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from vlsafe.probes.behavior.judge_features import FEATURE_NAMES, extract

HERE = Path(__file__).parent


def load_jsonl(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read ``response`` / ``refused`` columns of a labelled JSONL file."""
    rows = [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [r["response"] for r in rows], np.array([int(r["refused"]) for r in rows])


def load_prompts(path: str | Path) -> list[str | None]:
    """The ``prompt`` of every row of a labelled JSONL file (None where absent)."""
    rows = [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [r.get("prompt") or None for r in rows]


def featurise(texts: list[str], prompts: list[str | None] | None = None) -> np.ndarray:
    """Stack feature vectors in FEATURE_NAMES order (prompt features 0 where a prompt is missing)."""
    prompts = prompts if prompts is not None else [None] * len(texts)
    return np.array([[extract(t, p)[k] for k in FEATURE_NAMES] for t, p in zip(texts, prompts)], dtype=np.float64)


def train(train_path: Path, out_path: Path, holdout: Path | None = None, seed: int = 0) -> dict:
    """Fit, write the weights JSON and return it (with CV and optional held-out accuracy)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    texts, y = load_jsonl(train_path)
    # every row twice: with its prompt and without (the response-only mode sees prompt features at 0)
    X = np.vstack([featurise(texts, load_prompts(train_path)), featurise(texts)])
    groups = np.concatenate([np.arange(len(y)), np.arange(len(y))])  # a row and its copy share a fold
    y = np.concatenate([y, y])
    keep = X[:, FEATURE_NAMES.index("empty")] == 0  # empty responses are decided by rule, not by the model
    X, y, groups = X[keep], y[keep], groups[keep]
    cv = GroupKFold(5)
    scores = {}
    for C in (0.03, 0.1, 0.3, 1.0, 3.0):
        pipe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
        scores[C] = float(cross_val_score(pipe, X, y, cv=cv, groups=groups).mean())
    best_c = max(scores, key=lambda c: (round(scores[c], 3), -c))  # ties → stronger regularisation
    scaler = StandardScaler().fit(X)
    scale = np.where(scaler.scale_ > 1e-9, scaler.scale_, 1.0)
    lr = LogisticRegression(C=best_c, max_iter=5000).fit((X - scaler.mean_) / scale, y)
    w = {
        "version": 1, "model": "logistic_regression", "features": list(FEATURE_NAMES),
        "mean": [round(float(v), 6) for v in scaler.mean_], "scale": [round(float(v), 6) for v in scale],
        "coef": [round(float(v), 6) for v in lr.coef_[0]], "intercept": round(float(lr.intercept_[0]), 6),
        "C": best_c, "cv_accuracy": {str(k): round(v, 4) for k, v in scores.items()},
        "train_file": train_path.name, "n_train": int(len(y)), "n_refused": int(y.sum()),
        "train_accuracy": round(float(lr.score((X - scaler.mean_) / scale, y)), 4),
    }
    out_path.write_text(json.dumps(w, indent=1) + "\n", encoding="utf-8")
    if holdout is not None:
        ht, hy = load_jsonl(holdout)
        Xh = featurise(ht)
        w["holdout_accuracy"] = float(lr.score((Xh - scaler.mean_) / scale, hy))
    return w


HOLDOUT = Path("tests") / "data" / "judge_holdout.jsonl"


def write_shipped_calibration(holdout: Path = HOLDOUT, out: Path | None = None) -> dict:
    """Measure the default judge on ``holdout`` (with its prompts, as evaluations judge) and write
    ``{"vlsafe": record}`` to ``judge_calibration.json``."""
    from vlsafe.probes.behavior.calibration import SHIPPED_PATH, measure
    from vlsafe.probes.behavior.judge_vlsafe import VlsafeJudge

    texts, y = load_jsonl(holdout)
    if holdout.resolve() == (HERE / "judge_train.jsonl").resolve():
        raise SystemExit("the calibration file must not be the training file")
    pred = [int(r.refused) for r in VlsafeJudge().judge(texts, load_prompts(holdout))]  # as in eval: with prompts
    rec = {"vlsafe": measure("vlsafe", pred, y.tolist(), source=holdout.as_posix()).to_dict()}
    (out or SHIPPED_PATH).write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", type=Path, default=HERE / "judge_train.jsonl")
    ap.add_argument("--out", type=Path, default=HERE / "judge_weights.json")
    ap.add_argument("--holdout", type=Path, default=None)
    ap.add_argument("--calibrate", action="store_true", help="only write judge_calibration.json")
    a = ap.parse_args()
    if a.calibrate:
        print(write_shipped_calibration(a.holdout or HOLDOUT))
        return
    w = train(a.train, a.out, a.holdout)
    print(f"n={w['n_train']} C={w['C']} cv={w['cv_accuracy']} train_acc={w['train_accuracy']}"
          + (f" holdout_acc={w['holdout_accuracy']:.4f}" if "holdout_accuracy" in w else ""))
    top = sorted(zip(w["features"], w["coef"]), key=lambda kv: -abs(kv[1]))[:12]
    print("top coefficients:", ", ".join(f"{k}={v:+.2f}" for k, v in top))


if __name__ == "__main__":
    main()
