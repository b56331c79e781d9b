"""Merge operators: pure functions over same-shape tensors, with mergekit 0.1.5's exact semantics.

Notation (docs/methods.md, "Merge operators"): θ_base is the base tensor, θ_t the others, τ_t = θ_t − θ_base their task
vectors, w_t per-model weights, d_t densities, λ the global scale. Every operator computes in `dtype`
(float32 by default; float64 inputs stay float64) and returns `out_dtype` (default: the dtype of the
base, or of the first tensor for `linear`).

- `linear`:           Σ w_t θ_t, divided by Σ w_t when `normalize`.
- `task_arithmetic`:  θ_base + λ Σ w_t τ_t (÷ Σ w_t when `normalize`; a zero divisor becomes 1).
- `ties`:             trim each τ_t to its top-d magnitudes, elect a sign per element (γ = sign Σ w_t τ̂_t,
                      zero → +), keep only agreeing entries, weighted disjoint mean, λ.
- `dare_linear` / `dare_ties`: keep each delta entry with probability d (seeded generator), rescale so the
                      L1 norm of the kept delta equals that of the unmasked delta, then sum (or elect signs).
- `breadcrumbs` / `breadcrumbs_ties`: drop the top ⌊γn⌋ magnitudes and enough of the bottom to keep ⌊dn⌋.
- `slerp`:            spherical interpolation between base (t = 0) and other (t = 1), lerp when colinear.

RESTA ("θ_SFT + β·δ_safe", δ_safe = θ_aligned − θ_unaligned) is `task_arithmetic(sft, [aligned, unaligned],
[β, −β])`. All functions raise `VlsafeError` for bad arguments; the executor prefixes the tensor name.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from vlsafe.analysis.errors import VlsafeError

Tensor = torch.Tensor
Floats = float | Sequence[float]

__all__ = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
           "slerp", "generalized_task_arithmetic", "magnitude_prune", "random_prune", "magnitude_band",
           "rescale_l1", "sign_consensus"]


# ---- helpers ---------------------------------------------------------------------------------------------
def _work_dtype(tensors: Sequence[Tensor], dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_model(value: Floats, n: int, what: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise VlsafeError(f"{what}: {len(values)} values for {n} models")
    return values


def _check_shapes(tensors: Sequence[Tensor], base: Tensor | None = None) -> None:
    ref = base if base is not None else tensors[0]
    for i, t in enumerate(tensors):
        if t.shape != ref.shape:
            raise VlsafeError(f"shape mismatch: input {i} has {tuple(t.shape)}, expected {tuple(ref.shape)}")


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise VlsafeError(f"density {density} is outside (0, 1]")


# ---- sparsification (on one task vector) -----------------------------------------------------------------
def rescale_l1(delta: Tensor, masked: Tensor, eps: float = 1e-7) -> Tensor:
    """`masked` scaled so its L1 norm equals `delta`'s (unchanged when either norm is below `eps`)."""
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _order(delta: Tensor, descending: bool) -> Tensor:
    """Indices by |delta|. Real deltas have many exact ties at the trim threshold; they are broken exactly
    as mergekit breaks them (the same unstable `torch.sort` on the same float32 magnitudes), so TIES and
    breadcrumbs keep the same entries in both tools."""
    w = delta.abs().reshape(-1)
    return torch.sort(w.float() if w.device.type == "cpu" else w, descending=descending).indices


TIE_BREAKS = ("sort", "index")


def _top_k_by_threshold(delta: Tensor, k: int) -> Tensor:
    """Mask of the k largest |delta| from a k-th-value threshold (O(n), no full sort); entries tied at the
    threshold are kept lowest index first."""
    w = delta.abs().reshape(-1)
    w = w.float() if w.device.type == "cpu" else w
    threshold = torch.kthvalue(w, w.numel() - k + 1).values
    keep = w > threshold
    need = k - int(keep.sum())
    if need > 0:
        keep[torch.nonzero(w == threshold).reshape(-1)[:need]] = True
    return keep


def magnitude_prune(delta: Tensor, density: float, rescale: bool = False, tie_break: str = "sort") -> Tensor:
    """Keep the max(1, ⌊d·n⌋) largest-magnitude entries (TIES trim); d ≥ 1 keeps everything.

    `tie_break="sort"` keeps exactly mergekit's entries (its full unstable sort decides ties at the threshold);
    `"index"` finds the threshold with `kthvalue` instead (~6x faster on 28 M entries) and keeps tied entries
    lowest index first — the same set whenever the threshold is not tied."""
    if tie_break not in TIE_BREAKS:
        raise VlsafeError(f"tie_break {tie_break!r} is not one of {', '.join(TIE_BREAKS)}")
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    if tie_break == "index":
        mask = _top_k_by_threshold(delta, k).to(delta.dtype)
    else:
        mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
        mask[_order(delta, descending=True)[:k]] = 1
    masked = delta * mask.reshape(delta.shape)
    return rescale_l1(delta, masked) if rescale else masked


