"""`Activations`: what `vlsafe.probes.capture.capture` returns — per-(hook, layer) tensors or streaming statistics.

**The activation layout.** Every array of activations in vlsafe is ordered `[n, L, P, d]`: prompts, layers,
positions, hidden size ("n L P d"). The layer axis comes first after the prompts because it is vlsafe's shared
axis (a weight-shift row, a direction row, a probe row and a merge coefficient are all indexed by layer) and
because a capture is made per layer (`get` returns one layer's `[n, P, d]`, `stack` stacks them on axis 1).
Dropping the prompt axis gives `[L, P, d]` (means, `mean_diff`, `DirectionSet.raw`); one position gives
`[n, L, d]` (safety-layer states). Producers (`Activations.stack`, `stack_activations`, `stacked_means`,
`mean_diff`, `DirectionSet`) and consumers (`probe_layers`, `compare.project`, `cosine_curves`) all use it, and
every function that addresses one entry takes `(layer, position)` in that order.

Tensor mode: `acts.get("resid_pre", 12)` → fp32 `[n, P, d]`; `acts.stack("resid_pre")` → `[n, L, P, d]`.
Accumulate mode (`capture(..., accumulate=True)`): only fp64 `RunningStats` per (hook, layer, position, label)
are kept; `acts.mean(kind, layer, label=1)` → `[P, d]` works in both modes.

Files: `save(path)` writes one safetensors file whose header metadata holds a JSON record (model spec, content
hash, hidden size, layers, positions, labels); `Activations.load(path, expect=lm)` refuses a file captured
from a different model. A spill directory (`capture(..., spill_to=DIR)`) holds `meta.json` + one
`chunk_NNNNN.safetensors` per batch and loads the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.runinfo import atomic_path, write_json
from vlsafe.probes.stats import RunningStats

Key = tuple[str, int]
META_KEY = "vlsafe_activations"


def _kname(kind: str, layer: int) -> str:
    return f"{kind}.{layer}"


@dataclass
class Activations:
    """Captured activations at `requests` (kind, layer) × `positions` for `n_prompts` prompts."""

    requests: list[Key]
    positions: list[int | str]
    hidden_size: int
    labels: list[Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    accumulate: bool = False
    cov: bool = False
    n_prompts: int = 0
    _parts: dict[Key, list[torch.Tensor]] = field(default_factory=dict, repr=False)
    _data: dict[Key, torch.Tensor] = field(default_factory=dict, repr=False)
    _files: list[Path] = field(default_factory=list, repr=False)
    _stats: dict[tuple[str, int, int, Any], RunningStats] = field(default_factory=dict, repr=False)

    # ---- description --------------------------------------------------------------------------------
    @property
    def hooks(self) -> list[str]:
        """Hook kinds captured (in request order)."""
        return list(dict.fromkeys(k for k, _ in self.requests))

    @property
    def layers(self) -> list[int]:
        """Layers captured (ascending)."""
        return sorted({layer for _, layer in self.requests})

    def __len__(self) -> int:
        return self.n_prompts

    def __repr__(self) -> str:
        mode = "stats" if self.accumulate else ("spilled" if self._files else "tensors")
        return (f"Activations(n={self.n_prompts}, hooks={self.hooks}, layers={self.layers}, "
                f"positions={self.positions}, d={self.hidden_size}, {mode})")

    def _check(self, kind: str, layer: int | None) -> Key:
        if layer is None:
            from vlsafe.probes.capture import parse_hook_name

            kind, layer = parse_hook_name(kind)
        if (kind, layer) not in self.requests:
            raise VlsafeError(f"activations: ({kind}, layer {layer}) not captured; have "
                              f"{', '.join(f'{k}@{l}' for k, l in self.requests[:12])}")
        return kind, layer

    def position_index(self, position: int | str) -> int:
        """Index of `position` (e.g. -1 or "mean") along the positions axis."""
        if position not in self.positions:
            raise VlsafeError(f"activations: position {position!r} not captured (have {self.positions})")
        return self.positions.index(position)

    # ---- building (used by capture) -----------------------------------------------------------------
    def add(self, out: dict[Key, torch.Tensor], *, labels: Sequence[Any] | None = None,
            spill_file: Path | None = None) -> None:
        """Add one batch `{(kind, layer): Tensor[n, P, d]}`."""
        n = next(iter(out.values())).shape[0]
        if self.accumulate:
            groups = [None] if labels is None else list(dict.fromkeys(labels))
            for (kind, layer), t in out.items():
                for g in groups:
                    rows = t if labels is None else t[[i for i, lab in enumerate(labels) if lab == g]]
                    for p in range(t.shape[1]):
                        key = (kind, layer, p, g)
                        if key not in self._stats:
                            self._stats[key] = RunningStats(self.hidden_size, cov=self.cov)
                        self._stats[key].update(rows[:, p])
        elif spill_file is not None:
            with atomic_path(spill_file) as tmp:
                save_file({_kname(*k): v.contiguous() for k, v in out.items()}, str(tmp))
            self._files.append(Path(spill_file))
        else:
            for k, v in out.items():
                self._parts.setdefault(k, []).append(v)
        self.n_prompts += n

    # ---- tensors ------------------------------------------------------------------------------------
    def get(self, kind: str, layer: int | None = None) -> torch.Tensor:
        """fp32 `[n, P, d]` for hook `kind` at `layer` (or a TL name like `blocks.3.hook_resid_pre`)."""
        key = self._check(kind, layer)
        if self.accumulate:
            raise VlsafeError("activations were accumulated (accumulate=True): only mean()/var()/stats() exist")
        if key in self._data:
            return self._data[key]
        if self._files:
            return torch.cat([_read(f, _kname(*key)) for f in self._files])
        parts = self._parts.pop(key, [])
        self._data[key] = torch.cat(parts) if parts else torch.empty(0, len(self.positions), self.hidden_size)
        return self._data[key]

    def stack(self, kind: str = "resid_pre", *, layers: Sequence[int] | None = None) -> torch.Tensor:
        """fp32 `[n, L, P, d]` over `layers`, ascending (default: every captured layer of `kind`)."""
        layers = [l for k, l in self.requests if k == kind] if layers is None else list(layers)
        if not layers:
            raise VlsafeError(f"activations: hook {kind!r} not captured (have {self.hooks})")
        return torch.stack([self.get(kind, l) for l in sorted(layers)], dim=1)

    # ---- statistics (both modes) --------------------------------------------------------------------
    def stats(self, kind: str, layer: int, *, position: int | str = -1, label: Any = None) -> RunningStats:
        """fp64 `RunningStats` of one (hook, layer, position), over prompts with `label` (None = all)."""
        key = self._check(kind, layer)
        p = self.position_index(position)
        if not self.accumulate:
            x = self.get(*key)[:, p]
            if label is not None:
                x = x[self._rows(label)]
            return RunningStats(self.hidden_size, cov=self.cov).update(x)
        groups = [g for (k, l, q, g) in self._stats if (k, l, q) == (*key, p)]
        pick = groups if label is None else [g for g in groups if g == label]
        if not pick:
            raise VlsafeError(f"activations: no prompts with label {label!r} (labels: {sorted(map(str, groups))})")
        total = RunningStats(self.hidden_size, cov=self.cov)
        for g in pick:
            total.merge(self._stats[(*key, p, g)])
        return total

    def _rows(self, label: Any) -> list[int]:
        if self.labels is None:
            raise VlsafeError("activations carry no labels (capture a PromptSet, or pass labels)")
        rows = [i for i, lab in enumerate(self.labels) if lab == label]
        if not rows:
            raise VlsafeError(f"activations: no prompts with label {label!r}")
        return rows

    def mean(self, kind: str, layer: int, *, label: Any = None) -> torch.Tensor:
        """fp64 mean `[P, d]` over prompts (with `label` if given)."""
        return torch.stack([self.stats(kind, layer, position=pos, label=label).mean for pos in self.positions])

    def var(self, kind: str, layer: int, *, label: Any = None) -> torch.Tensor:
        """fp64 unbiased variance `[P, d]` over prompts (with `label` if given)."""
        return torch.stack([self.stats(kind, layer, position=pos, label=label).var for pos in self.positions])

    # ---- files --------------------------------------------------------------------------------------
    def _record(self) -> dict[str, Any]:
        return {"requests": [list(r) for r in self.requests], "positions": self.positions,
                "hidden_size": self.hidden_size, "labels": self.labels, "meta": self.meta,
                "accumulate": self.accumulate, "cov": self.cov, "n_prompts": self.n_prompts}

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file (tensors or statistics) with the JSON record in its header."""
        tensors: dict[str, torch.Tensor] = {}
        stat_keys = []
        if self.accumulate:
            for i, (key, s) in enumerate(self._stats.items()):
                stat_keys.append([key[0], key[1], key[2], key[3]])
                tensors.update({f"stats.{i}.{k}": v for k, v in s.state_dict().items()})
        else:
            tensors = {_kname(*k): self.get(*k).contiguous() for k in self.requests}
        record = {**self._record(), "stat_keys": stat_keys}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(record, default=str)})
        return Path(path)

    def write_spill_meta(self, directory: Path) -> None:
        write_json(Path(directory) / "meta.json", {**self._record(), "files": [f.name for f in self._files]})

    @classmethod
    def load(cls, path: str | os.PathLike, *, expect: Any = None, hidden_size: int | None = None) -> "Activations":
        """Read a file written by `save` (or a spill directory); with `expect` (a LoadedModel or Checkpoint)
        or `hidden_size`, refuse activations captured from another model."""
        path = Path(path)
        if path.is_dir():
            return _load_spill(path, expect, hidden_size)
        if not path.is_file():
            raise VlsafeError(f"{path}: no such activations file")
        try:
            with safe_open(str(path), "pt") as f:
                meta = (f.metadata() or {}).get(META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise VlsafeError(f"{path}: not a safetensors file ({str(e).splitlines()[0][:120]})") from None
        if meta is None:
            raise VlsafeError(f"{path}: not a vlsafe activations file (no '{META_KEY}' header metadata)")
        rec = json.loads(meta)
        acts = _from_record(rec)
        _check_model(path, acts, expect, hidden_size)
        if acts.accumulate:
            for i, (k, l, p, g) in enumerate(rec["stat_keys"]):
                st = {n: tensors[f"stats.{i}.{n}"] for n in ("count", "mean", "m2")}
                acts._stats[(k, int(l), int(p), g)] = RunningStats.from_state_dict(st)
        else:
            acts._data = {k: tensors[_kname(*k)] for k in acts.requests}
        return acts


def _from_record(rec: dict[str, Any]) -> Activations:
    return Activations(requests=[(k, int(l)) for k, l in rec["requests"]], positions=list(rec["positions"]),
                       hidden_size=int(rec["hidden_size"]), labels=rec.get("labels"), meta=rec.get("meta") or {},
                       accumulate=bool(rec.get("accumulate")), cov=bool(rec.get("cov")),
                       n_prompts=int(rec.get("n_prompts", 0)))


def _load_spill(directory: Path, expect: Any, hidden_size: int | None) -> Activations:
    meta = directory / "meta.json"
    if not meta.is_file():
        raise VlsafeError(f"{directory}: not an activations spill directory (no meta.json)")
    rec = json.loads(meta.read_text())
    acts = _from_record(rec)
    _check_model(directory, acts, expect, hidden_size)
    acts._files = [directory / n for n in rec["files"]]
    missing = [f.name for f in acts._files if not f.is_file()]
    if missing:
        raise VlsafeError(f"{directory}: spill chunk {missing[0]} is missing")
    return acts


def _read(file: Path, key: str) -> torch.Tensor:
    with safe_open(str(file), "pt") as f:
        return f.get_tensor(key)


def model_identity(lm_or_ckpt: Any) -> dict[str, Any]:
    """`{spec, content_hash, hidden_size, num_layers}` of a LoadedModel or Checkpoint (None where unknown)."""
    from vlsafe.probes import models as M

    ckpt = getattr(lm_or_ckpt, "checkpoint", lm_or_ckpt)
    model = getattr(lm_or_ckpt, "model", None)
    ident: dict[str, Any] = {"spec": getattr(ckpt, "spec", None), "content_hash": None, "hidden_size": None,
                             "num_layers": None}
    if hasattr(ckpt, "content_hash"):
        ident["content_hash"] = ckpt.content_hash()
        ident["hidden_size"], ident["num_layers"] = ckpt.hidden_size, ckpt.num_layers
    if model is not None:
        ident["hidden_size"], ident["num_layers"] = M.hidden_size(model), M.num_layers(model)
    return ident


def _check_model(path: Path, acts: Activations, expect: Any, hidden_size: int | None) -> None:
    if hidden_size is not None and int(hidden_size) != acts.hidden_size:
        raise VlsafeError(f"{path}: activations have hidden size {acts.hidden_size}, expected {hidden_size}")
    if expect is None:
        return
    want = model_identity(expect)
    if want["hidden_size"] is not None and want["hidden_size"] != acts.hidden_size:
        raise VlsafeError(f"{path}: activations have hidden size {acts.hidden_size}, but {want['spec']} has "
                          f"{want['hidden_size']}")
    have = acts.meta.get("content_hash")
    ckpt = getattr(expect, "checkpoint", expect)
    if want["content_hash"] and have and not ckpt.matches_hash(have):
        raise VlsafeError(f"{path}: captured from {acts.meta.get('spec')} (hash {have[:12]}), not from "
                          f"{want['spec']} (hash {want['content_hash'][:12]})")
