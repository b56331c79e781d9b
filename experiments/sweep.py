"""Safety-vs-helpfulness sweeps: a grid of remedies (merges, tuning runs, RESTA, plain checkpoints), each point
materialised once, evaluated through the behaviour API, and summarised as a Pareto table and figures.

The YAML schema, `${vars}`, layer selections and grid expansion are in `vlsafe.experiments.sweep_config`; the
evaluation (fast, full, two-stage; the image harmful set) in `vlsafe.experiments.sweep_eval`; the two-stage keep
rule in `vlsafe.experiments.sweep_stages`.

`pareto.csv`: point, hash, method, family (merge, tuning, activation, reference), params, layers, layer_signal (the
signal that chose the layers), stage (`full`: generate + judge; `screen`: logit score), safety, over_refusal,
helpfulness (each with `_ci_low/_ci_high`), safety_image (+ interval; NaN for text-only models or without
`eval.harmful_image`), n_* per set, model (the checkpoint evaluated; `in-memory:<hash>` for a merge point only
screened, merged in memory and never written), kept_by (two-stage: why a point was or was not evaluated in full:
`reference`, `front`, `cap-rank N`, `dominated`, `over cap (rank N)`), screen_* (two-stage: the screened numbers
of a point evaluated in full, e.g. screen_safety, screen_helpfulness; NaN otherwise; see
`vlsafe.experiments.sweep_stages`), is_pareto (and is_pareto_image). With full points present, the fronts
are computed among them only. Figures: `figures/pareto.{png,pdf}` and, with an image set,
`pareto_image.{png,pdf}` (the report's figure: points numbered, `figures/pareto_key.csv` names them).

A new method plugs in through `sweep_config.METHODS`/`FAMILY`, `_inputs_of`, `materialise` (return the base
checkpoint's spec when nothing is built) and, for an evaluation under a context manager, `evaluate_point(under=…)`.

Layout: `DIR/points/<hash>/` (`point.json`, `model/`, `done.json`, `eval-<evalhash>/` with `metrics.json`,
`eval.json` and, in full mode, `generations.jsonl`), built in a temp folder and renamed. A full evaluation whose
point already has one with the same generation settings and another judge (or judge version) judges those stored
generations again instead of generating (`sweep_eval.rejudge_point`; `eval.json` names the folder it came from). The
screen of a two-stage sweep merges `merge` points in memory (`vlsafe.analysis.merging.load_merged`, the same weights
as the written checkpoint loaded; `run_sweep(..., screen_in_memory=False)` writes them): such a point's folder holds
`point.json` and `eval-<screenhash>/` only, no `model/` and no `done.json`; its screen is reused on `--resume`, and
when the point is kept for the full stage its checkpoint is built then (into a new folder that takes over the cached
evaluations) and gets `done.json`. Any other folder without `done.json` is rebuilt before it is evaluated (its
cached evaluations kept when it has `point.json`; a folder without one is foreign and redone). The hash covers the
entry name, method, template, the point's variable values and the content hashes of its input checkpoints (not their
paths). Each evaluation is cached per point under its eval key, so a two-stage sweep caches its screen and its full
evaluation separately. `DIR/run.json` too (its `screen_in_memory` says whether the screen merged in memory); with
judge-corrected columns (`safety_corrected`, …) it records the judge's calibration they come from
(`judge_calibration`; None otherwise).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from tqdm.auto import tqdm

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.runinfo import atomic_path, write_csv, write_json, write_run_json
from vlsafe.experiments.sweep_config import (FAMILY, RESTA_KEYS, RESTA_REQUIRED, Point, SweepConfig, expand,
                                             load_sweep, resolve_layers)
from vlsafe.experiments.sweep_eval import (EvalConfig, can_rejudge, check_image_set, evaluate_point,
                                           judge_calibration, mark_pareto, pareto_figures, reference_answers,
                                           rejudge_point)
from vlsafe.experiments.sweep_remedy import preflight_remedy, remedy_model, remedy_under
from vlsafe.experiments.sweep_stages import staged_rows, stage_of
from vlsafe.experiments.yamlvars import substitute

__all__ = ["load_sweep", "resolve_layers", "run_sweep", "run_point", "finished_row", "SweepConfig", "Point",
           "IN_MEMORY"]


# ---- materialisation ------------------------------------------------------------------------------------------------
def _inputs_of(point: Point, base_dir: Path) -> list[str]:
    c, m = point.config, point.entry.method
    if m == "checkpoint":
        return [c if isinstance(c, str) else c.get("model", "")]
    if m == "merge":
        from vlsafe.analysis.merging.config import MergePlan

        return MergePlan.from_dict(c, point.label).with_paths_from(base_dir).inputs()
    if m == "resta":
        return [c.get(k, "") for k in ("sft", "aligned", "unaligned")]
    if m == "remedy":
        return [remedy_model(c, point.label)]
    return [c.get("model", "")]


def local(spec: str, base_dir: Path) -> str:
    """A relative checkpoint path that exists only next to the config resolves there; anything else is kept."""
    spec = str(spec)
    return str(base_dir / spec) if not Path(spec).exists() and (base_dir / spec).exists() else spec


def point_key(point: Point, base_dir: Path) -> str:
    """Hash of (name, method, template, values, input content hashes)."""
    from vlsafe.analysis.checkpoints import open_checkpoint

    inputs = [local(spec, base_dir) for spec in _inputs_of(point, base_dir)]
    hashes = [open_checkpoint(spec).content_hash() for spec in inputs]
    e = point.entry
    record = {"name": e.name, "method": e.method, "template": e.config, "values": point.values,
              "layers": point.layers, "inputs": hashes}
    if e.method == "remedy":  # the vectors' content, not their path
        record["remedy"] = preflight_remedy(point.config, point.label, base_dir, inputs[0]).key()
    blob = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def materialise(point: Point, out: Path, base_dir: Path) -> str | None:
    """Build the point's checkpoint into `out` (absent for `checkpoint` points); returns the spec to evaluate."""
    m, c = point.entry.method, point.config
    if m == "checkpoint":
        return local(c if isinstance(c, str) else c["model"], base_dir)
    if m == "remedy":
        return local(remedy_model(c, point.label), base_dir)
    if m == "merge":
        from vlsafe.analysis.merging import run_merge
        from vlsafe.analysis.merging.config import MergePlan

        plan = MergePlan.from_dict(c, point.label).with_paths_from(base_dir)
        run_merge(plan, out, progress=False)
    elif m == "resta":
        from vlsafe.experiments.baselines import resta

        paths = {k: local(c[k], base_dir) for k in RESTA_REQUIRED}
        resta(**{**c, **paths, "progress": False}, out_dir=out)
    else:
        from vlsafe.experiments.tune import TuneConfig, run_tune

        run_tune(TuneConfig.parse(c, point.label, base_dir), out, progress=False)
    return str(out)


