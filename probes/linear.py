"""Linear probes per layer × position: is the harmful/harmless distinction linearly readable here?

For each (layer, position): scikit-learn `LogisticRegression` on `StandardScaler`'d activations, scored by
stratified k-fold CV (accuracy, AUROC). The **shuffled-label control** runs the same CV splits on a seeded
permutation of the labels; it should sit near 0.5 — with few prompts it does not (a pilot on SmolLM2 with
16 + 16 prompts gave controls from 0.32 to 0.74), so use ≥ 100 prompts per class. `d_prime` is the separation of the two
classes' projections on their difference-in-means direction (descriptive, not cross-validated).

>>> df = probe_sets(capture(lm, harmful), capture(lm, harmless))      # tidy DataFrame, one row per layer × position
>>> probe_transfer(acts_a, y_a, acts_b, y_b)                          # train on checkpoint A, test on B
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.stacking import positions_of, stack_activations

COLUMNS = ["layer", "position", "probe_accuracy", "probe_auroc", "control_accuracy", "control_auroc", "d_prime", "n"]


def classifier(C: float = 1.0, max_iter: int = 1000) -> Any:
    """The probe pipeline every vlsafe linear probe uses: `StandardScaler` → `LogisticRegression(C, max_iter)`."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))


def _labels(labels: Sequence[Any], n: int) -> np.ndarray:
    y = np.asarray(list(labels))
    if len(y) != n:
        raise VlsafeError(f"linear probe: {len(y)} labels for {n} prompts")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) != 2:
        raise VlsafeError(f"linear probe: needs exactly two classes, got {len(classes)} ({classes.tolist()[:5]})")
    if counts.min() < 2:
        raise VlsafeError(f"linear probe: class {classes[counts.argmin()]!r} has {counts.min()} prompt(s); need ≥ 2")
    return (y == classes[1]).astype(int)


def d_prime(x: np.ndarray, y: np.ndarray) -> float:
    """Separation of the classes' projections on `unit(μ1 − μ0)`: (m1 − m0) / sqrt((v1 + v0) / 2)."""
    x = x.astype(np.float64)
    diff = x[y == 1].mean(0) - x[y == 0].mean(0)
    norm = np.linalg.norm(diff)
    if norm == 0:
        return 0.0
    proj = x @ (diff / norm)
    p1, p0 = proj[y == 1], proj[y == 0]
    pooled = np.sqrt((p1.var(ddof=1) + p0.var(ddof=1)) / 2)
    return float((p1.mean() - p0.mean()) / pooled) if pooled > 0 else float("inf")


def _cv(x: np.ndarray, y: np.ndarray, cv: StratifiedKFold, C: float, max_iter: int) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = cross_validate(classifier(C, max_iter), x, y, cv=cv, scoring=("accuracy", "roc_auc"))
    return float(res["test_accuracy"].mean()), float(res["test_roc_auc"].mean())


def probe_layers(acts: Any, labels: Sequence[Any], *, hook: str = "resid_pre", layers: Sequence[int] | None = None,
                 folds: int = 5, seed: int = 0, C: float = 1.0, max_iter: int = 1000,
                 progress: bool = True) -> pd.DataFrame:
    """Cross-validated probe per (layer, position) on `acts` (`Activations` or `[n, L, P, d]`) with `labels`.

    Columns: `layer, position, probe_accuracy, probe_auroc, control_accuracy, control_auroc, d_prime, n`.
    The control uses the same splits on labels permuted with `seed`.
    """
    x, lays = stack_activations(acts, hook=hook, layers=layers)
    return _probe_array(x, _labels(labels, x.shape[0]), lays, positions_of(acts, x.shape[2]), folds=folds, seed=seed,
                        C=C, max_iter=max_iter, progress=progress)


