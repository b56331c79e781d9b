"""Open any checkpoint lazily and address its tensors by canonical name.

>>> from vlsafe.analysis.checkpoints import open_checkpoint
>>> ckpt = open_checkpoint("default")                 # or an HF dir, a .safetensors/.gguf file, a hub id
>>> ckpt.family.name, ckpt.num_layers, ckpt.hidden_size
('llama', 30, 576)
>>> for name, t in ckpt.iter_tensors():              # shard order, one shard open at a time
...     ...
>>> lm = ckpt.load_model(dtype="float32")             # runnable transformers model + tokenizer/processor
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from vlsafe.analysis import names as N
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.filehash import file_sha256, legacy_hash
from vlsafe.analysis.resolve import resolve
from vlsafe.analysis.runinfo import read_json_object
from vlsafe.analysis.sources import PICKLE_SUFFIXES, PickleSource, SafetensorsSource


@dataclass(frozen=True)
class TensorInfo:
    """One tensor on the shared axis: canonical and raw name, shape, dtype, layer, module, namespace."""

    name: str
    raw_name: str
    shape: tuple[int, ...]
    dtype: str
    file: str
    layer: int | None
    module: str
    namespace: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class LoadedModel:
    """A runnable model with what formats its inputs (`processor` is None for text models)."""

    model: Any
    tokenizer: Any
    processor: Any
    checkpoint: "Checkpoint"


def _pick_source(path: Path, allow_pickle: bool) -> SafetensorsSource | PickleSource:
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsSource([path])
        if path.name.endswith(".safetensors.index.json"):
            return SafetensorsSource.from_index(path)
        if path.suffix in PICKLE_SUFFIXES:
            return _pickle_source([path], path, allow_pickle)
        raise VlsafeError(f"{path}: not a checkpoint file (expected .safetensors, .gguf or an index .json)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return SafetensorsSource.from_index(index)
    st = sorted(path.glob("*.safetensors"))
    if st:
        return SafetensorsSource(st)
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        return _pickle_source(pickles, path, allow_pickle)
    raise VlsafeError(f"{path}: directory holds no checkpoint (no *.safetensors, index, or weights file)")


def _pickle_source(files: list[Path], path: Path, allow_pickle: bool) -> PickleSource:
    if not allow_pickle:
        raise VlsafeError(f"{path}: pickle checkpoint refused (pickles can run code when loaded); convert it to "
                          "safetensors or pass allow_pickle=True / --allow-pickle (loads with weights_only=True)")
    return PickleSource(files)


class Checkpoint:
    """A checkpoint opened lazily: names, shapes and dtypes now; tensor data only when streamed."""

    def __init__(self, spec: str | os.PathLike, *, allow_pickle: bool = False, trust_remote_code: bool = False):
        self.spec = str(spec)
        self.path = resolve(spec)
        self.trust_remote_code = trust_remote_code
        self.source = _pick_source(self.path, allow_pickle)
        root = self.path if self.path.is_dir() else self.path.parent
        cfg_file = root / "config.json"
        self.config: dict[str, Any] = read_json_object(cfg_file) if cfg_file.is_file() else {}
        raw = list(self.source.tensors)
        self.family = N.match_family(self.config) or N.guess_family(raw, self.spec)
        self.raw_to_canonical = N.canonicalize(raw, self.family, self.spec)
        self.infos: dict[str, TensorInfo] = {}
        for r, canon in self.raw_to_canonical.items():
            t = self.source.tensors[r]
            layer, module = N.layer_module(canon)
            self.infos[canon] = TensorInfo(canon, r, t.shape, t.dtype, t.file.name, layer, module, N.namespace(canon))
        self._canonical_to_raw = {c: r for r, c in self.raw_to_canonical.items()}

    def __repr__(self) -> str:
        return (f"Checkpoint({self.spec!r}, family={self.family.name}, layers={self.num_layers}, "
                f"tensors={len(self.infos)})")

    # ---- metadata -------------------------------------------------------------------------------------
    @property
    def text_config(self) -> dict[str, Any]:
        return N.text_config(self.config, self.family)

    @property
    def num_layers(self) -> int:
        """Language-model layers (from the config, else counted from tensor names)."""
        n = self.text_config.get("num_hidden_layers")
        if n is None:
            layers = [i.layer for i in self.infos.values() if i.layer is not None]
            n = max(layers) + 1 if layers else 0
        return int(n)

    @property
    def hidden_size(self) -> int:
        h = self.text_config.get("hidden_size")
        if h is None:
            emb = self.infos.get("model.embed_tokens.weight")
            h = emb.shape[-1] if emb else 0
        return int(h)

    @property
    def dtype(self) -> str:
        """The most common dtype among language-model tensors (safetensors spelling, e.g. `F32`)."""
        counts = Counter(i.dtype for i in self.infos.values() if i.namespace == "language") or \
            Counter(i.dtype for i in self.infos.values())
        return counts.most_common(1)[0][0] if counts else "?"

    @property
    def num_parameters(self) -> int:
        return sum(i.numel for i in self.infos.values())

    @property
    def cross_attention_layers(self) -> list[int]:
        return N.cross_attention_layers(self.config, self.family)

    def names(self, namespace: str | None = None) -> list[str]:
        """Canonical names (in storage order), optionally of one namespace (`language`, `vision`, …)."""
        return [n for n, i in self.infos.items() if namespace is None or i.namespace == namespace]

    def raw_name(self, canonical: str) -> str:
        if canonical not in self._canonical_to_raw:
            raise VlsafeError(f"{self.spec}: no tensor '{canonical}'")
        return self._canonical_to_raw[canonical]

    # ---- data -----------------------------------------------------------------------------------------
    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (canonical name, tensor) in storage order, one shard open at a time."""
        raws = None if names is None else [self.raw_name(n) for n in names]
        for raw, tensor in self.source.iter_tensors(raws):
            yield self.raw_to_canonical[raw], tensor

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor by canonical name."""
        return self.source.get_tensor(self.raw_name(name))

    def content_hash(self) -> str:
        """sha256 over each weight file's name and the sha256 of its whole content (`analysis.filehash`: a file
        is read once per version, then its digest is remembered). Used in `run.json` and in cache keys."""
        h = hashlib.sha256()
        for f in self.source.files:
            h.update(f.name.encode())
            h.update(file_sha256(f).encode())
        return h.hexdigest()

    def matches_hash(self, digest: str) -> bool:
        """Whether a stored `digest` names this checkpoint: its `content_hash`, or the weaker fingerprint that
        files written before 2026-12-06 stored (`filehash.legacy_hash`), so that those still load."""
        return digest == self.content_hash() or digest == legacy_hash(self.source.files)

    def mapping_summary(self, examples: int = 3) -> dict[str, Any]:
        """Per namespace: tensor count, raw prefix → canonical prefix, and a few raw → canonical examples."""
        out: dict[str, Any] = {}
        for ns in ("language", "vision", "projector", "other"):
            items = [(i.raw_name, n) for n, i in self.infos.items() if i.namespace == ns]
            if items:
                out[ns] = {"tensors": len(items), "examples": dict(items[:examples])}
        return out

    # ---- runnable model -------------------------------------------------------------------------------
    def load_model(self, dtype: str | torch.dtype = "float32", device: str = "cpu",
                   attn_implementation: str = "eager", device_map: Any = None, max_memory: Any = None,
                   offload_folder: str | os.PathLike | None = None) -> LoadedModel:
        """A runnable transformers model (+ tokenizer, or processor for an LVLM), eval mode, left padding.

        `device_map` (`"auto"`, `"balanced"`, or `{module name or layer index: device or "disk"}`), `max_memory`
        and `offload_folder` spread a large model over devices with accelerate (see `vlsafe.analysis.placement`).
        """
        from vlsafe.analysis.loading import load_runnable

        model, tokenizer, processor = load_runnable(self, dtype=dtype, device=device,
                                                    attn_implementation=attn_implementation, device_map=device_map,
                                                    max_memory=max_memory, offload_folder=offload_folder)
        return LoadedModel(model, tokenizer, processor, self)


def open_checkpoint(spec: str | os.PathLike, *, allow_pickle: bool = False,
                    trust_remote_code: bool = False) -> Checkpoint:
    """Open `spec` (HF dir, `.safetensors`/`.gguf`/index file, hub id or `default`) lazily."""
    return Checkpoint(spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
