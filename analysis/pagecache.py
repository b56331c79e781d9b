"""How much of a file sits in the page cache, asked with `mincore(2)` on a read-only mapping (no I/O is done).

Readers use it to choose per checkpoint between buffered reads (the data is cached: a copy from memory) and
O_DIRECT (it is not: the device's own speed, without allocating and filling the page cache). Python's `mmap`
does not expose the mapping's address, so libc's `mmap`/`mincore`/`munmap` are called through ctypes.
Where they are not available the answer is None (unknown) and callers read buffered.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import Iterable

import numpy as np

_PAGE = mmap.PAGESIZE
_MAP_FAILED = ctypes.c_void_p(-1).value
SAMPLE_SPANS = 256  # runs of pages asked per large file
SPAN_PAGES = 16


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def resident_pages(path: str | os.PathLike, spans: int = SAMPLE_SPANS) -> tuple[int, int] | None:
    """(pages of `path` in the page cache, pages in the file), or None where that cannot be asked. Files over
    `spans` × `SPAN_PAGES` pages are sampled: `spans` evenly spaced runs of `SPAN_PAGES` pages are asked and the
    count scaled to the file (asking every page of a large file costs more than the sampled estimate is worth)."""
    size = os.path.getsize(path)
    pages = -(-size // _PAGE)
    if not size:
        return 0, 0
    if _LIBC is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            return None
        try:
            have = _count(addr, pages, size, spans)
            return None if have is None else (have, pages)
        finally:
            _LIBC.munmap(addr, size)
    finally:
        os.close(fd)


def _count(addr: int, pages: int, size: int, spans: int) -> int | None:
    """Resident pages of the mapping at `addr`: exact when small, else estimated from `spans` sampled runs."""
    assert _LIBC is not None
    if pages <= spans * SPAN_PAGES:
        runs = [(0, pages)]
    else:
        stride = pages // spans
        runs = [(i * stride, SPAN_PAGES) for i in range(spans)]
    vec = (ctypes.c_ubyte * (sum(n for _, n in runs)))()
    at = 0
    for first, n in runs:
        length = min(n * _PAGE, size - first * _PAGE)
        if _LIBC.mincore(addr + first * _PAGE, length, ctypes.byref(vec, at)) != 0:
            return None
        at += n
    have = int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1))
    return have if at == pages else round(have * pages / at)


def cached_fraction(paths: Iterable[str | os.PathLike]) -> float | None:
    """Share of the files' pages that are in the page cache (1.0 for no pages), None if unknown."""
    have = total = 0
    for p in paths:
        r = resident_pages(Path(p))
        if r is None:
            return None
        have, total = have + r[0], total + r[1]
    return have / total if total else 1.0
