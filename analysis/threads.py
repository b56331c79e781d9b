"""Thread control for small torch kernels, and splitting piecewise statistics over two threads.

Streaming statistics work on cache-sized pieces and spectra on small matrices; there intra-op threading
costs more than it gains and, on a shared oversubscribed CPU, can be 10-100x slower (OpenMP workers spin
waiting for each other). `serial_torch()` runs a block single-threaded and restores the setting after.

`serial_torch` is kept for speed, and it also pins numbers: the numba kernels' sums do not depend on torch's
thread count, but MKL's SVD does in the last bits (one thread against two differ by ~1e-16 relative), so
the small SVDs it covers give the same result on every machine. `torch.set_num_threads` is not thread-local: with
torch's OpenMP build it sets the calling thread's OpenMP thread count (inherited by threads started inside
the block, such as `map_pieces`' workers on first use) but also MKL's and torch's own process-wide pool
sizes, so torch code that other threads run during the block may run single-threaded too. vlsafe enters
the block only around its short statistics kernels and SVDs, and every exit (also by an exception) restores
the caller's count.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import torch


@contextlib.contextmanager
def serial_torch(enabled: bool = True) -> Iterator[None]:
    """Run torch ops single-threaded inside the block, restoring the caller's thread count on exit (see the
    module docstring for what else the setting reaches while the block runs)."""
    if not enabled:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


COMPUTE_THREADS = max(1, min(2, os.cpu_count() or 1))
_POOL: ThreadPoolExecutor | None = None


def map_pieces(fn: Callable[[int, int], torch.Tensor], n: int, piece: int) -> torch.Tensor:
    """`torch.stack([fn(i, j) for each piece [i, j) of [0, n)])`, the pieces split over `COMPUTE_THREADS`.

    Each thread runs whole pieces with single-threaded kernels (call inside `serial_torch()`); torch
    releases the GIL inside kernels, so two threads use two cores. Order (and so every sum) is deterministic.
    """
    global _POOL
    bounds = [(i, min(i + piece, n)) for i in range(0, n, piece)]
    if COMPUTE_THREADS == 1 or len(bounds) < 2 * COMPUTE_THREADS:
        return torch.stack([fn(i, j) for i, j in bounds])
    if _POOL is None:
        _POOL = ThreadPoolExecutor(COMPUTE_THREADS, thread_name_prefix="vlsafe-stats")
    k = -(-len(bounds) // COMPUTE_THREADS)
    groups = [bounds[g:g + k] for g in range(0, len(bounds), k)]
    futures = [_POOL.submit(lambda grp: torch.stack([fn(i, j) for i, j in grp]), grp) for grp in groups]
    return torch.cat([f.result() for f in futures])
