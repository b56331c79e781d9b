"""Read aligned row chunks of the same tensor from several checkpoints, one chunk group in memory at a time.

`TensorReader` reads any tensor (or a range of its leading rows) of a checkpoint by canonical name. For
safetensors it uses plain positioned reads from the byte offsets in the header (no mmap, so resident memory
stays at the size of the chunk) and keeps one file handle open — an LRU of one, so consecutive tensors of
the same shard reuse it. Chunks of a checkpoint are read with O_DIRECT (`direct_flags`) when the checkpoints
being streamed are larger than the available memory (the page cache could not keep them anyway) or when the
checkpoint is not in the page cache (cold): bypassing the cache saves allocating and filling it and the
kernel's copy out of it (`docs/performance.md` has the kernel CPU time this saved). Pickle checkpoints keep their one most recently loaded file.

`stream_rows` walks a list of jobs (tensor name + how many leading rows to read from each checkpoint) in
order, in chunks of about `chunk_elems` elements. The safetensors reads are planned up front and served by
`vlsafe.analysis.directio.WindowRing`: `READ_THREADS` background threads read 16 MiB windows of many tensors, for
all checkpoints, in the order the loop needs them and up to `READ_AHEAD` windows ahead, into a few reused
slots. The device stays busy through runs of small tensors while the caller computes, and nothing is
allocated per chunk. Two reads in flight and 2 windows ahead were chosen in paired fresh-process runs
(`docs/performance.md`). Throughput against plain reads of the same files: `benchmarks/results/weightshift.csv`.

>>> readers = [TensorReader(a), TensorReader(b)]
>>> for name, start, stop, (ta, tb), last in stream_rows(readers, [Job("model.norm.weight", (1, 1))]):
...     ...
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from vlsafe.analysis.checkpoints import Checkpoint
from vlsafe.analysis.directio import Request, WindowRing, open_direct, pread_all, read_direct
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.pagecache import cached_fraction
from vlsafe.analysis.sources import torch_dtype

DEFAULT_CHUNK_ELEMS = 1 << 22  # 4M elements: 8 MB of bf16, 16 MB of fp32 per checkpoint


DIRECT_MIN_BYTES = 1 << 20
READ_AHEAD = 2  # windows read ahead of the ones being served
READ_THREADS = 2  # reads in flight at once (a second one helps on a busy virtual disk)


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


def _flag() -> bool | None:
    flag = os.environ.get("VLSAFE_DIRECT_IO", "").strip().lower()
    if flag in ("0", "1", "true", "false", "on", "off"):
        return flag in ("1", "true", "on")
    return None


def _files(ckpts: Sequence[Checkpoint]) -> set[Path]:
    return {f for c in ckpts if c.source.kind == "safetensors" for f in c.source.files}


def wants_direct_io(ckpts: Sequence[Checkpoint]) -> bool:
    """Direct I/O when the checkpoints' safetensors files together exceed the available memory, so the page
    cache cannot keep them anyway (`VLSAFE_DIRECT_IO=1`/`0` forces it on/off)."""
    flag = _flag()
    if flag is not None:
        return flag
    return sum(f.stat().st_size for f in _files(ckpts)) > _mem_available()


def direct_flags(ckpts: Sequence[Checkpoint]) -> list[bool]:
    """Per checkpoint, whether to read it with O_DIRECT: all when `wants_direct_io(ckpts)` (or none when
    `VLSAFE_DIRECT_IO=0`); else those of which less than half is in the page cache (cold files: O_DIRECT reads
    them at the device's speed without allocating and filling page cache; cached ones are copied from memory)."""
    every = wants_direct_io(ckpts)
    if every or _flag() is not None:
        return [every] * len(ckpts)
    fractions = (cached_fraction(sorted(_files([c]))) for c in ckpts)
    return [f is not None and f < 0.5 for f in fractions]


def open_readers(ckpts: Sequence[Checkpoint]) -> list["TensorReader"]:
    """One reader per checkpoint, with O_DIRECT as `direct_flags(ckpts)` decides."""
    return [TensorReader(c, direct=d) for c, d in zip(ckpts, direct_flags(ckpts))]


class TensorReader:
    """Lazy reader of one checkpoint's tensors by canonical name; keeps one file handle open.

    With `direct`, chunks of 1 MB and more are read with O_DIRECT (no page cache: no copy out of it, no reclaim
    of it); where the file system refuses O_DIRECT the reader falls back to buffered reads."""

    def __init__(self, ckpt: Checkpoint, direct: bool = False):
        self.ckpt = ckpt
        self._path: Path | None = None
        self._fh: io.FileIO | None = None
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

    def read(self, name: str, start: int = 0, stop: int | None = None,
             planned: Callable[[Path, int, int], torch.Tensor | None] | None = None) -> torch.Tensor:
        """Rows `[start, stop)` along dim 0 of tensor `name` (the whole tensor by default), as a fresh tensor.

        `planned` (a `WindowRing.stream`, as `stream_rows` passes it) serves the bytes of a planned read from
        reused memory instead: the result is then a view, valid only as long as the ring promises."""
        raw = self.ckpt.raw_name(name)
        shape = self.shape(name)
        stop = leading_rows(shape) if stop is None else stop
        if self.ckpt.source.kind != "safetensors":
            t = self._pickle_tensor(raw)
            return t if not shape else t[start:stop]
        return self._read_safetensors(name, start, stop, planned)

    def byte_range(self, name: str, start: int = 0, stop: int | None = None) -> tuple[Path, int, int] | None:
        """(file, byte offset, byte count) that `read(name, start, stop)` reads; None for non-safetensors."""
        if self.ckpt.source.kind != "safetensors":
            return None
        rt = self.ckpt.source.tensors[self.ckpt.raw_name(name)]
        shape = self.shape(name)
        stop = leading_rows(shape) if stop is None else stop
        row_bytes = row_numel(shape) * torch_dtype(rt.dtype).itemsize
        return rt.file, rt.offset + start * row_bytes, (stop - start) * row_bytes

    def _read_safetensors(self, name: str, start: int, stop: int,
                          planned: Callable[[Path, int, int], torch.Tensor | None] | None) -> torch.Tensor:
        rng = self.byte_range(name, start, stop)
        assert rng is not None
        path, pos, nbytes = rng
        raw, shape = self.ckpt.raw_name(name), self.shape(name)
        dtype = torch_dtype(self.ckpt.source.tensors[raw].dtype)
        out_shape = (stop - start, *shape[1:]) if shape else ()
        buf = planned(path, pos, nbytes) if planned is not None else None
        if buf is None and self.direct and nbytes >= DIRECT_MIN_BYTES and (fd := self._direct_fd(path)) is not None:
            buf = read_direct(fd, pos, nbytes)
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            buf = buf[:pread_all(self._handle(path).fileno(), buf, pos)]
        if buf.numel() < nbytes:
            raise VlsafeError(f"{path}: truncated while reading tensor '{raw}'")
        return buf.view(dtype).reshape(out_shape)

    def _direct_fd(self, path: Path) -> int | None:
        if self._dfd is None or self._dfd[0] != path:
            if self._dfd is not None:
                os.close(self._dfd[1])
                self._dfd = None
            fd = open_direct(path)
            if fd is None:  # e.g. tmpfs: buffered reads instead
                self.direct = False
                return None
            self._dfd = (path, fd)
        return self._dfd[1]

    def _handle(self, path: Path) -> io.FileIO:
        if self._path != path:
            if self._fh is not None:
                self._fh.close()
            self._fh, self._path = io.FileIO(path, "rb"), path
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


Rows = tuple[int, int | None] | None  # a reader's row range for one chunk (None: nothing to read)


def _rows(reader: TensorReader, job: Job, rows: int, start: int, stop: int) -> Rows:
    """The row range `reader` reads for chunk [start, stop) of `job` (None: nothing; 0-d tensors whole)."""
    if not reader.shape(job.name):
        return (0, None) if rows else None
    hi = min(stop, rows)
    return (start, hi) if hi > start else None


def _requests(readers: Sequence[TensorReader], plan: list[tuple[Job, int, int, list[Rows]]]) -> list[Request]:
    """Every safetensors read of the plan, in the order `stream_rows` makes them."""
    out: list[Request] = []
    for job, _, _, rows in plan:
        for i, (reader, r) in enumerate(zip(readers, rows)):
            rng = None if r is None else reader.byte_range(job.name, *r)
            if rng is not None:
                out.append((i, *rng))
    return out


def stream_rows(readers: Sequence[TensorReader], jobs: Sequence[Job], chunk_elems: int = DEFAULT_CHUNK_ELEMS,
                prefetch: bool | int = True) -> Iterator[tuple[str, int, int, list[torch.Tensor | None], bool]]:
    """Yield `(name, start, stop, tensors, last)` per row chunk of each job, one tensor per reader.

    A reader whose row count is exhausted (a shorter vocabulary) or that skips the job yields None.
    `last` marks a job's final chunk. The tensors are views into reused memory, valid until the next chunk
    group is requested: copy what you keep. With `prefetch` (True = `READ_AHEAD` windows, or a number),
    `READ_THREADS` background threads read that many 16 MiB windows ahead, so the device stays busy while
    the caller computes; False reads each window when it is needed. Readers with `direct` use O_DIRECT.
    """
    ahead = READ_AHEAD if prefetch is True else int(prefetch)
    plan = [(job, a, b, [_rows(r, job, n, a, b) for r, n in zip(readers, job.rows)])
            for job in jobs for a, b in _chunks(job, _first_shape(readers, job), chunk_elems)]
    ring = WindowRing(_requests(readers, plan), [r.direct for r in readers], ahead, threads=READ_THREADS)
    planned = [ring.stream(i) for i in range(len(readers))]
    try:
        for k, (job, a, b, rows) in enumerate(plan):
            group = [None if r is None else reader.read(job.name, r[0], r[1], planned[i])
                     for i, (reader, r) in enumerate(zip(readers, rows))]
            yield job.name, a, b, group, k + 1 == len(plan) or plan[k + 1][0] is not job
            del group
    finally:
        ring.close()


def _first_shape(readers: Sequence[TensorReader], job: Job) -> tuple[int, ...]:
    return next((r.shape(job.name) for r, n in zip(readers, job.rows) if n), ())
