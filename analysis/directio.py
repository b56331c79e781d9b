"""Planned reads: page-aligned byte ranges into page-aligned, reused buffers, with O_DIRECT where asked.

`read_direct` reads one byte range with O_DIRECT. `WindowRing` serves a known sequence of reads made by
several readers (one per checkpoint) from planned windows of many tensors, read ahead by background
threads into a few reused slots. One O_DIRECT request per tensor would make a diff latency-bound, and
windows without read-ahead would leave the device idle while the caller works through runs of small
tensors. Memory freshly taken from the OS can be expensive (on VMs with free-page reporting it is faulted
in again page by page), so the ring uses few slots (readers + read-ahead) and keeps them in a small
process-wide pool for the next stream. The measurements behind these choices: `docs/performance.md`.
"""

from __future__ import annotations

import os
import queue
import threading
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch

ALIGN = 4096
WINDOW_BYTES = 16 << 20


class Buffer:
    """A reusable page-aligned byte buffer that grows on demand (reads into it allocate nothing)."""

    def __init__(self) -> None:
        self._raw = torch.empty(0, dtype=torch.uint8)

    @property
    def capacity(self) -> int:
        return self._raw.numel()

    def take(self, nbytes: int) -> torch.Tensor:
        """A page-aligned uint8 view of at least `nbytes` (contents undefined; invalidates earlier views' data)."""
        if self._raw.numel() < nbytes + ALIGN:
            self._raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
        skip = (-self._raw.data_ptr()) % ALIGN
        return self._raw[skip:skip + nbytes]


def _span(pos: int, nbytes: int) -> tuple[int, int]:
    """The page-aligned (start, size) covering `nbytes` at `pos`."""
    first = pos - pos % ALIGN
    return first, -(-(pos + nbytes - first) // ALIGN) * ALIGN


def pread_all(fd: int, buf: torch.Tensor, first: int) -> int:
    """Read into the uint8 tensor `buf` from offset `first` of `fd` until it is full or the file ends; bytes read."""
    view, got = memoryview(buf.numpy()), 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], first + got)
        if not n:
            break
        got += n
    return got


def read_direct(fd: int, pos: int, nbytes: int) -> torch.Tensor:
    """`nbytes` at `pos` of an O_DIRECT `fd` (fewer if the file ends first), in a fresh aligned buffer."""
    first, size = _span(pos, nbytes)
    buf = Buffer().take(size)
    got = pread_all(fd, buf, first)
    return buf[pos - first: max(pos - first, min(got, pos - first + nbytes))]


Range = tuple[Path, int, int]  # file, byte offset, byte count


def plan_windows(ranges: Sequence[Range], window: int = WINDOW_BYTES) -> tuple[list[Range], list[int]]:
    """Group reads (in the order they will be made) into windows: runs of ascending ranges of one file whose
    page-aligned span fits `window` (a larger range is a window of its own), so no range is split. Returns
    the windows (file, aligned start, aligned size) and, per range, the index of its window."""
    wins: list[Range] = []
    index: list[int] = []
    prev_end = 0
    for path, pos, n in ranges:
        first, size = _span(pos, n)
        if wins and wins[-1][0] == path and pos >= prev_end and first + size - wins[-1][1] <= window:
            wins[-1] = (path, wins[-1][1], max(wins[-1][2], first + size - wins[-1][1]))
        else:
            wins.append((path, first, size))
        index.append(len(wins) - 1)
        prev_end = pos + n
    return wins, index


Request = tuple[int, Path, int, int]  # reader index, file, byte offset, byte count
SPARE_SLOTS = 8  # read buffers of window size kept for the next stream (process-wide)
_SPARE: list[Buffer] = []
_SPARE_LOCK = threading.Lock()


def _take_buffers(n: int) -> list[Buffer]:
    with _SPARE_LOCK:
        got = _SPARE[:n]
        del _SPARE[:n]
    return got + [Buffer() for _ in range(n - len(got))]


def _give_buffers(bufs: Sequence[Buffer]) -> None:
    """Keep window-sized buffers for the next stream (larger ones, e.g. a whole matrix, are freed)."""
    with _SPARE_LOCK:
        for b in bufs:
            if len(_SPARE) < SPARE_SLOTS and b.capacity <= 2 * WINDOW_BYTES + ALIGN:
                _SPARE.append(b)


