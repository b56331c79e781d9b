"""`vlsafe.analysis.kernels`: the fused one-pass statistics equal an fp64 torch reference, for every input dtype;
planted changes are counted exactly; non-finite inputs reach the sums (so callers can mask them)."""

from __future__ import annotations

import math

import pytest
import torch

from vlsafe.analysis.kernels import pair_sums, triple_sums
from vlsafe.analysis.weightshift import PairStats

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _reference_pair(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> list[float]:
    x, y = a.double(), b.double()
    d = y - x
    return [float(x @ x), float(y @ y), float(d @ d), float((d.abs() > atol + rtol * x.abs()).sum()),
            float(d.abs().max())]


@pytest.mark.parametrize("da", DTYPES)
@pytest.mark.parametrize("db", (torch.float32, torch.bfloat16))
def test_pair_sums_match_fp64_reference(da: torch.dtype, db: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(100_003, generator=g).to(da)
    b = (a.double() + 0.01 * torch.randn(100_003, generator=g, dtype=torch.float64)).to(db)
    got = pair_sums(a, b, 1e-3, 1e-8).tolist()
    want = _reference_pair(a, b, 1e-3, 1e-8)
    for k in (0, 1, 2):
        assert got[k] == pytest.approx(want[k], rel=1e-12)
    assert got[3] == want[3] and got[4] == want[4]


def test_planted_changes_are_counted_exactly() -> None:
    a = torch.ones(10_000)
    b = a.clone()
    b[[3, 77, 9_999]] += torch.tensor([0.5, -2.0, 1e-6])  # the last is within rtol = 1e-3 of |a| = 1
    s = pair_sums(a, b, 1e-3, 0.0).tolist()
    assert s[3] == 2 and s[4] == 2.0
    assert s[2] == pytest.approx(0.25 + 4.0 + 1e-12, rel=1e-6)


@pytest.mark.parametrize("chain", (False, True))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_triple_sums_match_fp64_reference(chain: bool, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    w0, wa, wb = (torch.randn(50_001, generator=g).to(dtype) for _ in range(3))
    x0, xa, xb = w0.double(), wa.double(), wb.double()
    ta, tb = xa - x0, xb - (xa if chain else x0)
    want = [float(ta @ ta), float(tb @ tb), float(ta @ tb)]
    got = triple_sums(w0, wa, wb, chain).tolist()
    assert got == pytest.approx(want, rel=1e-12)


def test_nonfinite_inputs_reach_the_sums_and_are_masked_by_pair_stats() -> None:
    a = torch.arange(1.0, 600_001.0)
    b = a * 1.5
    b[12] = math.nan
    a[400_000] = math.inf
    assert not torch.isfinite(pair_sums(a, b, 1e-3, 1e-8)[:3]).all()
    st = PairStats()
    st.update(a, b)
    ok = torch.ones(600_000, dtype=torch.bool)
    ok[[12, 400_000]] = False
    want = _reference_pair(a[ok], b[ok], 1e-3, 1e-8)
    assert st.nonfinite == 2 and st.changed == want[3] and st.max_abs == want[4]
    assert st.sq_a == pytest.approx(want[0], rel=1e-12) and st.sq_d == pytest.approx(want[2], rel=1e-12)
