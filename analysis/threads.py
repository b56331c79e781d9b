"""Thread control for small torch kernels, and splitting piecewise statistics over two threads.

Streaming statistics work on cache-sized pieces and spectra on small matrices; there intra-op threading
costs more than it gains and, on a shared oversubscribed CPU, can be 10-100x slower (OpenMP workers spin
waiting for each other). `serial_torch()` runs a block single-threaded and restores the setting after.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import torch


@contextlib.contextmanager
def serial_torch(enabled: bool = True) -> Iterator[None]:
    """Run torch ops single-threaded inside the block (process-wide; restored on exit)."""
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
