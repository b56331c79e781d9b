"""Fused one-pass statistics of tensor pieces, compiled with numba: every element is read once.

`pair_sums(a, b)` gives ‖a‖², ‖b‖², ‖b−a‖², the number of entries with |b−a| > atol + rtol·|a| and max|b−a|;
`triple_sums(w0, wa, wb)` gives ‖τ_A‖², ‖τ_B‖² and ⟨τ_A,τ_B⟩ of two task vectors. Each element is upcast to
fp64 on the fly and every difference, square, tolerance test and sum runs in fp64 (exact differences for
fp32/half inputs). Sums are two-level (partial sums over blocks of `BLOCK` elements, then over blocks), and
may be reassociated so LLVM vectorises them; the rounding error grows with `BLOCK` + n / `BLOCK` instead of n
(a plain running sum would blur cosines near 1), and the order is fixed for a given machine.
fp32 and fp64 pieces are read in place; half pieces (fp16, bf16, which numba cannot read) are first
converted into per-thread fp32 scratch buffers (exact).

The kernels release the GIL, so `piece_sums` runs them over pieces on two cores (`vlsafe.analysis.threads.map_pieces`).
Non-finite entries propagate into the sums; `piece_sums` then redoes such pieces with those entries left out.
Compiled code is cached on disk (numba `cache=True`); the first call of a process that finds no cache
compiles each signature. Max and count are kept per block too, which lets the inner loop vectorise.
Speed against the torch expression of the same statistics: `docs/performance.md`.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable

import numpy as np
import torch
from numba import njit

from vlsafe.analysis.threads import map_pieces, serial_torch

_FAST = {"reassoc", "contract"}  # reorder sums (vectorisation); no assumption about NaN/Inf
NATIVE = (torch.float32, torch.float64)
BLOCK = 1024  # elements per inner partial sum
PIECE = 1 << 18  # elements per kernel call (one thread's unit of work)


@njit(nogil=True, cache=True, fastmath=_FAST, error_model="numpy")
def _pair(a, b, rtol, atol):  # pragma: no cover - compiled
    sa = 0.0
    sb = 0.0
    sd = 0.0
    top = 0.0
    changed = 0
    for s in range(0, a.size, BLOCK):  # two-level sums: the rounding error grows with BLOCK + n / BLOCK, not n
        pa = 0.0
        pb = 0.0
        pd = 0.0
        pt = 0.0  # per-block max and count too: the inner loop then vectorises
        pc = 0
        for i in range(s, min(s + BLOCK, a.size)):
            x = np.float64(a[i])
            y = np.float64(b[i])
            d = y - x
            pa += x * x
            pb += y * y
            pd += d * d
            ad = abs(d)
            pt = ad if ad > pt else pt
            pc += np.int64(ad > atol + rtol * abs(x))
        sa += pa
        sb += pb
        sd += pd
        top = max(top, pt)
        changed += pc
    return sa, sb, sd, changed, top


@njit(nogil=True, cache=True, fastmath=_FAST, error_model="numpy")
def _triple(w0, wa, wb, chain):  # pragma: no cover - compiled
    sa = 0.0
    sb = 0.0
    dot = 0.0
    for s in range(0, w0.size, BLOCK):
        pa = 0.0
        pb = 0.0
        pd = 0.0
        for i in range(s, min(s + BLOCK, w0.size)):
            x0 = np.float64(w0[i])
            xa = np.float64(wa[i])
            ta = xa - x0
            tb = np.float64(wb[i]) - (xa if chain else x0)
            pa += ta * ta
            pb += tb * tb
            pd += ta * tb
        sa += pa
        sb += pb
        dot += pd
    return sa, sb, dot


class _Scratch(threading.local):
    """Per-thread fp32 buffers for half pieces: the streaming loop allocates nothing per piece."""

    def __init__(self) -> None:
        self.buf = torch.empty(0, dtype=torch.float32)

    def arrays(self, *ts: torch.Tensor) -> list[np.ndarray]:
        n = max(t.numel() for t in ts)
        if self.buf.numel() < len(ts) * n:
            self.buf = torch.empty(len(ts) * n, dtype=torch.float32)
        out = []
        for k, t in enumerate(ts):
            if t.dtype in NATIVE:
                out.append(t.contiguous().numpy())
            else:
                out.append(self.buf[k * n: k * n + t.numel()].copy_(t).numpy())
        return out


_SCRATCH = _Scratch()
_WARMING: threading.Thread | None = None


def warm_up() -> None:
    """Load the compiled kernels in a background thread (once per process), to overlap the first reads.

    numba's first call in a process is slow even from its disk cache (mostly numba importing and registering
    its own typing modules); a later kernel call waits for this one through numba's lock."""
    global _WARMING
    if _WARMING is None:
        _WARMING = threading.Thread(target=load, name="vlsafe-jit", daemon=True)
        _WARMING.start()


def load() -> None:
    """Load (or compile) the kernels for fp32 and fp64 now, in this thread."""
    for dtype in (np.float32, np.float64):
        z = np.zeros(1, dtype=dtype)
        _pair(z, z, 0.0, 0.0)
        _triple(z, z, z, False)


def pair_sums(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """fp64 `[‖a‖², ‖b‖², ‖b−a‖², #(|b−a| > atol + rtol·|a|), max|b−a|]` of two 1-D pieces (any float dtypes)."""
    x, y = _SCRATCH.arrays(a, b)
    return torch.tensor(_pair(x, y, float(rtol), float(atol)), dtype=torch.float64)


def triple_sums(w0: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, chain: bool) -> torch.Tensor:
    """fp64 `[‖τ_A‖², ‖τ_B‖², ⟨τ_A,τ_B⟩]` with τ_A = wa − w0 and τ_B = wb − (wa if `chain` else w0), 1-D pieces."""
    x0, xa, xb = _SCRATCH.arrays(w0, wa, wb)
    return torch.tensor(_triple(x0, xa, xb, bool(chain)), dtype=torch.float64)


def piece_sums(fn: Callable[..., torch.Tensor], *ts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`fn` (a kernel above, options bound) over `PIECE`-element pieces of the same-length 1-D tensors `ts`,
    split over two threads. A piece whose result is not finite is redone over the entries finite in every
    tensor. Returns the per-piece results (one row each) and the number of entries left out."""
    with serial_torch():
        s = map_pieces(lambda i, j: fn(*(t[i:j] for t in ts)), ts[0].numel(), PIECE)
        left_out = 0
        for p in (~torch.isfinite(s).all(1)).nonzero().flatten().tolist():
            xs = [t[p * PIECE:(p + 1) * PIECE] for t in ts]
            ok = functools.reduce(torch.logical_and, (torch.isfinite(x) for x in xs))
            left_out += int((~ok).sum())
            s[p] = fn(*(x[ok] for x in xs)) if bool(ok.any()) else 0.0
        return s, left_out