class WindowRing:
    """Serve a known sequence of reads, made by several readers in turn, from windows read ahead.

    Per reader, `plan_windows` groups its reads into windows (no read is split). `threads` background threads
    read the windows of all readers in the order the reads first need them, each taking a free slot and then
    the next window, with O_DIRECT for the readers marked `direct` (buffered where the file system refuses
    it). There are `readers + ahead` reused slots: up to `ahead` windows are read while the caller works. A
    reader's window is released when that reader's next read moves to another window, so a view returned by
    `get` stays valid until the same reader's next `get` (and until `close`). The caller holds at most one
    window per reader and the windows are read in the order it first needs them, so a slot is always free
    for the window it waits on (no deadlock, even with `ahead=0`). The caller must make the planned reads in
    order; `get` answers None to a read that is not the reader's next planned one, and a shorter view when
    the file ends early. An error in a reading thread is raised by the caller's next `get`."""

    def __init__(self, requests: Sequence[Request], direct: Sequence[bool], ahead: int = 2,
                 window: int = WINDOW_BYTES, threads: int = 1) -> None:
        if threads < 1 or ahead < 0:
            raise ValueError(f"WindowRing needs threads >= 1 and ahead >= 0 (got {threads}, {ahead})")
        self._reqs: dict[int, list[tuple[Path, int, int]]] = {}
        for i, path, pos, n in requests:
            self._reqs.setdefault(i, []).append((path, pos, n))
        self._gid: dict[int, list[int]] = {i: [] for i in self._reqs}
        self._wins: list[tuple[int, tuple[Path, int, int]]] = []  # (reader, window), in order of first use
        self._plan_order(requests, window)
        self._direct = direct
        self._next = dict.fromkeys(self._reqs, 0)
        self._held: dict[int, int] = {}  # reader -> window it is served from
        self._slots = _take_buffers(len(self._reqs) + ahead)
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for k in range(len(self._slots)):
            self._free.put(k)
        self._loaded: list[tuple[int, torch.Tensor] | None] = [None] * len(self._wins)  # slot, bytes read
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._claimed = 0  # windows handed to the reading threads so far
        self._threads = [threading.Thread(target=self._run, name="vlsafe-readahead", daemon=True)
                         for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _plan_order(self, requests: Sequence[Request], window: int) -> None:
        local = {i: plan_windows(r, window) for i, r in self._reqs.items()}
        gids: dict[tuple[int, int], int] = {}
        seen = dict.fromkeys(self._reqs, 0)
        for i, *_ in requests:
            w = local[i][1][seen[i]]
            seen[i] += 1
            if (i, w) not in gids:
                gids[(i, w)] = len(self._wins)
                self._wins.append((i, local[i][0][w]))
            self._gid[i].append(gids[(i, w)])

    def stream(self, reader: int) -> Callable[[Path, int, int], torch.Tensor | None]:
        """`get` bound to one reader: `(path, pos, nbytes) -> view | None`."""
        return partial(self.get, reader)

    def get(self, reader: int, path: Path, pos: int, nbytes: int) -> torch.Tensor | None:
        """The `nbytes` at `pos` of `path` as a uint8 view (shorter if the file ends first); None if this is
        not `reader`'s next planned read."""
        reqs, k = self._reqs.get(reader, []), self._next.get(reader, 0)
        if k >= len(reqs) or reqs[k] != (path, pos, nbytes):
            return None
        self._next[reader] = k + 1
        g = self._gid[reader][k]
        if self._held.get(reader) != g:
            old = self._held.pop(reader, None)
            if old is not None:
                self._release(old)  # before waiting: the reader thread may need this slot for window g
        view = self._wait(g)
        self._held[reader] = g
        skip = pos - self._wins[g][1][1]
        return view[skip:skip + nbytes]

    def _release(self, g: int) -> None:
        loaded = self._loaded[g]
        assert loaded is not None
        self._loaded[g] = None
        self._free.put(loaded[0])

    def _wait(self, g: int) -> torch.Tensor:
        with self._cond:
            while self._loaded[g] is None and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            return self._loaded[g][1]  # type: ignore[index]

    def _claim(self) -> tuple[int, int] | None:
        """A free slot and the next window to read into it (in order), or None when done or stopped."""
        slot = self._free.get()
        with self._cond:
            if self._stop or self._claimed >= len(self._wins):
                self._free.put(slot)  # wake the next thread to stop too
                return None
            self._claimed += 1
            return slot, self._claimed - 1

    def _run(self) -> None:
        fds: dict[tuple[Path, bool], int] = {}
        try:
            while (claim := self._claim()) is not None:
                slot, g = claim
                i, (path, first, size) = self._wins[g]
                key = (path, self._direct[i])
                if key not in fds:
                    fd = open_direct(path) if key[1] else None
                    fds[key] = os.open(path, os.O_RDONLY) if fd is None else fd
                fd = fds[key]
                buf = self._slots[slot].take(size)
                got = pread_all(fd, buf, first)
                with self._cond:
                    self._loaded[g] = (slot, buf[:got])
                    self._cond.notify_all()
        except BaseException as e:  # handed to the caller's next `get`
            with self._cond:
                self._error = e
                self._cond.notify_all()
        finally:
            for fd in fds.values():
                os.close(fd)

    def close(self) -> None:
        """Stop reading ahead and give the slots back to the pool (views from `get` become invalid)."""
        with self._cond:
            self._stop = True
        self._free.put(-1)
        for t in self._threads:
            t.join()
        _give_buffers(self._slots)


def open_direct(path: Path) -> int | None:
    """A read-only O_DIRECT descriptor of `path`, or None where the platform or file system refuses O_DIRECT
    (e.g. tmpfs); other errors, such as a missing file, surface when the caller opens it buffered instead."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None
