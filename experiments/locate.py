"""`vlsafe locate PRE POST`: where safety is lost, on the shared layer axis.

PRE is the *source* (e.g. `llm-aligned`), POST the *target* (e.g. `lvlm`). The run writes

- `patching.csv` — activation patching PRE ↔ POST on the harmful prompts (`vlsafe.probes.patching`), text and
  each `--image` condition (text positions only); `--method attribution` fills it with first-order estimates
  instead (`vlsafe.probes.attribution`; column `method`), a minutes-long screen of the grid;
- `shift.csv`, `shift_vectors.safetensors` — POST's image-induced shift for harmful and harmless prompts, for
  `blank`, `noise:0`, `scene` (synthetic organism scenes) and `caption` (each scene's caption prepended as text),
  plus any `--image`, projected on PRE's refusal direction (`vlsafe.probes.shift`); only when POST takes images;
- `signals.csv`, `signals_corr.csv` — every signal per layer and their Spearman correlations
  (`vlsafe.probes.signals`), adding weight shift from `--diff DIR` and probe signals from `--probe DIR`;
- `figures/` (patching heat-map, signals on one layer axis) and `run.json`.

Every input is checked before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from vlsafe.analysis.errors import VlsafeError

SHIFT_IMAGES = ("blank", "noise:0", "scene")
TABLES = {"patching.csv": "patching", "shift.csv": "shift", "signals.csv": "signals",
          "signals_corr.csv": "signals_corr"}
SCENE = "scene"


@dataclass
class ImageCondition:
    """An image spec resolved to one PIL image per prompt (and captions for `scene`)."""

    spec: str
    images: list[Any]
    captions: list[str] | None = None


def check_image_spec(spec: str) -> str:
    """`scene` or a spec `vlsafe.probes.behavior.images.parse_image_spec` accepts; else a one-line error."""
    if spec == SCENE:
        return spec
    from vlsafe.probes.behavior.images import parse_image_spec

    parse_image_spec(spec)
    return spec


def resolve_images(spec: str, n: int, *, size: int, seed: int = 0) -> ImageCondition:
    """Images for `n` prompts: one fixed image (`blank`, `noise:SEED`, a file) or `n` seeded organism scenes."""
    if spec == SCENE:
        from vlsafe.experiments.organism.images import render, sample_scenes

        scenes = sample_scenes(n, seed=seed, size=max(64, size))
        return ImageCondition(spec, [render(s) for s in scenes], [s.caption() for s in scenes])
    from vlsafe.probes.behavior.images import make_image

    return ImageCondition(spec, [make_image(spec, size=size)] * n)


@dataclass
class LocateInputs:
    """Everything `run_locate` needs, validated."""

    source: Any
    target: Any
    harmful: list[str]
    harmless: list[str]
    images: list[str]
    tables: dict[str, pd.DataFrame]
    notes: list[str] = field(default_factory=list)


def _prompts(spec: str, n: int | None, seed: int, what: str) -> list[str]:
    from vlsafe.probes.behavior.datasets import load_prompts

    ps = load_prompts(spec)
    if n is not None:
        ps = ps.sample(n, seed=seed)
    if not len(ps):
        raise VlsafeError(f"--{what} {spec}: empty prompt set")
    return list(ps.prompts)


def _run_tables(run_dir: str | Path | None, flag: str, kinds: Sequence[str]) -> dict[str, pd.DataFrame]:
    if run_dir is None:
        return {}
    import json

    from vlsafe.analysis.runinfo import run_tables

    rj = Path(run_dir) / "run.json"
    if not rj.is_file():
        raise VlsafeError(f"{flag} {run_dir}: no run.json (give a vlsafe {flag.strip('-')} run directory)")
    found = run_tables(rj, json.loads(rj.read_text()))
    return {k: pd.read_csv(found[k]) for k in kinds if k in found}


def prepare(pre: str, post: str, *, images: Sequence[str] = (), prompts: str = "harmful-train",
            harmless: str = "harmless-train", n: int | None = None, seed: int = 0, diff: str | Path | None = None,
            probe: str | Path | None = None) -> LocateInputs:
    """Load and check every input (one-line errors; nothing is written)."""
    from vlsafe.probes.models import is_lvlm, load
    from vlsafe.probes.patching import check_pair

    specs = [check_image_spec(s) for s in images]
    harmful = _prompts(prompts, n, seed, "prompts")
    harmless_p = _prompts(harmless, n, seed, "harmless")
    tables = {**_run_tables(diff, "--diff", ("diff_layers", "taskvectors")),
              **_run_tables(probe, "--probe", ("probe_layers", "similarity", "drift"))}
    source, target = load(pre), load(post)
    check_pair(source, target)
    if specs and not is_lvlm(target):
        raise VlsafeError(f"--image {specs[0]}: {post} is a text-only model (it takes no images)")
    return LocateInputs(source, target, harmful, harmless_p, specs, tables)


def _image_size(lm: Any) -> int:
    from vlsafe.probes.templates import blank_image

    return blank_image(lm).size[0]


def _patching(inp: LocateInputs, *, layers: Sequence[int] | None, kind: str, min_gap: float, n_boot: int,
              seed: int, batch_size: int, method: str, precision: str) -> tuple[pd.DataFrame, list[str]]:
    from vlsafe.probes.patching import patch

    frames, notes = [], []
    for spec in [None, *inp.images]:
        cond = None if spec is None else resolve_images(spec, len(inp.harmful), size=_image_size(inp.target),
                                                        seed=seed)
        res = patch(inp.source, inp.target, inp.harmful, images=None if cond is None else cond.images,
                    image=spec or "none", layers=layers, kind=kind, batch_size=batch_size, progress=True,
                    method=method, precision=precision)
        frames.append(res.table(min_gap=min_gap, n_boot=n_boot, seed=seed))
        notes += [f"patching ({spec or 'text'}): {m}" for m in res.notes]
    return pd.concat(frames, ignore_index=True), notes


def _shift(inp: LocateInputs, *, seed: int, batch_size: int) -> Any:
    from vlsafe.probes.shift import Condition, image_shift, refusal_direction

    direction = refusal_direction(inp.source, inp.harmful, inp.harmless, batch_size=batch_size)
    conds = []
    for spec in dict.fromkeys([*SHIFT_IMAGES, *inp.images]):
        n = max(len(inp.harmful), len(inp.harmless))
        ic = resolve_images(spec, n, size=_image_size(inp.target), seed=seed)
        conds.append(Condition(spec, images=ic.images))
        if ic.captions is not None:
            conds.append(Condition("caption", captions=ic.captions))
    prompts = {"harmful": inp.harmful, "harmless": inp.harmless}
    return image_shift(inp.target, prompts, conds, direction=direction, batch_size=batch_size)


def run_locate(pre: str, post: str, out_dir: str | Path, *, images: Sequence[str] = (),
               prompts: str = "harmful-train", harmless: str = "harmless-train", n: int | None = None,
               layers: Sequence[int] | None = None, kind: str = "first_token", min_gap: float = 0.1,
               n_boot: int = 1000, seed: int = 0, batch_size: int = 8, diff: str | Path | None = None,
               probe: str | Path | None = None, figures: bool = True, method: str = "exact",
               precision: str = "fp32") -> dict[str, Path]:
    """Run the whole `vlsafe locate` into `out_dir` (see the module docstring); returns {output: path}.
    `method="attribution"` estimates the patching grid to first order (a screen; `vlsafe.probes.attribution`);
    `precision` is the patching forwards' math (`fp32`, `bf16` autocast, `auto`; `vlsafe.probes.patching.patch`)."""
    from vlsafe.analysis.placement import resolve_precision
    from vlsafe.analysis.runinfo import write_csv, write_run_json
    from vlsafe.probes.models import is_lvlm
    from vlsafe.probes.patching import check_method
    from vlsafe.probes.signals import signal_correlations, signals_table

    check_method(method, kind)            # before any model is loaded
    precision = resolve_precision(precision)
    inp = prepare(pre, post, images=images, prompts=prompts, harmless=harmless, n=n, seed=seed, diff=diff,
                  probe=probe)
    patching, notes = _patching(inp, layers=layers, kind=kind, min_gap=min_gap, n_boot=n_boot, seed=seed,
                                batch_size=batch_size, method=method, precision=precision)
    shift = _shift(inp, seed=seed, batch_size=batch_size) if is_lvlm(inp.target) else None
    if shift is None:
        notes.append(f"{post} takes no images: no image shift (shift.csv, shift_vectors.safetensors not written)")
    own = {"patching": patching, "shift": None if shift is None else shift.table()}
    from vlsafe.analysis.pairing import checkpoint_labels

    source_label, target_label = checkpoint_labels([pre, post])
    signals, sig_notes = signals_table({**inp.tables, **own}, source=source_label, target=target_label)
    corr = signal_correlations(signals, n_boot=n_boot, seed=seed)
    out = Path(out_dir)
    written = {"patching.csv": write_csv(out / "patching.csv", patching),
               "signals.csv": write_csv(out / "signals.csv", signals),
               "signals_corr.csv": write_csv(out / "signals_corr.csv", corr)}
    if shift is not None:
        written["shift.csv"] = write_csv(out / "shift.csv", own["shift"])
        written["shift_vectors.safetensors"] = shift.save(out / "shift_vectors.safetensors")
    fig_paths = _figures(out, patching, signals) if figures else []
    config = {"pre": pre, "post": post, "images": list(inp.images), "prompts": prompts, "harmless": harmless,
              "n": n, "n_harmful": len(inp.harmful), "n_harmless": len(inp.harmless), "layers": layers,
              "score": kind, "method": method, "precision": precision, "min_gap": min_gap, "n_boot": n_boot,
              "batch_size": batch_size, "diff": None if diff is None else str(diff),
              "probe": None if probe is None else str(probe)}
    written["run.json"] = write_run_json(
        out, kind="locate", tables={k: f for f, k in TABLES.items() if f in written}, config=config, seed=seed,
        checkpoints={"source": inp.source.checkpoint, "target": inp.target.checkpoint},
        extra={"notes": notes + sig_notes, "signals": [c for c in signals.columns if c != "layer"],
               "outputs": sorted([*written, *(str(p.relative_to(out)) for p in fig_paths)])})
    written.update({str(p.relative_to(out)): p for p in fig_paths})
    return written


def _figures(out: Path, patching: pd.DataFrame, signals: pd.DataFrame) -> list[Path]:
    from vlsafe.analysis.figures import save_figure
    from vlsafe.experiments.locate_figures import patching_heatmap, signals_figure

    fig_dir = out / "figures"
    paths = save_figure(patching_heatmap(patching), fig_dir, "patching")
    return paths + save_figure(signals_figure(signals), fig_dir, "signals")
