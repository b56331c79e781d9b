"""The replicate plan: every combination of a seed and the varied recipe keys, validated before anything runs.

>>> plan = make_plan(profile="tiny", seeds="0,1", vary=["alignment_strength=moderate,strong"], out="runs/rep")
>>> [c.id for c in plan.combos]
['seed-0__alignment_strength-moderate', 'seed-0__alignment_strength-strong', 'seed-1__...', ...]

A varied key is a dotted path into the organism config (`stage2.sft.steps`, `alignment.moderate.sft.method`,
`alignment_strength`); each value is read as a YAML scalar (`64` is an int, `lora` a string) and checked by the
organism config's own validation. `seed` is set by `--seeds`, never varied.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlsafe.analysis.errors import VlsafeError
from vlsafe.experiments.organism.config import OrganismConfig, load_config

NOT_VARIED = ("seed", "profile", "threads")  # set by --seeds / the config / --threads, not recipe keys
# (nor is any `*.seed`, `*.threads` or `*.progress`: the stages derive those from the organism seed and options)
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclass(frozen=True)
class Combo:
    """One organism to build: a seed and one value per varied key, in its own folder `dir`."""

    seed: int
    values: tuple[tuple[str, Any], ...]
    config: str | None
    profile: str | None
    dir: str
    threads: int | None = None
    until: str | None = None  # build only this stage and the stages it needs (None: every stage)

    @property
    def recipe(self) -> str:
        """The combination without its seed (`base` when nothing is varied)."""
        return "__".join(f"{k}-{_slug(v)}" for k, v in self.values) or "base"

    @property
    def id(self) -> str:
        """Readable folder name: `seed-<s>__<key>-<value>__...`."""
        return "__".join([f"seed-{self.seed}"] + [f"{k}-{_slug(v)}" for k, v in self.values])

    def overrides(self) -> dict[str, Any]:
        """Dotted-key overrides of the organism config for this combination."""
        out: dict[str, Any] = {"seed": self.seed, **dict(self.values)}
        if self.threads:
            out["threads"] = self.threads
        return out

    def load(self) -> OrganismConfig:
        """This combination's validated organism config."""
        return load_config(self.profile, path=self.config, overrides=self.overrides())


@dataclass(frozen=True)
class Plan:
    """Seeds, varied keys with their values, and the combinations (seed-major order)."""

    seeds: tuple[int, ...]
    vary: dict[str, tuple[Any, ...]]
    combos: tuple[Combo, ...]
    source: str
    reuse: tuple[str, ...] = ()  # organism folders outside the plan whose valid stages and metrics may be linked


def _slug(value: Any) -> str:
    return _SAFE.sub("_", str(value)) or "_"


