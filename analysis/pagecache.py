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


def resident_pages(path: str | os.PathLike) -> tuple[int, int] | None:
    """(pages of `path` in the page cache, pages in the file), or None where that cannot be asked."""
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
            vec = (ctypes.c_ubyte * pages)()
            if _LIBC.mincore(addr, size, vec) != 0:
                return None
            return int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1)), pages
        finally:
            _LIBC.munmap(addr, size)
    finally:
        os.close(fd)


def cached_fraction(paths: Iterable[str | os.PathLike]) -> float | None:
    """Share of the files' pages that are in the page cache (1.0 for no pages), None if unknown."""
    have = total = 0
    for p in paths:
        r = resident_pages(Path(p))
        if r is None:
            return None
        have, total = have + r[0], total + r[1]
    return have / total if total else 1.0
