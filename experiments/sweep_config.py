"""Sweep configs: the YAML schema, its validation, `${vars}`, layer selections and grid expansion into points
(`vlsafe.experiments.sweep` materialises and evaluates them).

```yaml
vars: {organism: runs/organism}            # ${organism} in any string; CLI --var organism=... overrides
inputs:                                    # optional: build tiny random checkpoints into DIR/inputs/<name>
  llm: {tiny: llama, seed: 0}
eval: {mode: fast, harmful: harmful-val, borderline: borderline-val, harmless: harmless-val, limit: 32}
grid:
  - name: restore                          # a label; points are "restore[alpha=0.5,layers=top4]"
    method: merge                          # merge | tune | resta | checkpoint | remedy
    config:                                # a merge plan / tune config / resta arguments / a checkpoint spec
      merge_method: task_arithmetic
      base_model: ${organism}/lvlm
      models: [{model: ${organism}/llm-aligned, parameters: {weight: ${alpha}}}]
    vary:                                  # cartesian product
      alpha: [0.25, 0.5, 1.0]
      layers: [all, {top_k: 4, from: runs/diff/layers.csv, score: rel_frobenius}, [10, 11, 12], {range: [8, 14]},
               {top_k: 4, from: runs/locate/signals.csv, score: patching_resid}]
```

Point labels name the selection (`layers=top6:patching_resid_scene`, `L10-19`, `L1_4`). A `${name}` string that
is a whole value keeps the variable's type. `layers` is special: unless the template
uses `${layers}` itself, the resolved selection becomes the merge plan's `layers`, the tune config's
`layers: {trainable: …}` (full SFT and LoRA alike: only those blocks train or get adapters) or RESTA's `layers`;
`all` means no selection. `top_k` reads a diff or probe `layers.csv`, or the `signals.csv` of `vlsafe locate`
(one column per signal; rows where the column is empty are skipped), through `vlsafe.analysis.merging.plans`
(`score`, optional `module`, `checkpoint`, `largest`). Each point records the signal that chose its layers
(`layer_signal`: `signals.csv:patching_resid`, `layers.csv:rel_frobenius`, `range`, `list` or `all`).

Each method belongs to a remedy family (`FAMILY`: merge, tuning, activation, reference), shown by the report.

Layout: `DIR/points/<hash>/` (`point.json`, `model/`, `done.json`, `eval-<evalhash>.json`), built in a temp
folder and renamed, so a point folder without `done.json` can only be foreign or interrupted and is redone.
The hash covers the entry name, method, template, the point's variable values and the content hashes of
its input checkpoints (not their paths). `DIR/pareto.csv`, `DIR/figures/pareto.{png,pdf}`, `DIR/run.json`.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.yamlfile import read_yaml
from vlsafe.experiments.sweep_eval import EvalConfig
from vlsafe.experiments.yamlvars import check_overrides, substitute

METHODS = ("merge", "tune", "resta", "checkpoint", "remedy")
# method → remedy family (pareto.csv `family`); `remedy` (activation-level, evaluated under a context manager,
# nothing materialised) is listed ahead of the method itself
FAMILY = {"merge": "merge", "resta": "merge", "tune": "tuning", "remedy": "activation", "checkpoint": "reference"}
SELECTION_KEYS = ("top_k", "from", "score", "module", "checkpoint", "position", "largest")
RESTA_REQUIRED = {"sft", "aligned", "unaligned"}
RESTA_KEYS = {"sft", "aligned", "unaligned", "beta", "density", "seed", "rescale", "layers", "modules", "dtype"}


class TinyInput(BaseModel):
    """A tiny random checkpoint built into `DIR/inputs/<name>` (for tests and smoke runs)."""

    model_config = ConfigDict(extra="forbid")
    tiny: Literal["llama", "llava"]
    seed: int = 0
    layers: int = 2
    hidden: int = 64


class GridEntry(BaseModel):
    """One family of points: a method, a config template and the variables to vary."""

    model_config = ConfigDict(extra="forbid")
    name: str
    method: str
    config: dict[str, Any] | str
    vary: dict[str, list[Any]] = {}

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method '{v}'; valid: {', '.join(METHODS)}")
        return v


class SweepConfig(BaseModel):
    """A validated sweep YAML."""

    model_config = ConfigDict(extra="forbid")
    vars: dict[str, Any] = {}
    inputs: dict[str, TinyInput] = {}
    eval: EvalConfig = EvalConfig()
    grid: list[GridEntry]
    seed: int = 0


@dataclass
class Point:
    """One materialisable point of the grid."""

    entry: GridEntry
    values: dict[str, Any]
    layers: list[int] | None
    config: Any  # resolved template
    key: str = ""
    layer_signal: str = "all"  # which signal chose `layers` (see `layer_signal`)
    shown: dict[str, Any] | None = None  # values with non-path ${vars} filled in, for labels only

    @property
    def label(self) -> str:
        vals = ",".join(f"{k}={_short(v)}" for k, v in (self.shown or self.values).items())
        return f"{self.entry.name}[{vals}]" if vals else self.entry.name


def _short(v: Any) -> str:
    if isinstance(v, dict):
        if "top_k" in v:  # the signal too: top-k of two columns are two points
            return f"top{v['top_k']}:{v.get('score', 'rel_frobenius')}" + ("(low)" if v.get("largest") is False else "")
        return "L{}-{}".format(int(v["range"][0]), int(v["range"][1]) - 1) if "range" in v else "sel"
    if isinstance(v, list):
        return "L" + "_".join(map(str, v))
    if isinstance(v, str) and "/" in v:
        return v.rstrip("/").rsplit("/", 1)[-1]  # a checkpoint path: its folder name
    return str(v)


def load_sweep(path: str | Path, overrides: dict[str, str] | None = None) -> tuple[SweepConfig, Path]:
    """Parse and validate a sweep YAML (one-line errors naming the key); returns (config, its folder)."""
    p = Path(path)
    raw = read_yaml(p, "sweep config")
    check_overrides(raw, overrides, str(p))
    if overrides:
        raw = {**raw, "vars": {**(raw.get("vars") or {}), **overrides}}
    if isinstance(raw.get("eval"), dict):  # `${var}`s in eval settings (eval.reference waits for built inputs)
        raw["eval"] = {k: v if k == "reference" else substitute(v, raw.get("vars") or {}, f"{p}: eval.{k}")
                       for k, v in raw["eval"].items()}
    return validate(raw, str(p)), p.parent


def validate(raw: dict[str, Any], source: str) -> SweepConfig:
    """Pydantic validation with unknown keys answered by the valid ones."""
    import difflib

    for model, d, where in [(SweepConfig, raw, "")] + [(EvalConfig, raw.get("eval") or {}, "eval.")] + \
            [(GridEntry, g, f"grid[{i}].") for i, g in enumerate(raw.get("grid") or []) if isinstance(g, dict)]:
        for key in d:
            if key not in model.model_fields:
                close = difflib.get_close_matches(str(key), list(model.model_fields), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise VlsafeError(f"{source}: unknown key '{where}{key}'{hint}; valid: "
                                  f"{', '.join(model.model_fields)}")
    try:
        cfg = SweepConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise VlsafeError(f"{source}: {loc}: {err['msg'].removeprefix('Value error, ')}") from None
    if not cfg.grid:
        raise VlsafeError(f"{source}: 'grid' is empty")
    names = [g.name for g in cfg.grid]
    if len(set(names)) != len(names):
        raise VlsafeError(f"{source}: grid names must be distinct, got {names}")
    return cfg


def resolve_layers(sel: Any, base_dir: Path, where: str) -> list[int] | None:
    """A layer selection value → sorted layer list (None = all layers). Layer numbers may be digit strings (a
    `--var` value substituted into a list)."""
    if sel is None or sel == "all":
        return None
    if isinstance(sel, (int, str)) and str(sel).isdigit():
        return [int(sel)]
    if isinstance(sel, list) and all(isinstance(i, int) or (isinstance(i, str) and i.isdigit()) for i in sel):
        return sorted({int(i) for i in sel})
    if isinstance(sel, dict) and set(sel) == {"range"}:
        s, e = sel["range"]
        return list(range(int(s), int(e)))
    if isinstance(sel, dict) and "top_k" in sel:
        return _top_k(sel, base_dir, where)
    raise VlsafeError(f"{where}: layer selection {sel!r} not understood (use all, a list, {{range: [s, e]}} or "
                      "{top_k: k, from: layers.csv, score: column})")


def _top_k(sel: dict[str, Any], base_dir: Path, where: str) -> list[int]:
    """The `top_k` layers of a diff/probe `layers.csv` or a locate `signals.csv` column (empty rows skipped)."""
    import pandas as pd

    from vlsafe.analysis.merging.plans import layer_scores, top_k_layers

    src = Path(str(sel.get("from", "")))
    src = src if src.is_file() else base_dir / src
    if not src.is_file():
        raise VlsafeError(f"{where}: layers.from '{sel.get('from')}' is not a file")
    unknown = set(sel) - set(SELECTION_KEYS)
    if unknown:
        raise VlsafeError(f"{where}: unknown layer-selection key '{sorted(unknown)[0]}'; valid: "
                          f"{', '.join(SELECTION_KEYS)}")
    try:
        table = pd.read_csv(src)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise VlsafeError(f"{where}: {src}: cannot read CSV ({e.__class__.__name__})") from None
    score = str(sel.get("score", "rel_frobenius"))
    if score not in table.columns or "layer" not in table.columns:
        valid = [c for c in table.columns if c not in ("layer", "module", "checkpoint", "position")
                 and pd.api.types.is_numeric_dtype(table[c])]
        what = f"no score column '{score}'" if "layer" in table.columns else "no 'layer' column"
        raise VlsafeError(f"{where}: {src}: {what}; valid: {', '.join(map(str, valid)) or '(none)'}")
    if table[score].isna().all():
        raise VlsafeError(f"{where}: {src}: column '{score}' is empty at every layer (the signal was not measured; "
                          "see that run's run.json notes)")
    scores = layer_scores(table.dropna(subset=[score]), score, module=sel.get("module", "all"),
                          checkpoint=sel.get("checkpoint"), position=sel.get("position"))
    return top_k_layers(scores, k=int(sel["top_k"]), largest=bool(sel.get("largest", True)))


def layer_signal(sel: Any, config: Any = None) -> str:
    """Which signal chose a point's layers: `FILE:COLUMN` for a top-k selection (e.g. `signals.csv:patching_resid`),
    `range`, `list`, `all`; `config` when the template names its own layers."""
    if isinstance(sel, dict) and "top_k" in sel:
        return f"{Path(str(sel.get('from', ''))).name}:{sel.get('score', 'rel_frobenius')}"
    if isinstance(sel, dict) and "range" in sel:
        return "range"
    if isinstance(sel, (int, list)):
        return "list"
    if sel in (None, "all") and isinstance(config, dict) and config.get("layers") not in (None, "all"):
        return "config"
    return "all"


def expand(cfg: SweepConfig, env: dict[str, Any], base_dir: Path) -> list[Point]:
    """Every point of the grid (cartesian product of each entry's `vary`). Combinations of one entry that resolve
    to the same config, layers and layer signal (e.g. top-k sizes set equal by `--var`) are one point, the first."""
    points, seen = [], set()
    for i, entry in enumerate(cfg.grid):
        keys = list(entry.vary)
        for combo in itertools.product(*(entry.vary[k] for k in keys)):
            values = dict(zip(keys, combo))  # as written: labels and hashes do not depend on paths
            where = f"grid[{i}] ({entry.name})"
            used = substitute(values, env, where)
            layers = resolve_layers(used.get("layers"), base_dir, where) if "layers" in values else None
            local = {**env, **used, **({"layers": layers} if "layers" in values else {})}
            config = substitute(entry.config, local, where)
            if "layers" in values and "${layers}" not in json.dumps(entry.config):
                config = _inject_layers(entry.method, config, layers, where)
            plain = {k: (v if "/" not in str(v) else "${" + k + "}") for k, v in env.items()}
            signal = layer_signal(used.get("layers"), None if "layers" in values else config)
            same = json.dumps([entry.name, config, layers, signal], sort_keys=True, default=str)
            if same in seen:
                continue
            seen.add(same)
            points.append(Point(entry, values, layers, config, layer_signal=signal,
                                shown=substitute(values, plain, where)))
    return points


def _inject_layers(method: str, config: Any, layers: list[int] | None, where: str) -> Any:
    if layers is None:
        return config
    if method == "checkpoint" or not isinstance(config, dict):
        raise VlsafeError(f"{where}: 'layers' cannot vary for method '{method}'")
    if method == "tune":
        return {**config, "layers": {"trainable": layers}}
    return {**config, "layers": layers}