def random_prune(delta: Tensor, density: float, rescale: bool = True,
                 generator: torch.Generator | None = None) -> Tensor:
    """DARE: keep each entry with probability d; with `rescale`, match the unmasked delta's L1 norm."""
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    masked = delta * mask
    return rescale_l1(delta, masked) if rescale else masked


def magnitude_band(delta: Tensor, density: float, gamma: float = 0.01, rescale: bool = False) -> Tensor:
    """Breadcrumbs: drop the top ⌊γn⌋ magnitudes (outliers) and the smallest, keeping ⌊dn⌋ entries.

    When γ ≥ 1 − d fewer outliers are dropped so that ⌊dn⌋ survive. ⌊γn⌋ = 0 simply drops no outliers
    (older mergekit sliced `[n_bot:-0]` there and silently kept nothing).
    """
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    n_bot = max(0, n - keep - int(gamma * n))
    order = _order(delta, descending=False)
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[n_bot:n_bot + keep]] = 1
    masked = delta * mask.reshape(delta.shape)
    return rescale_l1(delta, masked) if rescale else masked


def sign_consensus(weighted: Tensor) -> Tensor:
    """TIES sign election over a stack [n_models, ...] of weighted deltas → boolean keep-mask.

    γ = sign(Σ_t w_t τ̂_t) with zero counted as +; entry t is kept where sign(w_t τ̂_t) = γ (zeros never are).
    """
    majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    return weighted.sign() == majority


# ---- the task-arithmetic family --------------------------------------------------------------------------
Sparsifier = Callable[[Tensor, int], Tensor]


def generalized_task_arithmetic(base: Tensor, tensors: Sequence[Tensor], weights: Floats, *, lam: float = 1.0,
                                normalize: bool = False, consensus: bool = False,
                                sparsify: Sparsifier | None = None, dtype: torch.dtype | None = None,
                                out_dtype: torch.dtype | None = None) -> Tensor:
    """θ_base + λ·mix(w_t·sparsify(τ_t)); `sparsify(delta, t)` gets the model index t.

    mix = Σ (÷ Σw when `normalize`, zero divisor → 1), or with `consensus` the sign-elected sum
    (÷ Σ of agreeing weights when `normalize`, zero divisor → 1). The shared core of every method above.
    Without sparsification or consensus the work is elementwise and runs in chunks (bounded scratch).
    """
    if not tensors:
        return base.to(out_dtype or base.dtype)
    _check_shapes(tensors, base)
    w = _per_model(weights, len(tensors), "weight")
    dt = _work_dtype([base, *tensors], dtype)
    total = sum(w)
    divisor = 1.0 if abs(total) < 1e-8 else total
    if sparsify is None and not consensus:
        def ta(sl: slice, s: _Scratch) -> Tensor:
            b = s.load("base", base, sl)
            mixed = s.load("acc", tensors[0], sl).sub_(b).mul_(w[0])
            for t, wi in zip(tensors[1:], w[1:]):
                mixed.add_(s.load("x", t, sl).sub_(b), alpha=wi)
            return _scale(mixed, normalize, divisor, lam).add_(b)
        return _elementwise(base, dt, out_dtype or base.dtype, ta)
    b = base.to(dt)
    stack = torch.empty((len(tensors), *base.shape), dtype=dt, device=base.device)
    for i, t in enumerate(tensors):
        torch.sub(t.to(dt), b, out=stack[i])
        if sparsify is not None:
            stack[i] = sparsify(stack[i], i)
    wt = torch.tensor(w, dtype=dt, device=stack.device).reshape(-1, *([1] * base.dim()))
    stack.mul_(wt)
    if consensus:
        mask = sign_consensus(stack)
        mixed = stack.mul_(mask).sum(dim=0)
        div = (wt * mask).sum(dim=0)
        del mask
        div[div == 0] = 1
        mixed = _scale(mixed, normalize, div, lam)
    else:
        mixed = _scale(stack.sum(dim=0), normalize, divisor, lam)
    del stack
    return (b + mixed).to(out_dtype or base.dtype)