def preflight(point: Point, base_dir: Path) -> None:
    """Validate a point's config against its inputs before any work (unknown keys, layers out of range)."""
    m, c = point.entry.method, point.config
    if m == "merge":
        from vlsafe.analysis.checkpoints import open_checkpoint
        from vlsafe.analysis.merging.config import MergePlan

        plan = MergePlan.from_dict(c, point.label).with_paths_from(base_dir)
        plan.check_layers(open_checkpoint(plan.layout_model()).num_layers, source=point.label)
    elif m == "resta":
        from vlsafe.analysis.checkpoints import open_checkpoint

        bad = sorted(set(c) - RESTA_KEYS) if isinstance(c, dict) else ["(not a mapping)"]
        if bad:
            raise VlsafeError(f"{point.label}: unknown RESTA parameter '{bad[0]}'; valid: {', '.join(sorted(RESTA_KEYS))}")
        missing = sorted(RESTA_REQUIRED - set(c))
        if missing:
            raise VlsafeError(f"{point.label}: RESTA needs '{missing[0]}' (sft, aligned, unaligned checkpoints)")
        n = open_checkpoint(local(c["sft"], base_dir)).num_layers
        out = [i for i in c.get("layers") or [] if not 0 <= i < n]
        if out:
            raise VlsafeError(f"{point.label}: layer {out[0]} out of range (the SFT model has {n} layers, 0..{n - 1})")
    elif m == "tune":
        from vlsafe.experiments.tune import TuneConfig

        TuneConfig.parse(c, point.label, base_dir).check_layers()
    elif m == "remedy":
        preflight_remedy(c, point.label, base_dir, local(remedy_model(c, point.label), base_dir))


