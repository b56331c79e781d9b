"""Streaming tensor I/O for merges: a reader keeping one shard open per checkpoint, and a safetensors writer
whose headers are planned up front so every tensor goes to disk as soon as it is computed.

The writer knows every output tensor's name, dtype and shape before the first byte is written (the output
follows the base model's layout), so it lays out shards and offsets in advance and never buffers a shard
in memory: peak memory is one tensor group, however large the model.
"""

from __future__ import annotations

import json
import re
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import torch

from vlsafe.analysis import streaming
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.sources import st_dtype

T = TypeVar("T")
G = TypeVar("G")
O = TypeVar("O")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from `5GB`, `500MB`, `50KB`, `2GiB` or a plain integer (decimal units, as HF's max_shard_size)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise VlsafeError(f"shard size {size!r}: use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise VlsafeError(f"shard size {size!r} must be positive")
    return n


class MergeReader(streaming.TensorReader):
    """`vlsafe.analysis.streaming.TensorReader` specialised for merges: `get` returns a whole fresh
    tensor (plain file reads at the header's offsets, no memory map, one shard open), and a missing
    `lm_head.weight` falls back to `model.embed_tokens.weight` (tied embeddings), as mergekit's `tied_names` do.
    `direct=True` reads with O_DIRECT (see `vlsafe.analysis.streaming.wants_direct_io`)."""

    def _name(self, canonical: str) -> str | None:
        if canonical in self.ckpt.infos:
            return canonical
        if canonical == "lm_head.weight" and "model.embed_tokens.weight" in self.ckpt.infos:
            return "model.embed_tokens.weight"
        return None

    def _resolve(self, canonical: str) -> str:
        name = self._name(canonical)
        if name is None:
            raise VlsafeError(f"{self.ckpt.spec}: no tensor '{canonical}'")
        return name

    def has(self, canonical: str) -> bool:
        return self._name(canonical) is not None

    def shape(self, canonical: str) -> tuple[int, ...]:
        return super().shape(self._resolve(canonical))

    def get(self, canonical: str) -> torch.Tensor:
        """The whole tensor, as a fresh CPU tensor."""
        return self.read(self._resolve(canonical))


@dataclass
class _Shard:
    file: str
    names: list[str]
    header: bytes
    size: int  # data bytes


class ShardedWriter:
    """Writes tensors, in a fixed planned order, into safetensors shards (+ index when more than one).

    `entries` lists (name, dtype, shape) in write order; `write(name, tensor)` must follow that order and
    match dtype and shape. Shards hold at most `max_shard_bytes` of data (a larger single tensor gets its
    own shard). One shard is a plain `model.safetensors`; more are `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json`.
    """

    def __init__(self, out_dir: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int | str = "5GB", metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.entries = entries
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = self._layout(parse_size(max_shard_bytes))
        self._pos = 0
        self._shard = -1
        self._fh: Any = None
        self._written = 0

    def _layout(self, limit: int) -> list[_Shard]:
        groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for e in self.entries:
            n = _nbytes(e[1], e[2])
            if groups[-1] and size + n > limit:
                groups.append([])
                size = 0
            groups[-1].append(e)
            size += n
        total = len(groups)
        shards = []
        for i, group in enumerate(groups):
            file = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": self.metadata}
            offset = 0
            for name, dtype, shape in group:
                n = _nbytes(dtype, shape)
                header[name] = {"dtype": st_dtype(dtype), "shape": list(shape), "data_offsets": [offset, offset + n]}
                offset += n
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            shards.append(_Shard(file, [g[0] for g in group], raw, offset))
        return shards

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor."""
        if self._pos >= len(self.entries):
            raise VlsafeError(f"writer: unexpected extra tensor '{name}'")
        want, dtype, shape = self.entries[self._pos]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise VlsafeError(f"writer: got '{name}' {tensor.dtype} {tuple(tensor.shape)}, expected '{want}' "
                              f"{dtype} {tuple(shape)}")
        if self._shard < 0 or name not in self._current_names:
            self._open_next()
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._fh.write(memoryview(data))
        self._written += data.nbytes
        self._pos += 1

    def _open_next(self) -> None:
        self._finish_shard()
        self._shard += 1
        sh = self.shards[self._shard]
        self._current_names = set(sh.names)
        self._fh = (self.out_dir / sh.file).open("wb")
        self._fh.write(struct.pack("<Q", len(sh.header)))
        self._fh.write(sh.header)
        self._written = 0

    def _finish_shard(self) -> None:
        if self._fh is None:
            return
        sh = self.shards[self._shard]
        self._fh.close()
        self._fh = None
        if self._written != sh.size:
            raise VlsafeError(f"writer: shard {sh.file} got {self._written} bytes, planned {sh.size}")

    def close(self) -> list[Path]:
        """Finish the last shard, write the index when sharded; every planned tensor must have been written."""
        if self._pos != len(self.entries):
            raise VlsafeError(f"writer: {len(self.entries) - self._pos} planned tensors were not written "
                              f"(next: '{self.entries[self._pos][0]}')")
        if self._shard < 0:  # nothing to write: still produce a valid empty shard
            self._open_next()
        self._finish_shard()
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(s.size for s in self.shards)},
                     "weight_map": {n: s.file for s in self.shards for n in s.names}}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [self.out_dir / s.file for s in self.shards]


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def pipelined(items: Iterable[T], load: Callable[[T], G], compute: Callable[[T, G], O],
              write: Callable[[T, O], None]) -> None:
    """`write(x, compute(x, load(x)))` for each item in order, with the next item's `load` and the previous
    item's `write` running in background threads while `compute` runs (file reads and writes release the GIL).

    At most three items are in flight (one loading, one computing, one writing), so peak memory is about three
    tensor groups; each reader and the writer are still used by one thread at a time, in order.
    """
    items = list(items)
    if not items:
        return
    with ThreadPoolExecutor(2, thread_name_prefix="vlsafe-io") as pool:
        nxt: Future = pool.submit(load, items[0])
        writing: Future | None = None
        try:
            for i, item in enumerate(items):
                group = nxt.result()
                if i + 1 < len(items):
                    nxt = pool.submit(load, items[i + 1])
                out = compute(item, group)
                del group
                if writing is not None:
                    writing.result()
                writing = pool.submit(write, item, out)
                del out
            if writing is not None:
                writing.result()
        finally:
            nxt.cancel()
            if writing is not None:
                writing.cancel()
