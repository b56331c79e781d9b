"""Streaming fp64 statistics: equal to torch on the concatenation, exact merges, flat memory."""

from __future__ import annotations

import pytest
import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.stats import RunningStats


def _data(seed: int = 0, n: int = 301, d: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a large offset makes the naive sum-of-squares formula lose digits; Welford/Chan must not
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d, dtype=torch.float64)
            + 1e4)


@pytest.mark.parametrize("chunk", [1, 13, 301])
def test_matches_torch_on_concatenation(chunk):
    x = _data()
    s = RunningStats(x.shape[1], cov=True)
    for part in x.split(chunk):
        s.update(part.float() if chunk == 13 else part)
    ref = x if chunk != 13 else x.float().double()
    assert s.count == x.shape[0]
    torch.testing.assert_close(s.mean, ref.mean(0), rtol=0, atol=1e-9)
    torch.testing.assert_close(s.var, ref.var(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.variance(correction=0), ref.var(0, correction=0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.cov, torch.cov(ref.T), rtol=1e-9, atol=1e-9)
    assert s.mean.dtype == torch.float64


def test_merge_equals_single_pass_and_diagonal_mode():
    x = _data(1)
    a, b, whole = RunningStats(7), RunningStats(7), RunningStats(7)
    a.update(x[:100])
    b.update(x[100:])
    whole.update(x)
    a.merge(b).merge(RunningStats(7))             # merging an empty accumulator is a no-op
    torch.testing.assert_close(a.mean, whole.mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(a.var, x.var(0), rtol=1e-9, atol=1e-9)
    assert a.count == 301


def test_memory_is_flat_in_number_of_rows():
    s = RunningStats(64)
    s.update(torch.randn(5, 64))
    before = (len(s.tensors()), s.nbytes)
    for _ in range(50):
        s.update(torch.randn(40, 64))
    assert (len(s.tensors()), s.nbytes) == before == (2, 2 * 64 * 8)
    assert RunningStats(64, cov=True).nbytes == (64 + 64 * 64) * 8


def test_state_dict_roundtrip():
    x = _data(2)
    s = RunningStats(7, cov=True).update(x)
    r = RunningStats.from_state_dict(s.state_dict())
    assert r.count == s.count and r.track_cov
    torch.testing.assert_close(r.cov, s.cov)


def test_bad_inputs():
    s = RunningStats(4)
    with pytest.raises(VlsafeError, match="width 4"):
        s.update(torch.zeros(3, 5))
    with pytest.raises(VlsafeError, match="at least 1"):
        _ = s.mean
    s.update(torch.zeros(1, 4))
    with pytest.raises(VlsafeError, match="at least 2"):
        _ = s.var
    with pytest.raises(VlsafeError, match="cov=True"):
        _ = s.cov
    with pytest.raises(VlsafeError, match="mismatch"):
        s.merge(RunningStats(4, cov=True))
    with pytest.raises(VlsafeError, match="dim"):
        RunningStats(0)