Hook = Callable[[Point], None]
IN_MEMORY = "in-memory:"  # pareto.csv's `model` of a point only screened in memory: IN_MEMORY + its hash


def _new_point_folder(point: Point, pdir: Path, fill: Callable[[Path], None]) -> None:
    """`pdir` with `point.json` and what `fill(folder)` writes, built in a temp folder and renamed; the cached
    evaluations of an earlier folder of the point (one with `point.json`) move over, a foreign folder is dropped."""
    old = pdir.is_dir() and (pdir / "point.json").is_file()
    if pdir.exists() and not old:
        shutil.rmtree(pdir)  # foreign
    with atomic_path(pdir) as tmp:
        tmp.mkdir()
        write_json(tmp / "point.json", {"point": point.label, "method": point.entry.method, "values": point.values,
                                        "layers": point.layers, "config": point.config})
        fill(tmp)
        for edir in sorted(pdir.glob("eval-*")) if old else []:
            shutil.move(edir, tmp / edir.name)


def _build_point(point: Point, pdir: Path, base_dir: Path, before: Hook | None) -> None:
    def build(tmp: Path) -> None:
        if before is not None:
            before(point)
        spec = materialise(point, tmp / "model", base_dir)
        write_json(tmp / "done.json", {"point": point.label, "spec": None if spec == str(tmp / "model") else spec})
    _new_point_folder(point, pdir, build)


def _spec(pdir: Path) -> str:
    if not (pdir / "done.json").is_file():
        return IN_MEMORY + pdir.name
    done = json.loads((pdir / "done.json").read_text())
    return done.get("spec") or str(pdir / "model")


def _metrics_file(pdir: Path, cfg: EvalConfig) -> Path:
    return pdir / f"eval-{cfg.key()}" / "metrics.json"