def _scale(mixed: Tensor, normalize: bool, divisor: float | Tensor, lam: float) -> Tensor:
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return mixed


def task_arithmetic(base: Tensor, tensors: Sequence[Tensor], weights: Floats, lam: float = 1.0,
                    normalize: bool = False, *, dtype: torch.dtype | None = None,
                    out_dtype: torch.dtype | None = None) -> Tensor:
    """θ_base + λ Σ w_t (θ_t − θ_base); `normalize` divides by Σ w_t (zero → 1)."""
    return generalized_task_arithmetic(base, tensors, weights, lam=lam, normalize=normalize, dtype=dtype,
                                       out_dtype=out_dtype)


def _densities(density: Floats, n: int) -> list[float]:
    ds = _per_model(density, n, "density")
    for d in ds:
        _check_density(d)
    return ds


def ties(base: Tensor, tensors: Sequence[Tensor], weights: Floats, density: Floats, lam: float = 1.0,
         normalize: bool = True, *, rescale: bool = False, tie_break: str = "sort", dtype: torch.dtype | None = None,
         out_dtype: torch.dtype | None = None) -> Tensor:
    """TIES: top-d trim per model (`tie_break`: see `magnitude_prune`), sign election, weighted disjoint mean
    (`normalize`), times λ."""
    ds = _densities(density, len(tensors))
    return generalized_task_arithmetic(
        base, tensors, weights, lam=lam, normalize=normalize, consensus=True, dtype=dtype, out_dtype=out_dtype,
        sparsify=lambda d, i: magnitude_prune(d, ds[i], rescale, tie_break))


def _dare(base: Tensor, tensors: Sequence[Tensor], weights: Floats, density: Floats, lam: float,
          normalize: bool, rescale: bool, consensus: bool, generator: torch.Generator | None,
          seed: int | None, dtype: torch.dtype | None, out_dtype: torch.dtype | None) -> Tensor:
    ds = _densities(density, len(tensors))
    if generator is None and seed is not None:
        generator = torch.Generator(device=base.device).manual_seed(seed)
    return generalized_task_arithmetic(
        base, tensors, weights, lam=lam, normalize=normalize, consensus=consensus, dtype=dtype,
        out_dtype=out_dtype, sparsify=lambda d, i: random_prune(d, ds[i], rescale, generator))


def dare_linear(base: Tensor, tensors: Sequence[Tensor], weights: Floats, density: Floats, lam: float = 1.0,
                normalize: bool = False, *, rescale: bool = True, generator: torch.Generator | None = None,
                seed: int | None = None, dtype: torch.dtype | None = None,
                out_dtype: torch.dtype | None = None) -> Tensor:
    """DARE + task arithmetic: random keep-d masks (from `generator`, or a fresh one seeded with `seed`)."""
    return _dare(base, tensors, weights, density, lam, normalize, rescale, False, generator, seed, dtype,
                 out_dtype)


def dare_ties(base: Tensor, tensors: Sequence[Tensor], weights: Floats, density: Floats, lam: float = 1.0,
              normalize: bool = False, *, rescale: bool = True, generator: torch.Generator | None = None,
              seed: int | None = None, dtype: torch.dtype | None = None,
              out_dtype: torch.dtype | None = None) -> Tensor:
    """DARE + TIES sign election."""
    return _dare(base, tensors, weights, density, lam, normalize, rescale, True, generator, seed, dtype,
                 out_dtype)


def breadcrumbs(base: Tensor, tensors: Sequence[Tensor], weights: Floats, density: Floats,
                gamma: Floats = 0.01, lam: float = 1.0, normalize: bool = False, *, rescale: bool = False,
                consensus: bool = False, dtype: torch.dtype | None = None,
                out_dtype: torch.dtype | None = None) -> Tensor:
    """Model Breadcrumbs: magnitude band per model (drop top γ and bottom), then task arithmetic."""
    ds = _densities(density, len(tensors))
    gs = _per_model(gamma, len(tensors), "gamma")
    return generalized_task_arithmetic(
        base, tensors, weights, lam=lam, normalize=normalize, consensus=consensus, dtype=dtype,
        out_dtype=out_dtype, sparsify=lambda d, i: magnitude_band(d, ds[i], gs[i], rescale))


