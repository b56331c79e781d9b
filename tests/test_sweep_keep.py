"""The two-stage sweep's keep rule (`vlsafe.experiments.sweep_stages`) on planted screens: ε-dominance never drops
a true-front point under a monotone noisy screen, the cap keeps exactly the top K by the documented rank
(Pareto layer, then safety, then order), references are always kept and not counted, and `keep` never changes a
stage's eval cache key."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from vlsafe.experiments.sweep_eval import EvalConfig, mark_pareto
from vlsafe.experiments.sweep_stages import keep_near_front, keep_reasons, screen_keep

# ---- two-stage: the keep rule ----------------------------------------------------------------------------------
def _true_front(s: np.ndarray, h: np.ndarray) -> set[int]:
    df = mark_pareto(pd.DataFrame({"safety": s, "helpfulness": h}))
    return set(np.flatnonzero(df["is_pareto"]))


def test_keep_rule_never_drops_a_true_front_point_under_monotone_noisy_screens() -> None:
    rng = np.random.default_rng(0)
    margin, dropped_by_exact_front = 0.1, 0
    for _ in range(50):
        s, h = rng.uniform(0, 1, 30), rng.uniform(0, 1, 30)
        front = _true_front(s, h)
        # screened numbers: a monotone map of the truth plus an error of at most margin / 2
        ss = s ** 3 + rng.uniform(-margin / 2, margin / 2, s.size)
        sh = np.sqrt(h) + rng.uniform(-margin / 2, margin / 2, h.size)
        screened = pd.DataFrame({"safety": ss, "helpfulness": sh, "method": "merge"})
        keep = screen_keep(screened, margin=margin)
        assert front <= set(np.flatnonzero(keep))
        # and it does screen: a point the truth beats by far in both (after the map) is dropped
        far = [i for i in range(s.size) if any(s[j] ** 3 > s[i] ** 3 + 2 * margin and
                                               np.sqrt(h[j]) > np.sqrt(h[i]) + 2 * margin for j in range(s.size))]
        assert far and not keep[far].any()
        dropped_by_exact_front += len(front - set(np.flatnonzero(keep_near_front(screened, margin=0.0))))
    assert dropped_by_exact_front > 0   # the noise is real: margin 0 would have dropped true-front points


def test_keep_rule_with_exact_monotone_screen_keeps_exactly_the_undominated() -> None:
    rng = np.random.default_rng(1)
    s, h = rng.uniform(0, 1, 40), rng.uniform(0, 1, 40)
    keep = keep_near_front(pd.DataFrame({"safety": np.log1p(s), "helpfulness": h ** 2}), margin=0.0)
    strictly_beaten = {i for i in range(40) if ((s > s[i]) & (h > h[i])).any()}
    assert set(np.flatnonzero(~keep)) == strictly_beaten and _true_front(s, h) <= set(np.flatnonzero(keep))


def test_screen_keeps_references_and_image_front_points() -> None:
    df = pd.DataFrame({"method": ["checkpoint", "merge", "merge", "merge"], "safety": [0.0, 0.9, 0.1, 0.5],
                       "helpfulness": [0.0, 0.9, 0.1, 0.5], "safety_image": [np.nan, 0.1, 0.95, np.nan]})
    assert screen_keep(df, margin=0.05).tolist() == [True, True, True, False]
    assert screen_keep(df.drop(columns="safety_image"), margin=0.05).tolist() == [True, True, False, False]


# ---- two-stage: the cap ------------------------------------------------------------------------------------------
def _layers_by_peeling(s: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Pareto layers of the true numbers by peeling `mark_pareto`'s front (inf where a number is missing)."""
    layer, left, k = np.full(s.size, np.inf), ~(np.isnan(s) | np.isnan(h)), 1
    while left.any():
        idx = np.flatnonzero(left)
        front = idx[list(_true_front(s[idx], h[idx]))]
        layer[front], left[front], k = k, False, k + 1
    return layer