def _evaluate(point: Point, pdir: Path, cfg: EvalConfig, refs: list[str] | None, base: Path,
              build: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Metrics of a built point (or of the model `build()` returns), cached in `eval-<evalhash>/metrics.json`
    (generations too in full mode)."""
    edir = _metrics_file(pdir, cfg).parent
    if (edir / "metrics.json").is_file():
        return json.loads((edir / "metrics.json").read_text())
    if edir.exists():
        shutil.rmtree(edir)
    gen_key = cfg.generation_key()
    stored = _stored_generations(pdir, cfg, gen_key)
    spec = str(pdir / "model") if build is not None else _spec(pdir)  # in memory: the label it would have
    with atomic_path(edir) as tmp:
        tmp.mkdir()
        metrics = _rejudged(stored, cfg, spec, tmp) if stored is not None else None
        if metrics is None:
            under = remedy_under(point.config, point.label, base) if point.entry.method == "remedy" else None
            metrics = evaluate_point(spec, cfg, refs, out_dir=tmp if cfg.mode == "full" else None, under=under,
                                     build=build)
            stored = None
        write_json(tmp / "eval.json", {"key": edir.name.removeprefix("eval-"), "generation_key": gen_key,
                                       "rejudged_from": stored.name if stored is not None else None})
        write_json(tmp / "metrics.json", metrics)
    return dict(sorted(metrics.items()))  # the order a cached metrics.json comes back in: pareto.csv's columns


def _rejudged(stored: Path, cfg: EvalConfig, spec: str, out_dir: Path) -> dict[str, Any] | None:
    """The metrics of `stored`'s generations judged again by `cfg.judge` (written to `out_dir`), or None when they
    are for other prompts (a changed prompt file: generate again)."""
    try:
        gens = pd.read_json(stored / "generations.jsonl", lines=True, dtype=False)
        return rejudge_point(gens, cfg, checkpoint=spec, out_dir=out_dir)
    except (VlsafeError, ValueError, KeyError):
        return None


def _stored_generations(pdir: Path, cfg: EvalConfig, gen_key: str) -> Path | None:
    """An earlier full evaluation folder of the point with the same generation settings and another judge (or
    another version of it): its `eval.json` says so, or, written before that record, its key is what `cfg` had
    with an unversioned judge. None when there is none or `cfg` needs more than generations."""
    if not can_rejudge(cfg):
        return None
    legacy = pdir / f"eval-{cfg.key(fingerprint=False)}"
    for edir in sorted(pdir.glob("eval-*")):
        if not ((edir / "metrics.json").is_file() and (edir / "generations.jsonl").is_file()):
            continue
        try:
            same = json.loads((edir / "eval.json").read_text()).get("generation_key") == gen_key
        except (OSError, ValueError):
            same = edir == legacy
        if same:
            return edir
    return None


def _build_inputs(cfg: SweepConfig, out: Path) -> dict[str, str]:
    from vlsafe.analysis.tiny import tiny_llama, tiny_llava

    built = {}
    for name, spec in cfg.inputs.items():
        dst = out / "inputs" / name
        if not (dst / "config.json").is_file():
            with atomic_path(dst) as tmp:
                build = tiny_llama if spec.tiny == "llama" else tiny_llava
                build(tmp, layers=spec.layers, hidden=spec.hidden, seed=spec.seed)
        built[name] = str(dst.resolve())
    return built


def _check_out(out: Path, resume: bool) -> None:
    """Refuse to mix with a foreign or earlier folder unless resuming (built `inputs/` alone are reused)."""
    if out.exists() and not out.is_dir():
        raise VlsafeError(f"{out}: exists and is not a folder; choose a new -o folder")
    if out.exists() and {p.name for p in out.iterdir()} - {"inputs"} and not resume:
        if (out / "points").is_dir():
            raise VlsafeError(f"{out}: holds an earlier sweep; pass --resume to continue it or choose a new -o folder")
        raise VlsafeError(f"{out}: exists and is not empty; choose a new -o folder")
    points = out / "points"
    if points.is_dir():
        for stale in [*points.glob(".*"), *points.glob("*/.*")]:  # temp folders of a killed run
            shutil.rmtree(stale, ignore_errors=True)


def _row(point: Point, pdir: Path, metrics: dict[str, Any], helpfulness: str) -> dict[str, Any]:
    params = {k: v for k, v in point.values.items() if k != "layers"}
    return {"point": point.label, "hash": point.key, "method": point.entry.method,
            "family": _family(point), "params": json.dumps(params, sort_keys=True, default=str),
            "layers": "all" if point.layers is None else " ".join(map(str, point.layers)),
            "layer_signal": point.layer_signal, **metrics, "helpfulness_kind": helpfulness, "model": _spec(pdir)}


def _family(point: Point) -> str:
    """`FAMILY` of the method; a gated remedy is its own family (`gated`: its own colour and marker)."""
    c = point.config
    gated = point.entry.method == "remedy" and isinstance(c, dict) and c.get("kind") == "gated"
    return "gated" if gated else FAMILY[point.entry.method]


def _memory_plan(point: Point, base: Path) -> Any:
    """The merge plan of a `merge` point that `load_merged` reproduces exactly, else None."""
    if point.entry.method != "merge":
        return None
    from vlsafe.analysis.merging import not_in_memory
    from vlsafe.analysis.merging.config import MergePlan

    plan = MergePlan.from_dict(point.config, point.label).with_paths_from(base)
    return plan if not_in_memory(plan) is None else None


def run_point(point: Point, *, out: Path, base: Path, ecfg: Any, refs: Any, before: Hook | None = None,
              in_memory: bool = False) -> dict[str, Any]:
    """Build (unless done) and evaluate one point; its pareto.csv row. With `in_memory` (a two-stage sweep's screen)
    a `merge` point not built yet is merged in memory instead (`before` is called all the same): its folder gets
    `point.json` and the evaluation only. Module-level so Ray can ship it."""
    pdir = out / "points" / point.key
    built = (pdir / "done.json").is_file()
    plan = _memory_plan(point, base) if in_memory and not built else None
    if plan is None:
        if not built:
            _build_point(point, pdir, base, before)
        return _row(point, pdir, _evaluate(point, pdir, ecfg, refs, base), ecfg.helpfulness)
    if not _metrics_file(pdir, ecfg).is_file():
        if before is not None:
            before(point)
        if not (pdir / "point.json").is_file():
            _new_point_folder(point, pdir, lambda tmp: None)
    from vlsafe.analysis.merging import load_merged

    metrics = _evaluate(point, pdir, ecfg, refs, base, build=lambda: load_merged(plan))
    return _row(point, pdir, metrics, ecfg.helpfulness)


def finished_row(point: Point, *, out: Path, ecfg: Any, in_memory: bool = False) -> dict[str, Any] | None:
    """The row of a point that is built and evaluated already (with `in_memory`, also of a `merge` point screened
    in memory), else None (so Ray skips dispatching it)."""
    pdir = out / "points" / point.key
    m = _metrics_file(pdir, ecfg)
    built = (pdir / "done.json").is_file() or (in_memory and point.entry.method == "merge")
    if built and m.is_file():
        return _row(point, pdir, json.loads(m.read_text()), ecfg.helpfulness)
    return None


def run_sweep(cfg: SweepConfig, out_dir: str | Path, *, base_dir: str | Path = ".", resume: bool = False,
              progress: bool = True, before_point: Hook | None = None, ray: str | None = None,
              ray_resources: dict[str, Any] | None = None, screen_in_memory: bool = True) -> pd.DataFrame:
    """Materialise and evaluate every point (finished ones are reused), then write `pareto.csv`, the figure and
    `run.json`. `before_point` is called inside each point's build (tests use it to simulate a crash).
    `screen_in_memory` (two-stage only): screen `merge` points merged in memory, writing only those kept.
    `ray` (`auto`, `local`, `ray://HOST:10001`, `HOST:6379`) dispatches points as Ray tasks with `ray_resources`."""
    out, base = Path(out_dir), Path(base_dir)
    _check_out(out, resume)
    fresh = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:  # every problem surfaces before the first point is built; a fresh folder is removed again
        points, refs = _prepare(cfg, out, base)
    except VlsafeError:
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        raise
    root, rbase = (out.resolve(), base.resolve()) if ray else (out, base)

    def run(pts: Any, ecfg: EvalConfig) -> list[dict[str, Any]]:
        mem = screen_in_memory and cfg.eval.mode == "two-stage" and stage_of(ecfg) == "screen"
        one = functools.partial(run_point, out=root, base=rbase, ecfg=ecfg, refs=refs, before=before_point,
                                in_memory=mem)
        if ray is None:
            return [one(p) for p in tqdm(pts, desc=f"sweep ({stage_of(ecfg)})", unit="point", disable=not progress)]
        from vlsafe.experiments.sweep_ray import run_points_ray

        return run_points_ray(pts, one, address=ray, resources=ray_resources,
                              done=functools.partial(finished_row, out=root, ecfg=ecfg, in_memory=mem),
                              label=lambda p: p.label, progress=progress)

    rows = staged_rows(points, cfg.eval, run)
    table = mark_pareto(pd.DataFrame(rows))
    write_csv(out / "pareto.csv", table)
    pareto_figures(table, out / "figures")
    write_run_json(out, kind="sweep", tables={"pareto": "pareto.csv"}, config=cfg.model_dump(), seed=cfg.seed,
                   extra={"points": {r["point"]: r["hash"] for r in rows}, "base_dir": str(base.resolve()),
                          "ray": ray, "screen_in_memory": screen_in_memory and cfg.eval.mode == "two-stage",
                          "judge_calibration": judge_calibration(cfg.eval, table)})
    return table


def _prepare(cfg: SweepConfig, out: Path, base: Path) -> tuple[list[Point], list[str] | None]:
    """Build the tiny inputs, expand the grid, check every point and key it; the reference answers."""
    env = {**{k: str(v) if not isinstance(v, (int, float)) else v for k, v in cfg.vars.items()},
           **_build_inputs(cfg, out)}
    points = expand(cfg, env, base)
    check_image_set(cfg.eval)
    full = cfg.eval.stage_config("full")
    refs = reference_answers(full.model_copy(update={"reference": substitute(full.reference, env, "eval")}))
    for point in points:
        preflight(point, base)
        point.key = point_key(point, base)
    return points, refs