def breadcrumbs_ties(base: Tensor, tensors: Sequence[Tensor], weights: Floats, density: Floats,
                     gamma: Floats = 0.01, lam: float = 1.0, normalize: bool = False, *, rescale: bool = False,
                     dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """Breadcrumbs with TIES sign election."""
    return breadcrumbs(base, tensors, weights, density, gamma, lam, normalize, rescale=rescale, consensus=True,
                       dtype=dtype, out_dtype=out_dtype)


# ---- linear and slerp ------------------------------------------------------------------------------------
def linear(tensors: Sequence[Tensor], weights: Floats, normalize: bool = True, *,
           dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """Σ w_t θ_t, divided by Σ w_t when `normalize` (an error when that sum is zero); chunked."""
    if not tensors:
        raise VlsafeError("linear: no input tensors")
    _check_shapes(tensors)
    w = _per_model(weights, len(tensors), "weight")
    if normalize and abs(sum(w)) < 1e-12:
        raise VlsafeError(f"linear: weights {w} sum to zero and normalize is on")
    dt = _work_dtype(tensors, dtype)

    def lin(sl: slice, s: _Scratch) -> Tensor:
        out = s.load("acc", tensors[0], sl).mul_(w[0])  # = 0 + w₀θ₀ exactly
        for t, wi in zip(tensors[1:], w[1:]):
            out.add_(s.load("x", t, sl), alpha=wi)
        return out.div_(sum(w)) if normalize else out
    return _elementwise(tensors[0], dt, out_dtype or tensors[0].dtype, lin)


def slerp(base: Tensor, other: Tensor, t: float, *, dot_threshold: float = 0.9995, eps: float = 1e-8,
          dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """Spherical interpolation: t = 0 gives `base`, t = 1 gives `other`.

    Ω comes from the normalised flattened tensors (norms ≤ eps count as 1); when |cos Ω| > `dot_threshold`
    it falls back to (1−t)·base + t·other; otherwise [sin((1−t)Ω)·base + sin(tΩ)·other] / sin Ω on the raw
    tensors. Computed in float32 (float64 stays float64), in chunks of 2²⁰ elements whose partial norms and
    dots are combined as mergekit combines them.
    """
    _check_shapes([other], base)
    dt = _work_dtype([base, other], dtype)
    a, b = _flat(base), _flat(other)
    step = 1 << 20
    chunks = [slice(i, i + step) for i in range(0, a.numel(), step)] or [slice(0, 0)]
    na = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[c].to(dt)) for c in chunks]))
    nb = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[c].to(dt)) for c in chunks]))
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = float(torch.stack([((a[c].to(dt) / na) * (b[c].to(dt) / nb)).sum() for c in chunks]).sum().clamp(-1, 1))
    t_ = torch.tensor(t, dtype=dt)
    if abs(dot) > dot_threshold:
        ca, cb = 1 - t_, t_
    else:
        theta = torch.acos(torch.tensor(dot, dtype=dt))
        ca, cb = torch.sin((1 - t_) * theta) / torch.sin(theta), torch.sin(t_ * theta) / torch.sin(theta)
    return _elementwise(base, dt, out_dtype or base.dtype,
                        lambda sl, s: s.load("acc", base, sl).mul_(ca).add_(s.load("x", other, sl).mul_(cb)))


# ---- chunked elementwise evaluation ----------------------------------------------------------------------
_CHUNK = 1 << 24  # elements per chunk: 64 MB of float32 scratch per operand


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1)


class _Scratch:
    """Reusable work buffers (one per key): chunks are copied (and upcast) into them instead of allocating
    fresh tensors per chunk, whose page faults cost more than the arithmetic."""

    def __init__(self, dtype: torch.dtype, device: torch.device, size: int):
        self.dtype, self.device, self.size = dtype, device, size
        self.bufs: dict[str, Tensor] = {}

    def load(self, key: str, t: Tensor, sl: slice) -> Tensor:
        src = _flat(t)[sl]
        if key not in self.bufs:
            self.bufs[key] = torch.empty(self.size, dtype=self.dtype, device=self.device)
        return self.bufs[key][:src.numel()].copy_(src)


def _elementwise(like: Tensor, dt: torch.dtype, out_dtype: torch.dtype,
                 fn: Callable[[slice, _Scratch], Tensor]) -> Tensor:
    """Evaluate an elementwise `fn(slice, scratch)` chunk by chunk into a tensor shaped like `like`."""
    n = like.numel()
    scratch = _Scratch(dt, like.device, min(n, _CHUNK))
    if n <= _CHUNK:
        return fn(slice(0, n), scratch).to(out_dtype).reshape(like.shape)
    out = torch.empty(n, dtype=out_dtype, device=like.device)
    for start in range(0, n, _CHUNK):
        out[start:start + _CHUNK] = fn(slice(start, start + _CHUNK), scratch)
    return out.reshape(like.shape)
