"""Remedy specs: which activation-level remedy, at which layers and positions, how strong, from which vectors.

A spec is a small YAML (or dict) validated with one-line errors naming the file and key:

    kind: project            # steer | calibrate | project | ablate
    layers: [2, 3]           # block inputs (resid_pre) the remedy edits
    alpha: 1.0
    positions: all           # all = every position; last = the last prompt position and every generated token
    direction: {file: runs/locate/shift_vectors.safetensors, key: refusal_direction, layer: null, position: -1,
                unit: true}
    # calibrate reads a shift instead:
    # shift: {file: runs/locate/shift_vectors.safetensors, condition: blank, label: mean, position: -1}
    checkpoint: runs/organism/lvlm    # optional; used by `vlsafe export-remedy`

Vector files: a `directions.safetensors` (`vlsafe probe`; `key` = its checkpoint label), a
`shift_vectors.safetensors` (`vlsafe locate`; `key` defaults to `refusal_direction`), or a plain safetensors
file with one `[d]`, `[L, d]` or `[L, P, d]` tensor (or several, one named by `key`). `direction.layer: null`
takes the direction of the layer the remedy acts on; an int takes that layer's direction for every remedy layer.
`vectors(spec, lm)` resolves them into one fp64 `[d]` vector per remedy layer, checked against the model.
`kind: gated` (a condition file and one of the specs above as its `action`) parses to
`vlsafe.probes.gated.GatedSpec`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator, model_validator

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.yamlfile import read_yaml
from vlsafe.probes import models as M

KINDS = ("steer", "calibrate", "project", "ablate")
POSITIONS = ("all", "last")
SHIFT_LABELS = ("harmful", "harmless", "mean")
DEFAULT_SHIFT_KEY = "refusal_direction"

__all__ = ["KINDS", "POSITIONS", "DirectionSource", "ShiftSource", "RemedySpec", "vectors", "vector_width"]


class DirectionSource(BaseModel):
    """A direction read from a file: `unit: true` = r̂ (default), `unit: false` = the raw vector."""

    model_config = ConfigDict(extra="forbid")
    file: str
    key: str | None = None
    layer: int | None = None
    position: int = -1
    unit: bool = True


class ShiftSource(BaseModel):
    """A mean image-induced shift δ from a `shift_vectors.safetensors` (`label: mean` = mean of both labels)."""

    model_config = ConfigDict(extra="forbid")
    file: str
    condition: str
    label: Literal["harmful", "harmless", "mean"] = "mean"
    position: int = -1


class RemedySpec(BaseModel):
    """One activation-level remedy (see the module docstring and `vlsafe.probes.remedies`)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["steer", "calibrate", "project", "ablate"]
    layers: list[int]
    alpha: float = 1.0
    positions: Literal["all", "last"] = "all"
    direction: DirectionSource | None = None
    shift: ShiftSource | None = None
    checkpoint: str | None = None
    _source: str = PrivateAttr(default="remedy spec")

    @field_validator("alpha", mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        if isinstance(v, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                raise ValueError(f"must be a number, got {v!r}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"must be a number, got {v!r}")
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"must be finite, got {v!r}")
        return v

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
            raise ValueError(f"must be a non-empty list of layer indices, got {v!r}")
        if len(set(v)) != len(v):
            raise ValueError(f"lists a layer twice: {v!r}")
        return v

    @model_validator(mode="after")
    def _sources(self) -> "RemedySpec":
        if self.kind == "calibrate":
            if self.shift is None or self.direction is not None:
                raise ValueError("calibrate reads a 'shift:' (and no 'direction:')")
        elif self.direction is None or self.shift is not None:
            raise ValueError(f"{self.kind} reads a 'direction:' (and no 'shift:')")
        if self.kind == "ablate" and (self.alpha != 1.0 or self.positions != "all"):
            raise ValueError("ablate projects the direction out fully: alpha must be 1 and positions 'all'")
        return self

    # ---- construction ------------------------------------------------------------------------------------

    @classmethod
    def parse(cls, raw: Any, source: str = "remedy spec", base_dir: str | os.PathLike | None = None) -> "RemedySpec":
        """Validate a mapping; relative vector files are taken relative to `base_dir` (default: as given).

        `kind: gated` returns a `vlsafe.probes.gated.GatedSpec` (a condition and an action spec)."""
        if not isinstance(raw, dict):
            raise VlsafeError(f"{source}: a remedy spec must be a mapping, got {type(raw).__name__}")
        if raw.get("kind") == "gated":
            from vlsafe.probes.gated import GatedSpec

            return GatedSpec.parse(raw, source, base_dir)  # type: ignore[return-value]
        spec = validated(cls, _rebase(raw, base_dir), source)
        spec._source = source
        return spec

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "RemedySpec":
        """Read a spec YAML; vector files and `checkpoint` are relative to the YAML's folder."""
        p = Path(path)
        return cls.parse(read_yaml(p, "remedy spec"), str(p), p.parent)

    # ---- properties --------------------------------------------------------------------------------------

    @property
    def source(self) -> str:
        """Where the spec came from (file name or the `source` given to `parse`), for error messages."""
        return self._source

    @property
    def needs_images(self) -> bool:
        """True for remedies that act on image inputs only (calibrate, project)."""
        return self.kind in ("calibrate", "project")

    def key(self) -> str:
        """A content hash of the spec and of the vector file it reads (not its path, not `checkpoint`)."""
        d = self.model_dump(exclude={"checkpoint"})
        src = d.get("direction") or d.get("shift")
        src["file"] = _file_hash(Path(src["file"]), self.source)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def validated(model: Any, raw: dict[str, Any], source: str) -> Any:
    """`model.model_validate(raw)` with the first error as one line naming `source` and the key."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        hint = f"; valid: {', '.join(model.model_fields)}" if err["type"] == "extra_forbidden" and \
            len(err["loc"]) == 1 else ""
        raise VlsafeError(f"{source}: {loc}: {msg}{hint}") from None


def _rebase(raw: dict[str, Any], base_dir: str | os.PathLike | None) -> dict[str, Any]:
    if base_dir is None:
        return raw
    out = dict(raw)
    for k in ("direction", "shift"):
        if isinstance(out.get(k), dict) and isinstance(out[k].get("file"), str):
            out[k] = {**out[k], "file": str(Path(base_dir) / out[k]["file"])}
    if isinstance(out.get("checkpoint"), str) and (Path(base_dir) / out["checkpoint"]).exists():
        out["checkpoint"] = str(Path(base_dir) / out["checkpoint"])
    return out


def _file_hash(p: Path, source: str) -> str:
    if not p.is_file():
        raise VlsafeError(f"{source}: vector file {p} does not exist")
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- vector files ------------------------------------------------------------------------------------------

def _open(p: Path, source: str) -> tuple[dict[str, str], list[str], Any]:
    """(metadata, tensor names, a getter) of a safetensors file, with one-line errors."""
    from safetensors import safe_open

    if not p.is_file():
        raise VlsafeError(f"{source}: vector file {p} does not exist")
    if p.suffix != ".safetensors":
        raise VlsafeError(f"{source}: vector file {p} must be a .safetensors file")
    try:
        with safe_open(str(p), "pt") as f:
            meta, names = dict(f.metadata() or {}), list(f.keys())
    except (OSError, ValueError) as e:
        raise VlsafeError(f"{source}: unreadable vector file {p} ({str(e).splitlines()[0][:120]})") from None

    def get(name: str) -> torch.Tensor:
        with safe_open(str(p), "pt") as f:
            return f.get_tensor(name)
    return meta, names, get


def _shift_meta(meta: dict[str, str]) -> dict[str, Any] | None:
    try:
        info = json.loads(meta.get("vlsafe", "null"))
    except json.JSONDecodeError:
        return None
    return info if isinstance(info, dict) and str(info.get("format", "")).startswith("vlsafe.shift/") else None


def _table(src: DirectionSource, source: str) -> tuple[torch.Tensor, list[int] | None, str]:
    """(tensor `[d]`/`[L, d]`/`[L, P, d]` fp64, the layers of its first axis or None, where)."""
    from vlsafe.probes.directions import load_directions

    p = Path(src.file)
    meta, names, get = _open(p, source)
    if str(meta.get("format", "")).startswith("vlsafe.directions/"):
        sets = load_directions(p)
        key = src.key if src.key is not None else (next(iter(sets)) if len(sets) == 1 else None)
        if key not in sets:
            raise VlsafeError(f"{source}: direction.key {src.key!r} not in {p} (labels: {', '.join(sets)})")
        return sets[key].raw, list(sets[key].layers), f"{p} [{key}]"
    shift = _shift_meta(meta)
    key = src.key if src.key is not None else (DEFAULT_SHIFT_KEY if shift else (names[0] if len(names) == 1 else None))
    if key not in names:
        raise VlsafeError(f"{source}: direction.key {src.key!r} not in {p} (tensors: {', '.join(names)})")
    t = get(key).to(torch.float64)
    layers = [int(x) for x in shift["layers"]] if shift else None
    return t, layers, f"{p} [{key}]"


def _shift_table(src: ShiftSource, source: str) -> tuple[torch.Tensor, list[int], str]:
    p = Path(src.file)
    meta, names, get = _open(p, source)
    info = _shift_meta(meta)
    if info is None:
        raise VlsafeError(f"{source}: shift.file {p} is not a shift_vectors.safetensors (no vlsafe.shift metadata)")
    conds = sorted({n.split("/")[1] for n in names if n.startswith("shift/") and n.count("/") == 2})
    if src.condition not in conds:
        raise VlsafeError(f"{source}: shift.condition {src.condition!r} not in {p} (conditions: {', '.join(conds)})")
    labels = ("harmful", "harmless") if src.label == "mean" else (src.label,)
    missing = [lab for lab in labels if f"shift/{src.condition}/{lab}" not in names]
    if missing:
        have = [n.split("/")[2] for n in names if n.startswith(f"shift/{src.condition}/")]
        raise VlsafeError(f"{source}: shift.label {src.label!r}: {p} has no {missing[0]!r} shift for "
                          f"{src.condition!r} (labels: {', '.join(have)})")
    t = torch.stack([get(f"shift/{src.condition}/{lab}").to(torch.float64) for lab in labels]).mean(0)
    return t, [int(x) for x in info["layers"]], f"{p} [shift/{src.condition}/{src.label}]"


def _pick(t: torch.Tensor, layers: list[int] | None, layer: int, position: int, where: str) -> torch.Tensor:
    """The `[d]` vector of `layer` (and `position` on a `[L, P, d]` tensor)."""
    if t.dim() == 1:
        return t
    if t.dim() not in (2, 3):
        raise VlsafeError(f"{where}: expected a [d], [L, d] or [L, P, d] tensor, got shape {tuple(t.shape)}")
    layers = list(range(t.shape[0])) if layers is None else layers
    if layer not in layers:
        raise VlsafeError(f"{where}: no vector for layer {layer} (layers {layers[0]}..{layers[-1]})")
    row = t[layers.index(layer)]
    if row.dim() == 2:
        if not -row.shape[0] <= position < row.shape[0]:
            raise VlsafeError(f"{where}: position {position} out of range for {row.shape[0]} positions")
        row = row[position]
    return row


def check_model(spec: RemedySpec, lm: Any) -> None:
    """One-line errors for a spec that does not fit `lm`: layers out of range, images on a text-only model."""
    n = M.num_layers(lm.model)
    bad = [ℓ for ℓ in spec.layers if not 0 <= ℓ < n]
    if bad:
        raise VlsafeError(f"{spec.source}: layers: {bad[0]} out of range for a {n}-layer model (0..{n - 1})")
    if spec.needs_images and not M.is_lvlm(lm):
        raise VlsafeError(f"{spec.source}: kind {spec.kind!r} acts on image inputs but the model takes no images")


def vector_width(spec: RemedySpec) -> int:
    """The width (last dimension) of the vectors `spec` reads, without a model (for checks before loading one)."""
    if spec.direction is not None:
        return int(_table(spec.direction, spec.source)[0].shape[-1])
    return int(_shift_table(spec.shift, spec.source)[0].shape[-1])


def vectors(spec: RemedySpec, lm: Any) -> dict[int, torch.Tensor]:
    """One fp64 `[d]` vector per remedy layer: the direction (unit when `unit` or the kind is project/ablate) or
    the shift δ; checked against `lm` (layers, hidden size, images)."""
    check_model(spec, lm)
    d = M.hidden_size(lm.model)
    src = spec.direction if spec.direction is not None else spec.shift
    if spec.direction is not None:
        t, layers, where = _table(spec.direction, spec.source)
    else:
        t, layers, where = _shift_table(spec.shift, spec.source)
    if t.shape[-1] != d:
        raise VlsafeError(f"{where}: vectors have width {t.shape[-1]} but the model's hidden size is {d}")
    fixed = getattr(src, "layer", None)
    out = {ℓ: _pick(t, layers, ℓ if fixed is None else fixed, src.position, where) for ℓ in spec.layers}
    unit = spec.kind in ("project", "ablate") or (spec.direction is not None and spec.direction.unit)
    if unit:
        for ℓ, v in out.items():
            norm = v.norm()
            if not torch.isfinite(norm) or norm == 0:
                raise VlsafeError(f"{where}: the direction of layer {ℓ} has zero or non-finite norm")
            out[ℓ] = v / norm
    return out
