"""Merge operators: invariants and hand-computed planted cases (pure tensors, no checkpoints)."""

from __future__ import annotations

import math

import pytest
import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.merging import operators as ops


@pytest.fixture()
def trio() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(16, 8, generator=g) for _ in range(3))


def test_slerp_endpoints_and_midpoint(trio):
    a, b, _ = trio
    assert torch.equal(ops.slerp(a, b, 0.0), a)
    assert torch.allclose(ops.slerp(a, b, 1.0), b, atol=1e-6)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # Ω = 90°: midpoint is (e1+e2)/√2
    assert torch.allclose(ops.slerp(e1, e2, 0.5), torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-7)


def test_slerp_colinear_falls_back_to_lerp(trio):
    a = trio[0]
    assert torch.allclose(ops.slerp(a, 3 * a, 0.25), 1.5 * a, atol=1e-6)  # lerp: 0.75a + 0.25·3a


def test_task_arithmetic_lambda_zero_is_base_and_planted_value(trio):
    base, x, y = trio
    assert torch.equal(ops.task_arithmetic(base, [x, y], [0.3, 0.7], lam=0.0), base)
    want = base + 0.5 * (0.3 * (x - base) + 0.7 * (y - base))
    assert torch.allclose(ops.task_arithmetic(base, [x, y], [0.3, 0.7], lam=0.5), want, atol=1e-6)
    # normalize divides by Σw; a zero sum is treated as 1 (mergekit)
    assert torch.allclose(ops.task_arithmetic(base, [x, y], [1.0, 3.0], normalize=True),
                          base + (x - base + 3 * (y - base)) / 4, atol=1e-6)
    assert torch.allclose(ops.task_arithmetic(base, [x, y], [1.0, -1.0], normalize=True), base + (x - y), atol=1e-6)


def test_resta_is_task_arithmetic(trio):
    sft, aligned, unaligned = trio
    out = ops.task_arithmetic(sft, [aligned, unaligned], [0.4, -0.4])
    assert torch.allclose(out, sft + 0.4 * (aligned - unaligned), atol=1e-6)


def test_linear_single_and_weighted(trio):
    a, b, _ = trio
    assert torch.equal(ops.linear([a], [1.0]), a)
    assert torch.allclose(ops.linear([a], [0.37]), a, atol=1e-6)  # (0.37·a)/0.37, rounding only
    assert torch.allclose(ops.linear([a, b], [1.0, 3.0]), (a + 3 * b) / 4, atol=1e-6)
    assert torch.allclose(ops.linear([a, b], [1.0, 3.0], normalize=False), a + 3 * b, atol=1e-6)
    with pytest.raises(VlsafeError, match="sum to zero"):
        ops.linear([a, b], [1.0, -1.0])


def test_ties_identical_models_and_planted_election():
    x = torch.randn(32)
    base = torch.zeros(32)
    assert torch.allclose(ops.ties(base, [x, x, x], [1.0, 1.0, 1.0], density=1.0), x, atol=1e-6)
    t1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
    t2 = torch.tensor([-1.0, -1.0, 1.0, 0.1])
    # sums [0, -3, 4, 0.6] → signs [+ (zero → +), −, +, +]; t2's −1 in slot 0 disagrees and is dropped
    out = ops.ties(torch.zeros(4), [t1, t2], [1.0, 1.0], density=1.0)
    assert torch.allclose(out, torch.tensor([1.0, -1.5, 2.0, 0.3]))
    # trim: density 0.5 keeps the two largest magnitudes of each task vector before the election:
    # t1 → [0, −2, 3, 0], t3 → [−1.2, 0, 1.1, 0]; sums [−1.2, −2, 4.1, 0]; slot 2 averages 3 and 1.1
    t3 = torch.tensor([-1.2, -1.0, 1.1, 0.1])
    out = ops.ties(torch.zeros(4), [t1, t3], [1.0, 1.0], density=0.5)
    assert torch.allclose(out, torch.tensor([-1.2, -2.0, 2.05, 0.0]))


def test_ties_lambda_zero_and_density_errors(trio):
    base, x, y = trio
    assert torch.equal(ops.ties(base, [x, y], [1.0, 1.0], density=0.3, lam=0.0), base)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(VlsafeError, match="outside"):
            ops.ties(base, [x, y], [1.0, 1.0], density=bad)


def test_magnitude_prune_keeps_at_least_one():
    d = torch.tensor([0.1, -5.0, 0.2, 0.3])
    assert torch.equal(ops.magnitude_prune(d, 0.01), torch.tensor([0.0, -5.0, 0.0, 0.0]))


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.9])
def test_index_tie_break_keeps_the_sorted_set_when_untied(density):
    d = torch.randn(4096, generator=torch.Generator().manual_seed(1))  # continuous values: no ties
    assert torch.equal(ops.magnitude_prune(d, density, tie_break="index"), ops.magnitude_prune(d, density))


