"""Spectra of weight changes ΔW: singular values, stable and effective rank, subspace overlap with W₀.

Exact singular values (`torch.linalg.svd`, fp64 up to 4M entries, fp32 above) for matrices with at most
`exact_max_numel` entries (8192×8192 by default); above that a randomized method (`torch.svd_lowrank`,
`oversample` extra columns, `niter` power iterations) whose a-posteriori error is reported: for each
approximate triple (σ, u, v) the residual ρ = √((‖Av − σu‖² + ‖Aᵀu − σv‖²)/2) bounds the distance from
σ to some true singular value (Jordan–Wielandt eigenpair residual); `error_bound` = max ρ over the top k, / σ_max.

- stable rank = ‖ΔW‖²_F / σ²_max
- effective rank = exp(H(p)), p = σ / Σσ (over all σ when exact, over the computed top q when randomized)
- subspace overlap = ‖U_Δᵀ U₀‖²_F / k for the top-k left singular vectors (1 = same subspace, ~k/m random)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlsafe.analysis.threads import serial_torch

EXACT_MAX_NUMEL = 8192 * 8192
_FP64_MAX_NUMEL = 1 << 22
SERIAL_MAX_NUMEL = 1 << 20  # smaller SVDs run single-threaded (see vlsafe.analysis.threads)


@dataclass(frozen=True)
class Spectrum:
    """Spectral summary of one ΔW (all floats are Python floats; NaN when undefined, e.g. ΔW = 0)."""

    sigma: torch.Tensor  # top singular values, descending, fp64 (at most top_k)
    stable_rank: float
    effective_rank: float
    subspace_overlap: float
    method: str  # "exact", "randomized(q=…,niter=…)" or "zero"
    error_bound: float  # relative to σ_max; 0.0 for exact

    @property
    def top_sigma(self) -> str:
        """The top-k singular values as a compact `;`-separated string (6 significant digits)."""
        return ";".join(f"{s:.6g}" for s in self.sigma.tolist())


def stable_rank(sigma: torch.Tensor, fro_sq: float | None = None) -> float:
    """‖A‖²_F / σ²_max (`fro_sq` defaults to Σσ², exact only when `sigma` is the full spectrum)."""
    smax = float(sigma.max()) if sigma.numel() else 0.0
    if smax == 0.0:
        return math.nan
    fro = float((sigma.double() ** 2).sum()) if fro_sq is None else fro_sq
    return fro / smax**2


def effective_rank(sigma: torch.Tensor) -> float:
    """exp of the Shannon entropy of σ/Σσ (Roy & Vetterli 2007); NaN for an all-zero spectrum."""
    s = sigma.double().clamp_min(0)
    total = float(s.sum())
    if total == 0.0:
        return math.nan
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def subspace_overlap(u_a: torch.Tensor, u_b: torch.Tensor) -> float:
    """‖U_aᵀ U_b‖²_F / k for orthonormal column blocks of equal width k."""
    k = u_a.shape[1]
    return float((u_a.double().T @ u_b.double()).pow(2).sum()) / k if k else math.nan


def _randomized(a: torch.Tensor, q: int, niter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(a, q=q, niter=niter)
    return u, s, v


def residual_bound(a: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-triple residual ρᵢ = √((‖Avᵢ − σᵢuᵢ‖² + ‖Aᵀuᵢ − σᵢvᵢ‖²)/2): some true σ lies within ρᵢ of σᵢ."""
    r1 = (a @ v - u * s).double().pow(2).sum(0)
    r2 = (a.T @ u - v * s).double().pow(2).sum(0)
    return ((r1 + r2) / 2).sqrt()


def left_singular(a: torch.Tensor, k: int, *, exact_max_numel: int = EXACT_MAX_NUMEL, oversample: int = 10,
                  niter: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str, float]:
    """(σ descending, top-k left singular vectors, method, relative error bound) of a 2-D matrix.

    σ holds the full spectrum when exact, the top q = k + oversample values when randomized.
    """
    with serial_torch(a.numel() <= SERIAL_MAX_NUMEL):
        if a.numel() <= exact_max_numel:
            dtype = torch.float64 if a.numel() <= _FP64_MAX_NUMEL else torch.float32
            u, s, _ = torch.linalg.svd(a.to(dtype), full_matrices=False)
            return s.double(), u[:, :k], "exact", 0.0
        q = min(k + oversample, *a.shape)
        a32 = a.float()
        u, s, v = _randomized(a32, q, niter, seed)
        kk = min(k, q)
        rho = residual_bound(a32, u[:, :kk], s[:kk], v[:, :kk])
    err = float(rho.max() / s[0]) if float(s[0]) > 0 else 0.0
    return s.double(), u[:, :k], f"randomized(q={q},niter={niter})", err


def spectrum(delta: torch.Tensor, w0: torch.Tensor | None = None, *, u0: torch.Tensor | None = None,
             top_k: int = 8, fro_sq: float | None = None, exact_max_numel: int = EXACT_MAX_NUMEL,
             oversample: int = 10, niter: int = 4, seed: int = 0) -> Spectrum:
    """Spectral summary of a 2-D ΔW; `w0` (same shape) or its precomputed top-k left singular vectors `u0`
    add the left-subspace overlap with W₀.

    `fro_sq` (‖ΔW‖²_F, e.g. from the fp64 streaming statistics) makes the stable rank exact even when the
    spectrum is randomized.
    """
    if delta.ndim != 2:
        raise ValueError(f"spectrum needs a 2-D matrix, got shape {list(delta.shape)}")
    k = min(top_k, *delta.shape)
    if not bool(delta.any()):
        return Spectrum(torch.zeros(0, dtype=torch.float64), math.nan, math.nan, math.nan, "zero", 0.0)
    kw = dict(exact_max_numel=exact_max_numel, oversample=oversample, niter=niter, seed=seed)
    sigma, u_d, method, err = left_singular(delta, k, **kw)
    if fro_sq is None:
        fro_sq = float(delta.double().pow(2).sum())
    if u0 is None and w0 is not None:
        _, u0, _, _ = left_singular(w0, k, **kw)
    overlap = subspace_overlap(u_d, u0[:, :k]) if u0 is not None else math.nan
    return Spectrum(sigma[:k].clone(), stable_rank(sigma, fro_sq), effective_rank(sigma), overlap, method, err)
