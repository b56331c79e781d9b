"""Streaming fp64 statistics: count, mean and second moments, merged exactly (Welford / Chan et al.).

Memory is O(d) (or O(d²) with `cov=True`) whatever the number of rows seen, so thousands of prompts cost no
more than one batch.

>>> s = RunningStats(576)
>>> for batch in activations:           # Tensor[n, 576], any float dtype
...     s.update(batch)
>>> s.mean, s.var, s.count              # fp64; var uses Bessel's correction like torch.var
"""

from __future__ import annotations

import torch

from vlsafe.analysis.errors import VlsafeError


class RunningStats:
    """Count, mean and centred second moments of rows `x[n, d]`, accumulated in fp64.

    `cov=True` keeps the full d×d co-moment matrix (else only its diagonal). `merge` combines two
    accumulators exactly (Chan's parallel formula), so per-batch or per-worker stats can be reduced.
    """

    def __init__(self, dim: int, *, cov: bool = False, device: str | torch.device = "cpu"):
        if dim < 1:
            raise VlsafeError(f"RunningStats: dim must be >= 1, got {dim}")
        self.dim, self.track_cov = int(dim), bool(cov)
        self.count = 0
        self._mean = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self._m2 = torch.zeros((self.dim, self.dim) if cov else (self.dim,), dtype=torch.float64, device=device)

    def __repr__(self) -> str:
        return f"RunningStats(dim={self.dim}, count={self.count}, cov={self.track_cov})"

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.dim() != 2 or x.shape[-1] != self.dim:
            raise VlsafeError(f"RunningStats: expected rows of width {self.dim}, got shape {tuple(x.shape)}")
        return x.to(self._mean.device, torch.float64)

    def update(self, x: torch.Tensor) -> "RunningStats":
        """Add the rows of `x` ([n, d] or [d]); returns self."""
        x = self._check(x)
        n = x.shape[0]
        if n == 0:
            return self
        mean_b = x.mean(0)
        xc = x - mean_b
        m2_b = xc.T @ xc if self.track_cov else (xc * xc).sum(0)
        return self._combine(n, mean_b, m2_b)

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Fold `other` (same dim and cov setting) into self; returns self."""
        if other.dim != self.dim or other.track_cov != self.track_cov:
            raise VlsafeError(f"RunningStats.merge: dim/cov mismatch ({self.dim}, cov={self.track_cov}) vs "
                              f"({other.dim}, cov={other.track_cov})")
        if other.count == 0:
            return self
        return self._combine(other.count, other._mean.to(self._mean.device), other._m2.to(self._m2.device))

    def _combine(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> "RunningStats":
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        corr = torch.outer(delta, delta) if self.track_cov else delta * delta
        self._m2 = self._m2 + m2_b + corr * (n_a * n_b / n)
        self.count = n
        return self

    # ---- results ----------------------------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        """Mean row, fp64 [d]."""
        self._need(1)
        return self._mean.clone()

    def variance(self, *, correction: int = 1) -> torch.Tensor:
        """Per-feature variance, fp64 [d]; `correction=1` is Bessel's (torch.var default), 0 the population one."""
        self._need(correction + 1)
        diag = torch.diagonal(self._m2) if self.track_cov else self._m2
        return diag / (self.count - correction)

    @property
    def var(self) -> torch.Tensor:
        """Unbiased per-feature variance (= `torch.var(x, 0)`), fp64 [d]."""
        return self.variance(correction=1)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def covariance(self, *, correction: int = 1) -> torch.Tensor:
        """Full covariance [d, d] (= `torch.cov(x.T)`); needs `cov=True`."""
        if not self.track_cov:
            raise VlsafeError("RunningStats: covariance not tracked (create with cov=True)")
        self._need(correction + 1)
        return self._m2 / (self.count - correction)

    @property
    def cov(self) -> torch.Tensor:
        return self.covariance(correction=1)

    def _need(self, n: int) -> None:
        if self.count < n:
            raise VlsafeError(f"RunningStats: needs at least {n} row(s), has {self.count}")

    # ---- serialisation ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that `from_state_dict` restores exactly (count, mean, m2)."""
        return {"count": torch.tensor([self.count], dtype=torch.int64), "mean": self._mean.clone(),
                "m2": self._m2.clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "RunningStats":
        mean, m2 = state["mean"], state["m2"]
        s = cls(mean.shape[0], cov=m2.dim() == 2, device=mean.device)
        s.count, s._mean, s._m2 = int(state["count"].item()), mean.to(torch.float64), m2.to(torch.float64)
        return s

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this accumulator holds (for memory accounting)."""
        return [self._mean, self._m2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