def test_index_tie_break_keeps_lowest_index_ties_and_k_entries():
    d = torch.tensor([0.5, -3.0, 1.0, -1.0, 1.0, 2.0, -1.0, 0.1])  # k = 4 of 8: 3, 2, then 2 of the four ±1.0
    out = ops.magnitude_prune(d, 0.5, tie_break="index")
    assert torch.equal(out, torch.tensor([0.0, -3.0, 1.0, -1.0, 0.0, 2.0, 0.0, 0.0]))
    q = torch.randint(-3, 4, (5000,), generator=torch.Generator().manual_seed(2)).float()  # heavily tied
    for density in (0.1, 0.37, 0.8):
        kept = ops.magnitude_prune(q, density, tie_break="index") != 0
        ref = ops.magnitude_prune(q, density) != 0
        nz = int((q != 0).sum())
        assert int(kept.sum()) == min(int(ref.sum()), nz)  # the same count as the sort...
        assert q[kept].abs().min() >= q[~kept].abs().max()  # ...and every kept magnitude ≥ every dropped one
    with pytest.raises(VlsafeError, match="tie_break 'random'"):
        ops.magnitude_prune(q, 0.5, tie_break="random")


def test_dare_seeded_reproducible_and_d1_is_task_arithmetic(trio):
    base, x, y = trio
    a = ops.dare_linear(base, [x, y], [0.5, 0.5], density=0.4, seed=7)
    assert torch.equal(a, ops.dare_linear(base, [x, y], [0.5, 0.5], density=0.4, seed=7))
    assert not torch.equal(a, ops.dare_linear(base, [x, y], [0.5, 0.5], density=0.4, seed=8))
    assert torch.equal(ops.dare_ties(base, [x, y], [0.5, 0.5], density=0.4, seed=3),
                       ops.dare_ties(base, [x, y], [0.5, 0.5], density=0.4, seed=3))
    assert torch.allclose(ops.dare_linear(base, [x, y], [0.5, 0.5], density=1.0, seed=1),
                          ops.task_arithmetic(base, [x, y], [0.5, 0.5]), atol=0)


def test_dare_rescale_matches_l1_and_expected_value():
    tau = torch.linspace(-1, 1, 200)
    base = torch.zeros(200)
    d, n = 0.3, 3000
    kept = ops.random_prune(tau, d, rescale=True, generator=torch.Generator().manual_seed(0))
    assert kept.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-5)
    g = torch.Generator().manual_seed(1)
    mean = torch.stack([ops.dare_linear(base, [tau], [1.0], density=d, rescale=False, generator=g)
                        for _ in range(n)]).mean(0) / d
    sigma = tau.abs() * math.sqrt((1 - d) / (d * n))  # std of the mean of Bernoulli(d)·τ/d
    assert ((mean - tau).abs() <= 5 * sigma + 1e-7).all()


def test_breadcrumbs_band_and_gamma_trap():
    delta = torch.arange(1, 101, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(50)  # |δ| = 1..100
    kept = ops.magnitude_band(delta, density=0.9, gamma=0.05)
    mags = kept[kept != 0].abs()
    assert mags.numel() == 90 and mags.min() == 6 and mags.max() == 95  # bottom 5 and top 5 dropped
    # ⌊γn⌋ = 0: no outliers dropped, the delta must not vanish (older mergekit's [n_bot:-0] kept nothing)
    assert torch.equal(ops.magnitude_band(delta, density=0.9, gamma=0.001), ops.magnitude_prune(delta, 0.9))
    base = torch.zeros(100)
    out = ops.breadcrumbs(base, [base + delta], [1.0], density=0.9, gamma=0.05)
    assert torch.equal(out, kept)


def test_dtypes_compute_fp32_return_requested(trio):
    base, x, _ = (t.to(torch.bfloat16) for t in trio)
    out = ops.task_arithmetic(base, [x], [0.5])
    assert out.dtype == torch.bfloat16
    want = (base.float() + 0.5 * (x.float() - base.float())).to(torch.bfloat16)
    assert torch.equal(out, want)
    assert ops.slerp(base, x, 0.3, out_dtype=torch.float32).dtype == torch.float32
    assert ops.linear([base.double()], [1.0]).dtype == torch.float64


def test_shape_mismatch_is_one_line_error(trio):
    with pytest.raises(VlsafeError, match=r"shape mismatch: input 0 has \(3,\)"):
        ops.task_arithmetic(torch.zeros(4), [torch.zeros(3)], [1.0])


def test_chunked_evaluation_is_exact(trio, monkeypatch):
    """Elementwise methods run in chunks on large tensors; the chunking must not change a single bit."""
    base, x, y = trio
    whole = [ops.linear([x, y], [0.3, 0.9]), ops.task_arithmetic(base, [x, y], [0.3, -0.6], lam=0.7, normalize=True),
             ops.slerp(base, x, 0.35)]
    monkeypatch.setattr(ops, "_CHUNK", 7)  # 128 elements → 19 chunks, the last one partial
    chunked = [ops.linear([x, y], [0.3, 0.9]), ops.task_arithmetic(base, [x, y], [0.3, -0.6], lam=0.7, normalize=True),
               ops.slerp(base, x, 0.35)]
    for a, b in zip(whole, chunked):
        assert a.shape == b.shape and torch.equal(a, b)