def _planted_grid(seed: int, image: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(true, screened) numbers of 40 points on a coarse grid (ties in both coordinates) and 3 references; the
    screen is an exactly monotone map of the truth (s³, √h; the image safety ∛s)."""
    rng = np.random.default_rng(seed)
    n = 43
    true = pd.DataFrame({"method": ["checkpoint"] * 3 + ["merge"] * (n - 3),
                         "safety": rng.integers(0, 11, n) / 10, "helpfulness": rng.integers(0, 11, n) / 10})
    if image:
        true["safety_image"] = np.where(rng.uniform(size=n) < 0.2, np.nan, rng.integers(0, 11, n) / 10)
    screened = true.assign(safety=true["safety"] ** 3, helpfulness=np.sqrt(true["helpfulness"]))
    if image:
        screened["safety_image"] = np.cbrt(true["safety_image"])
    return true, screened


def _expected_rank(true: pd.DataFrame, candidates: np.ndarray) -> list[int]:
    """The documented rank, from the true numbers (same order as the monotone screen's): Pareto layer (text, or
    image when smaller), then higher safety, then row order."""
    s, h = true["safety"].to_numpy(float), true["helpfulness"].to_numpy(float)
    layer = _layers_by_peeling(s, h)
    if "safety_image" in true.columns:
        layer = np.minimum(layer, _layers_by_peeling(true["safety_image"].to_numpy(float), h))
    return sorted(np.flatnonzero(candidates), key=lambda i: (layer[i], -s[i], i))


@pytest.mark.parametrize("image", [False, True])
def test_cap_keeps_exactly_the_top_k_by_layer_then_safety_then_order(image: bool) -> None:
    for seed in range(6):
        true, screened = _planted_grid(seed, image)
        ref = (true["method"] == "checkpoint").to_numpy()
        near = screen_keep(screened, margin=0.3) & ~ref           # the uncapped rule's picks (references apart)
        order = _expected_rank(true, near)
        assert len(order) > 8
        for k in (1, 2, 5, len(order) - 1, len(order), len(order) + 3):
            why = keep_reasons(screened, margin=0.3, max_points=k)
            keep = screen_keep(screened, margin=0.3, max_points=k)
            assert set(np.flatnonzero(keep & ~ref)) == set(order[:k]), (seed, k)
            assert [why[i] for i in order] == [f"cap-rank {n}" if n <= k else f"over cap (rank {n})"
                                               for n in range(1, len(order) + 1)], (seed, k)
            assert keep[ref].all() and all(why[i] == "reference" for i in np.flatnonzero(ref))
            assert all(why[i] == "dominated" for i in np.flatnonzero(~near & ~ref))


@pytest.mark.parametrize("image", [False, True])
def test_cap_at_least_the_front_size_keeps_every_full_front_point(image: bool) -> None:
    for seed in range(10):
        true, screened = _planted_grid(seed, image)
        ref = (true["method"] == "checkpoint").to_numpy()
        front = _true_front(true["safety"].to_numpy(), true["helpfulness"].to_numpy())
        if image:
            has = np.flatnonzero(true["safety_image"].notna())
            front |= set(has[list(_true_front(true["safety_image"].to_numpy()[has],
                                               true["helpfulness"].to_numpy()[has]))])
        k = len(front - set(np.flatnonzero(ref)))                 # the non-reference points on the full front
        for cap in (k, k + 4):
            keep = screen_keep(screened, margin=0.0, max_points=cap)
            assert front <= set(np.flatnonzero(keep)), (seed, cap)
        if k > 1:  # one less: front points only, one of them over the cap
            kept = set(np.flatnonzero(screen_keep(screened, margin=0.0, max_points=k - 1) & ~ref))
            assert kept <= front and len(kept) == k - 1


def test_references_always_kept_not_counted_and_ranked_against() -> None:
    df = pd.DataFrame({"point": ["ref-good", "a", "b", "c", "ref-bad", "d"],
                       "method": ["checkpoint", "merge", "merge", "merge", "checkpoint", "tune"],
                       "safety": [0.9, 0.8, 0.1, 0.5, 0.0, 0.95], "helpfulness": [0.9, 0.8, 0.95, 0.5, 0.0, 0.2]})
    # a is the safer of a and b, but the reference dominates it: layer 2, behind b (and d) on layer 1
    assert keep_reasons(df, margin=1.0, max_points=2) == ["reference", "over cap (rank 3)", "cap-rank 2",
                                                          "over cap (rank 4)", "reference", "cap-rank 1"]
    assert keep_reasons(df, margin=0.05, max_points=1) == ["reference", "dominated", "over cap (rank 2)",
                                                           "dominated", "reference", "cap-rank 1"]
    assert keep_reasons(df, margin=0.05) == ["reference", "dominated", "front", "dominated", "reference", "front"]
    assert screen_keep(df, margin=1.0, max_points=1).tolist() == [True, False, False, False, True, True]


def test_keep_never_changes_a_stage_eval_key() -> None:
    """The screen and the full stage are cached per point under their eval keys: `keep` (margin, cap) is not in them,
    so changing it reuses every cached evaluation; the stage keys are those of the plain fast / full configs."""
    base = {"mode": "two-stage", "limit": 8, "screen": {"limit": 4}}
    keys = {json.dumps(keep): (EvalConfig(**base, **keep).stage_config("screen").key(),
                               EvalConfig(**base, **keep).stage_config("full").key())
            for keep in ({}, {"keep": {"margin": 0.05}}, {"keep": {"margin": 0.2, "max_points": 3}},
                         {"keep": {"max_points": 1}})}
    assert len(set(keys.values())) == 1
    screen, full = next(iter(keys.values()))
    assert screen == EvalConfig(mode="fast", limit=4).key() and full == EvalConfig(mode="full", limit=8).key()
    assert screen != full
