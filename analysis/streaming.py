"""Read aligned row chunks of the same tensor from several checkpoints, one chunk group in memory at a time.

`TensorReader` reads any tensor (or a range of its leading rows) of a checkpoint by canonical name. For
safetensors it uses plain positioned reads from the byte offsets in the header (no mmap, so resident memory
stays at the size of the chunk) and keeps one file handle open — an LRU of one, so consecutive tensors of
the same shard reuse it. When the checkpoints being streamed are larger than the available memory
(`wants_direct_io`), chunks are read with O_DIRECT: the page cache could not keep them anyway, and bypassing
it saves the kernel's copy out of it and its reclaim. Pickle checkpoints keep their one most recently loaded file.

`stream_rows` walks a list of jobs (tensor name + how many leading rows to read from each checkpoint) in
order, in chunks of about `chunk_elems` elements, reading the next chunk group in a background thread while
the caller computes on the current one (I/O and arithmetic overlap; at most two chunk groups are alive).

>>> readers = [TensorReader(a), TensorReader(b)]
>>> for name, start, stop, (ta, tb), last in stream_rows(readers, [("model.norm.weight", [1, 1])]):
...     ...
"""

from __future__ import annotations

import io
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from analysis.checkpoints import Checkpoint
from analysis.errors import VlsafeError
from analysis.sources import torch_dtype

DEFAULT_CHUNK_ELEMS = 1 << 23  # 8M elements: 16 MB of bf16, 32 MB of fp32 per checkpoint


ALIGN = 4096
DIRECT_MIN_BYTES = 1 << 20