def _probe_array(x: torch.Tensor, y: np.ndarray, lays: list[int], pos: list[Any], *, folds: int, seed: int, C: float,
                 max_iter: int, progress: bool) -> pd.DataFrame:
    folds = min(folds, int(np.bincount(y).min()))
    if folds < 2:
        raise VlsafeError("linear probe: need at least 2 prompts per class for cross-validation")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    y_perm = np.random.default_rng(seed).permutation(y)
    rows = []
    grid = [(p, i) for p in range(x.shape[2]) for i in range(len(lays))]
    for p, i in tqdm(grid, desc="linear probes", disable=not progress, leave=False):
        xi = x[:, i, p].to(torch.float64).numpy()
        acc, auc = _cv(xi, y, cv, C, max_iter)
        c_acc, c_auc = _cv(xi, y_perm, cv, C, max_iter)
        rows.append({"layer": lays[i], "position": str(pos[p]), "probe_accuracy": acc, "probe_auroc": auc,
                     "control_accuracy": c_acc, "control_auroc": c_auc, "d_prime": d_prime(xi, y), "n": len(y)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _concat(acts_pos: Any, acts_neg: Any, hook: str,
            layers: Sequence[int] | None) -> tuple[torch.Tensor, np.ndarray, list[Any]]:
    a, lays = stack_activations(acts_pos, hook=hook, layers=layers)
    b, lays_b = stack_activations(acts_neg, hook=hook, layers=lays)
    if a.shape[1:] != b.shape[1:]:
        raise VlsafeError(f"linear probe: harmful activations {tuple(a.shape[1:])} and harmless "
                          f"{tuple(b.shape[1:])} differ in layers × positions × d")
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise VlsafeError("linear probe: empty harmful or harmless set")
    return torch.cat([a, b]), np.r_[np.ones(a.shape[0], int), np.zeros(b.shape[0], int)], lays


def probe_sets(acts_harmful: Any, acts_harmless: Any, *, hook: str = "resid_pre",
               layers: Sequence[int] | None = None, **kw: Any) -> pd.DataFrame:
    """`probe_layers` on two captured sets (harmful = label 1, harmless = 0)."""
    x, y, lays = _concat(acts_harmful, acts_harmless, hook, layers)
    opts = dict(folds=5, seed=0, C=1.0, max_iter=1000, progress=True)
    unknown = set(kw) - set(opts)
    if unknown:
        raise TypeError(f"probe_sets: unexpected options {sorted(unknown)}")
    return _probe_array(x, y, lays, positions_of(acts_harmful, x.shape[2]), **{**opts, **kw})


def probe_transfer(train_acts: Any, train_labels: Sequence[Any], test_acts: Any, test_labels: Sequence[Any], *,
                   hook: str = "resid_pre", layers: Sequence[int] | None = None, C: float = 1.0,
                   max_iter: int = 1000) -> pd.DataFrame:
    """Fit on all of checkpoint A's activations, score on checkpoint B's: `layer, position, transfer_accuracy,
    transfer_auroc`. Both must have the same hidden size and the layers asked for."""
    xa, lays = stack_activations(train_acts, hook=hook, layers=layers)
    xb, _ = stack_activations(test_acts, hook=hook, layers=lays)
    if xa.shape[1:] != xb.shape[1:]:
        raise VlsafeError(f"probe transfer: train activations {tuple(xa.shape[1:])} and test {tuple(xb.shape[1:])} "
                          "differ in layers × positions × hidden size")
    ya, yb = _labels(train_labels, xa.shape[0]), _labels(test_labels, xb.shape[0])
    pos = positions_of(train_acts, xa.shape[2])
    rows = []
    for p in range(xa.shape[2]):
        for i, layer in enumerate(lays):
            clf = classifier(C, max_iter)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(xa[:, i, p].to(torch.float64).numpy(), ya)
            xt = xb[:, i, p].to(torch.float64).numpy()
            rows.append({"layer": layer, "position": str(pos[p]),
                         "transfer_accuracy": float(accuracy_score(yb, clf.predict(xt))),
                         "transfer_auroc": float(roc_auc_score(yb, clf.decision_function(xt)))})
    return pd.DataFrame(rows)
