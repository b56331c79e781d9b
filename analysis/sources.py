"""Weight files on disk: safetensors (single or sharded) and, only when asked, pickles.

A source lists raw tensor names with shape, dtype and file *without reading data* (safetensors headers are
parsed directly: 8-byte little-endian length + JSON) and streams tensors one file at a time in file order,
keeping one file open and releasing it after its last tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from vlsafe.analysis.errors import VlsafeError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_TO_ST = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class RawTensor:
    """A tensor as stored: raw name, shape, dtype string (safetensors spelling) and file."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    offset: int = 0  # safetensors: where the tensor's bytes start in `file`

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """The JSON header of a safetensors file and the file offset where its data starts (no tensor data read);
    one-line errors when corrupt."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise VlsafeError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise VlsafeError(f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size})")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VlsafeError(f"{path}: corrupt safetensors header ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise VlsafeError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for name, meta in header.items():
        end = meta.get("data_offsets", [0, 0])[1] if isinstance(meta, dict) else None
        if end is None or end > data_len:
            raise VlsafeError(f"{path}: truncated safetensors file (tensor '{name}' ends past the data)")
    return header, 8 + n


class SafetensorsSource:
    """One or more safetensors files; `files` in shard order."""

    kind = "safetensors"

    def __init__(self, files: list[Path]):
        self.files = files
        self.tensors: dict[str, RawTensor] = {}
        for file in files:
            header, start = read_safetensors_header(file)
            for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                self.tensors[name] = RawTensor(name, tuple(meta["shape"]), meta["dtype"], file,
                                               start + meta["data_offsets"][0])

    @classmethod
    def from_index(cls, index: Path) -> "SafetensorsSource":
        """Open a sharded checkpoint from its `model.safetensors.index.json`, checking every shard exists."""
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise VlsafeError(f"{index}: not a safetensors index ({e.__class__.__name__}: {e})") from None
        shards = list(dict.fromkeys(weight_map.values()))
        for shard in shards:
            if not (index.parent / shard).is_file():
                raise VlsafeError(f"{index}: names shard '{shard}', which is missing")
        src = cls([index.parent / s for s in shards])
        missing = [n for n, s in weight_map.items() if n not in src.tensors]
        if missing:
            raise VlsafeError(f"{index}: tensor '{missing[0]}' is listed but not in shard '{weight_map[missing[0]]}'")
        return src

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (raw name, tensor) grouped by file in file order; one file open at a time."""
        from safetensors import safe_open

        wanted = set(self.tensors) if names is None else set(names)
        for file in self.files:
            in_file = [t.name for t in self.tensors.values() if t.file == file and t.name in wanted]
            if not in_file:
                continue
            with safe_open(str(file), framework="pt") as f:
                for name in in_file:
                    yield name, f.get_tensor(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.tensors[name].file), framework="pt") as f:
            return f.get_tensor(name)


class PickleSource:
    """PyTorch pickle files (`.bin`/`.pt`), loaded with `weights_only=True`; only built when allowed."""

    kind = "pickle"

    def __init__(self, files: list[Path]):
        self.files = files
        self.tensors: dict[str, RawTensor] = {}
        for file in files:
            for name, t in self._load(file).items():
                dtype = _TO_ST.get(t.dtype, str(t.dtype))
                self.tensors[name] = RawTensor(name, tuple(t.shape), dtype, file)

    @staticmethod
    def _load(file: Path) -> dict[str, torch.Tensor]:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for bad pickles
            raise VlsafeError(f"{file}: cannot load pickle with weights_only=True ({e.__class__.__name__})") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise VlsafeError(f"{file}: pickle does not hold a state dict")
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        wanted = set(self.tensors) if names is None else set(names)
        for file in self.files:
            sd = self._load(file)
            for name in [n for n in sd if n in wanted]:
                yield name, sd[name]
            del sd

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._load(self.tensors[name].file)[name]


def torch_dtype(st_dtype: str) -> torch.dtype:
    """torch dtype for a safetensors dtype string (`BF16` → torch.bfloat16)."""
    return _ST_DTYPES[st_dtype]


def st_dtype(dtype: torch.dtype) -> str:
    """The safetensors spelling of a torch dtype (`torch.bfloat16` → `BF16`)."""
    return _TO_ST[dtype]