def _read_direct(fd: int, pos: int, nbytes: int) -> torch.Tensor | None:
    """`nbytes` at `pos` read with O_DIRECT (page-aligned range into a page-aligned buffer; no page cache)."""
    first = pos - pos % ALIGN
    size = -(-(pos + nbytes - first) // ALIGN) * ALIGN
    raw = torch.empty(size + ALIGN, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % ALIGN
    view, got = memoryview(raw[skip:skip + size].numpy()), 0
    while got < size:
        n = os.preadv(fd, [view[got:]], first + got)
        if not n:
            break
        got += n
    if got < pos - first + nbytes:
        return None
    return raw[skip + pos - first: skip + pos - first + nbytes]


def leading_rows(shape: Sequence[int]) -> int:
    """Number of rows along dim 0 (a 0-d tensor counts as one row)."""
    return int(shape[0]) if len(shape) else 1


def row_numel(shape: Sequence[int]) -> int:
    """Elements in one row (product of the trailing dims; 1 for 0-d and 1-d tensors)."""
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return n


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: assume it fits (buffered reads)


def wants_direct_io(ckpts: Sequence[Checkpoint]) -> bool:
    """Direct I/O when the checkpoints' safetensors files together exceed the available memory, so the page
    cache cannot keep them anyway (`VLSAFE_DIRECT_IO=1`/`0` forces it on/off)."""
    flag = os.environ.get("VLSAFE_DIRECT_IO", "").strip().lower()
    if flag in ("0", "1", "true", "false", "on", "off"):
        return flag in ("1", "true", "on")
    files = {f for c in ckpts if c.source.kind == "safetensors" for f in c.source.files}
    return sum(f.stat().st_size for f in files) > _mem_available()


def open_readers(ckpts: Sequence[Checkpoint]) -> list["TensorReader"]:
    """One reader per checkpoint, all with direct I/O when `wants_direct_io(ckpts)` (the set is too big to cache)."""
    direct = wants_direct_io(ckpts)
    return [TensorReader(c, direct=direct) for c in ckpts]


class TensorReader:
    """Lazy reader of one checkpoint's tensors by canonical name; keeps one file handle open.

    With `direct`, chunks of 1 MB and more are read with O_DIRECT (no page cache: no copy out of it, no reclaim
    of it); where the file system refuses O_DIRECT the reader falls back to buffered reads."""

    def __init__(self, ckpt: Checkpoint, direct: bool = False):
        self.ckpt = ckpt
        self._path: Path | None = None
        self._fh: io.FileIO | None = None
        self._data_start: dict[Path, int] = {}
        self._pickle: tuple[Path | None, dict[str, torch.Tensor] | None] = (None, None)
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._dfd: tuple[Path, int] | None = None

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the open file handle and any cached pickle."""
        if self._fh is not None:
            self._fh.close()
        if self._dfd is not None:
            os.close(self._dfd[1])
        self._fh, self._path, self._pickle, self._dfd = None, None, (None, None), None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.ckpt.infos[name].shape)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows `[start, stop)` along dim 0 of tensor `name` (the whole tensor by default)."""
        raw = self.ckpt.raw_name(name)
        shape = self.shape(name)
        stop = leading_rows(shape) if stop is None else stop
        if self.ckpt.source.kind != "safetensors":
            t = self._pickle_tensor(raw)
            return t if not shape else t[start:stop]
        return self._read_safetensors(raw, shape, start, stop)

    def _read_safetensors(self, raw: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        rt = self.ckpt.source.tensors[raw]
        dtype = torch_dtype(rt.dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        row_bytes = row_numel(shape) * itemsize
        nbytes = (stop - start) * row_bytes
        fh = self._handle(rt.file)
        pos = self._data_start[rt.file] + rt.offset + start * row_bytes
        out_shape = (stop - start, *shape[1:]) if shape else ()
        fd = self._direct_fd(rt.file) if self.direct and nbytes >= DIRECT_MIN_BYTES else None
        if fd is not None:
            buf = _read_direct(fd, pos, nbytes)
            if buf is None:
                raise VlsafeError(f"{rt.file}: truncated while reading tensor '{raw}'")
            return buf.view(dtype).reshape(out_shape)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        fh.seek(pos)
        view, got = memoryview(buf.numpy()), 0
        while got < nbytes:
            n = fh.readinto(view[got:])
            if not n:
                raise VlsafeError(f"{rt.file}: truncated while reading tensor '{raw}'")
            got += n
        return buf.view(dtype).reshape(out_shape)

    def _direct_fd(self, path: Path) -> int | None:
        if self._dfd is None or self._dfd[0] != path:
            if self._dfd is not None:
                os.close(self._dfd[1])
                self._dfd = None
            try:
                self._dfd = (path, os.open(path, os.O_RDONLY | os.O_DIRECT))
            except OSError:  # e.g. tmpfs: buffered reads instead
                self.direct = False
                return None
        return self._dfd[1]

    def _handle(self, path: Path) -> io.FileIO:
        if self._path != path:
            if self._fh is not None:
                self._fh.close()
            self._fh, self._path = io.FileIO(path, "rb"), path
            if path not in self._data_start:
                (n,) = struct.unpack("<Q", self._fh.read(8))
                self._data_start[path] = 8 + n
        assert self._fh is not None
        return self._fh

    def _pickle_tensor(self, raw: str) -> torch.Tensor:
        file = self.ckpt.source.tensors[raw].file
        if self._pickle[0] != file:
            self._pickle = (None, None)  # drop the old file before loading the next
            self._pickle = (file, self.ckpt.source._load(file))
        sd = self._pickle[1]
        assert sd is not None
        return sd[raw]


@dataclass(frozen=True)
class Job:
    """Read tensor `name`: `rows[i]` leading rows from reader i (0 = skip that reader)."""

    name: str
    rows: tuple[int, ...]
    whole: bool = False  # read the tensor in one chunk (e.g. for an SVD)


def _chunks(job: Job, shape: tuple[int, ...], chunk_elems: int) -> list[tuple[int, int]]:
    n_rows = max(job.rows)
    if job.whole or n_rows <= 1:
        return [(0, n_rows)]
    step = max(1, chunk_elems // max(1, row_numel(shape)))
    return [(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _read_group(readers: Sequence[TensorReader], job: Job, start: int, stop: int) -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = []
    for reader, rows in zip(readers, job.rows):
        hi = min(stop, rows)
        if not reader.shape(job.name):
            out.append(reader.read(job.name) if rows else None)
        else:
            out.append(reader.read(job.name, start, hi) if hi > start else None)
    return out


def stream_rows(readers: Sequence[TensorReader], jobs: Sequence[Job], chunk_elems: int = DEFAULT_CHUNK_ELEMS,
                prefetch: bool = True) -> Iterator[tuple[str, int, int, list[torch.Tensor | None], bool]]:
    """Yield `(name, start, stop, tensors, last)` per row chunk of each job, one tensor per reader.

    A reader whose row count is exhausted (a shorter vocabulary) or that skips the job yields None.
    `last` marks a job's final chunk. With `prefetch`, the next chunk group is read in a background thread.
    """
    plan = [(job, a, b) for job in jobs for a, b in _chunks(job, _first_shape(readers, job), chunk_elems)]
    if not prefetch:
        for k, (job, a, b) in enumerate(plan):
            yield job.name, a, b, _read_group(readers, job, a, b), _is_last(plan, k)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlsafe-read") as pool:
        fut: Future | None = pool.submit(_read_group, readers, *plan[0]) if plan else None
        for k, (job, a, b) in enumerate(plan):
            assert fut is not None
            group = fut.result()
            fut = pool.submit(_read_group, readers, *plan[k + 1]) if k + 1 < len(plan) else None
            yield job.name, a, b, group, _is_last(plan, k)
            del group


def _first_shape(readers: Sequence[TensorReader], job: Job) -> tuple[int, ...]:
    return next((r.shape(job.name) for r, n in zip(readers, job.rows) if n), ())


def _is_last(plan: list[tuple[Job, int, int]], k: int) -> bool:
    return k + 1 == len(plan) or plan[k + 1][0] is not plan[k][0]