def parse_seeds(text: str) -> tuple[int, ...]:
    """`"0,1,2"` → (0, 1, 2); empty lists, non-integers, negatives and repeats are one-line errors."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise VlsafeError(f"--seeds {text!r}: the seed list is empty (e.g. --seeds 0,1,2)")
    try:
        seeds = tuple(int(s) for s in items)
    except ValueError:
        raise VlsafeError(f"--seeds {text!r}: seeds must be integers (e.g. --seeds 0,1,2)") from None
    if min(seeds) < 0:
        raise VlsafeError(f"--seeds {text!r}: seeds must be >= 0")
    if len(set(seeds)) != len(seeds):
        raise VlsafeError(f"--seeds {text!r}: a seed is repeated")
    return seeds


def parse_vary(specs: list[str]) -> dict[str, tuple[Any, ...]]:
    """`["stage2.sft.steps=64,128"]` → {"stage2.sft.steps": (64, 128)} (values read as YAML scalars)."""
    out: dict[str, tuple[Any, ...]] = {}
    for spec in specs:
        key, sep, rest = spec.partition("=")
        key = key.strip()
        raw = [v.strip() for v in rest.split(",") if v.strip()]
        if not sep or not key or not raw:
            raise VlsafeError(f"--vary {spec!r}: expected KEY=V1,V2 (e.g. --vary alignment_strength=moderate,strong)")
        if key in out:
            raise VlsafeError(f"--vary {key}: the key is given twice")
        try:
            values = tuple(yaml.safe_load(v) for v in raw)
        except yaml.YAMLError:
            raise VlsafeError(f"--vary {spec!r}: a value is not a YAML scalar") from None
        if len({_slug(v) for v in values}) != len(values):
            raise VlsafeError(f"--vary {key}: values repeat (or differ only in characters a folder name drops)")
        out[key] = values
    return out


def check_key(cfg: OrganismConfig, key: str, source: str) -> None:
    """One-line error unless `key` names a value (not a section) of the organism config."""
    if key.split(".")[0] in NOT_VARIED or key.split(".")[-1] in ("seed", "threads", "progress"):
        raise VlsafeError(f"--vary {key}: not a recipe key (seeds come from --seeds, threads from --threads)")
    node: Any = cfg.model_dump()
    for i, part in enumerate(key.split(".")):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(key.split(".")[:i]) or "the top level"
            known = ", ".join(node) if isinstance(node, dict) else "none: it is a value"
            raise VlsafeError(f"--vary {key}: unknown recipe key in {source} (keys under {where}: {known})")
        node = node[part]
    if isinstance(node, dict):
        raise VlsafeError(f"--vary {key}: is a section of {source}, not a value (keys: {', '.join(node)})")


def reuse_roots(dirs: list[str | Path]) -> tuple[str, ...]:
    """Organism folders to link stages from: each replicate folder's `combos/*`, or an organism folder itself."""
    roots: list[str] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise VlsafeError(f"--reuse {d}: not a folder (a replicate output or an organism folder)")
        found = sorted(p for p in (d / "combos").iterdir() if p.is_dir()) if (d / "combos").is_dir() else [d]
        roots += [str(p.resolve()) for p in found]
    return tuple(roots)


def make_plan(*, seeds: str, vary: list[str] | None = None, out: str | Path, config: str | Path | None = None,
              profile: str | None = None, threads: int | None = None, until: str | None = None,
              reuse: list[str | Path] | None = None) -> Plan:
    """Validate seeds, keys, the stage scope and every combination's config (nothing is written); combos go to
    `out/combos/`. `until` limits every build to a stage and the stages it needs (e.g. `lvlm`: no safety stages);
    `reuse` names other replicate or organism folders whose stages (and metrics) with the same hashes are
    hard-linked instead of built."""
    if config is not None and profile is not None:
        raise VlsafeError("give an organism CONFIG or --profile, not both")
    if config is not None and not Path(config).is_file():
        raise VlsafeError(f"{config}: organism config not found")
    prof = None if config is not None else (profile or "full")
    cfg_path = None if config is None else str(Path(config).resolve())
    source = cfg_path or f"organism-{prof}.yaml"
    seed_list = parse_seeds(seeds)
    if until is not None:
        from vlsafe.experiments.organism.build import stage_scope
        from vlsafe.experiments.organism.stages import specs

        try:
            stage_scope(specs(), until=until)
        except VlsafeError as e:
            raise VlsafeError(f"--until {until}: {e}") from None
    roots = reuse_roots(list(reuse or []))
    varied = parse_vary(list(vary or []))
    base = load_config(prof, path=cfg_path)
    for key, values in varied.items():
        check_key(base, key, source)
        for v in values:
            try:
                load_config(prof, path=cfg_path, overrides={key: v})
            except VlsafeError as e:
                raise VlsafeError(f"--vary {key}={v}: {e}") from None
    root = Path(out).resolve() / "combos"
    combos = []
    for seed, vals in itertools.product(seed_list, itertools.product(*varied.values())):
        c = Combo(seed, tuple(zip(varied, vals)), cfg_path, prof, "", threads, until)
        c = Combo(seed, c.values, cfg_path, prof, str(root / c.id), threads, until)
        try:
            c.load()
        except VlsafeError as e:
            raise VlsafeError(f"combination {c.id}: {e}") from None
        combos.append(c)
    return Plan(seed_list, varied, tuple(combos), source, roots)
