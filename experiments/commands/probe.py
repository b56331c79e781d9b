"""`vlsafe probe CKPT [CKPT ...] [--harmful SET --harmless SET] -o DIR`: where the safety signal lives and how it moved.

Per checkpoint (and, for an LVLM with `--image`, once more with that image attached): capture the residual
stream entering (`resid_pre`) and leaving (`resid_post`) every block for the harmful and harmless sets, then

- `directions.safetensors`: difference-in-means directions `[L, P, d]` per checkpoint label (fp64,
  format `vlsafe.directions/2`; files of format /1, `[P, L, d]`, still load);
- `layers.csv`: `checkpoint, layer, position, probe_accuracy, probe_auroc, control_accuracy, direction_norm,
  d_prime, control_auroc, n` (cross-validated logistic probes with a shuffled-label control);
- `safety_layers.csv`: Li et al. cosine curves `checkpoint, layer, pair, cosine_mean, cosine_std, seed_std,
  n_pairs` (onset layers in `run.json`);
- with ≥ 2 checkpoints: `similarity.csv` (`layer, checkpoint_a, checkpoint_b, direction_cosine, position`),
  `drift.csv` (every checkpoint's activations projected on the first one's direction) and `transfer.csv`
  (probe trained on the first checkpoint, tested on the others);
- with `--select`: `selection.csv` (refusal_direction selection on the val splits; flagged when nothing passes);
- `figures/` and `run.json`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Sequence

import pandas as pd
import typer

from vlsafe.analysis.errors import VlsafeError

OUTPUTS = ("directions.safetensors", "layers.csv", "safety_layers.csv", "run.json")
# file → table kind in run.json (vlsafe.analysis.runinfo.TABLE_KINDS)
TABLES = {"layers.csv": "probe_layers", "safety_layers.csv": "safety_layers", "similarity.csv": "similarity",
          "drift.csv": "drift", "transfer.csv": "transfer", "selection.csv": "selection"}


def parse_layers(text: str | None, num_layers: int) -> list[int] | None:
    """`"0-5,10"` → [0..5, 10]; None/`all` → None (every layer). Out of range → VlsafeError."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise VlsafeError(f"--layers: cannot parse {part!r} (use e.g. 0-5,10 or all)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise VlsafeError(f"--layers: {part.strip()!r} runs backwards (write {hi}-{lo})")
        for layer in range(lo, hi + 1):
            if not 0 <= layer < num_layers:
                raise VlsafeError(f"--layers: layer {layer} out of range (valid layers: 0..{num_layers - 1})")
            out.append(layer)
    return sorted(set(out))


def parse_positions(text: str) -> Any:
    """`last`, `post_instruction`, `mean`, or comma-separated negative ints (e.g. `-3,-2,-1`)."""
    t = text.strip()
    if t in ("last", "post_instruction", "mean"):
        return t
    try:
        return [int(x) for x in t.split(",")]
    except ValueError:
        raise VlsafeError(f"--positions: {text!r} is not last, post_instruction, mean or a list like -3,-2,-1") \
            from None


def _prompt_set(spec: str, n: int | None, seed: int, what: str) -> Any:
    from vlsafe.probes.behavior.datasets import load_prompts

    ps = load_prompts(spec)
    if n is not None:
        ps = ps.sample(n, seed=seed)
    if len(ps) < 2:
        raise VlsafeError(f"--{what} {spec}: {len(ps)} prompt(s); need at least 2 (probes use cross-validation)")
    return ps


def _open_all(specs: Sequence[str]) -> tuple[list[Any], list[str]]:
    from vlsafe.analysis.checkpoints import open_checkpoint
    from vlsafe.analysis.pairing import checkpoint_labels

    ckpts = [open_checkpoint(s) for s in specs]
    widths = {c.hidden_size for c in ckpts}
    if len(widths) > 1:
        desc = ", ".join(f"{c.spec} ({c.hidden_size})" for c in ckpts)
        raise VlsafeError(f"cannot compare checkpoints with different hidden sizes: {desc}")
    return ckpts, checkpoint_labels(specs)


class _Variant:
    """One (checkpoint, image condition): its captured activations and derived tables."""

    def __init__(self, label: str, ckpt: Any, image: str | None):
        self.label, self.ckpt, self.image = label, ckpt, image
        self.harmful = self.harmless = self.directions = None


def _capture_variant(v: _Variant, lm: Any, harmful: Any, harmless: Any, layers: list[int] | None, positions: Any,
                     backend: str, batch_size: int, progress: bool, remote: str | bool = False) -> None:
    from vlsafe.probes.capture import capture
    from vlsafe.probes.directions import DirectionSet

    images = None
    if v.image is not None:
        from vlsafe.probes.behavior.images import make_image
        from vlsafe.probes.templates import blank_image

        images = make_image(v.image, size=blank_image(lm).size[0])
    kw = dict(hooks=("resid_pre", "resid_post"), layers=layers, positions=positions, images=images,
              batch_size=batch_size, backend=backend, progress=progress, remote=remote)
    v.harmful, v.harmless = capture(lm, harmful.prompts, **kw), capture(lm, harmless.prompts, **kw)
    v.directions = DirectionSet.from_activations(v.harmful, v.harmless, checkpoint=v.ckpt,
                                                 num_layers=v.ckpt.num_layers)
    v.directions.extra = {"image": v.image, "harmful": harmful.name, "harmless": harmless.name}


def _tables(v: _Variant, folds: int, seed: int, pairs: int,
            progress: bool) -> tuple[pd.DataFrame, pd.DataFrame, int | None]:
    from vlsafe.probes.linear import probe_sets
    from vlsafe.probes.safety_layers import cosine_curves, onset_layer

    probes = probe_sets(v.harmful, v.harmless, folds=folds, seed=seed, progress=progress)
    norms = v.directions.table(label=v.label)
    layers = norms.merge(probes, on=["layer", "position"])
    first = ["checkpoint", "layer", "position", "probe_accuracy", "probe_auroc", "control_accuracy", "direction_norm"]
    layers = layers[first + [c for c in layers.columns if c not in first]]
    p = v.harmful.position_index(-1)
    states = lambda a: a.stack("resid_post")[:, :, p]  # noqa: E731  [n, L, d] at the last position
    curves = cosine_curves(states(v.harmless), states(v.harmful), pairs=pairs,
                           layers=sorted(l for k, l in v.harmful.requests if k == "resid_post"))
    curves.insert(0, "checkpoint", v.label)
    return layers, curves, onset_layer(curves)


def _comparisons(variants: list[_Variant]) -> dict[str, pd.DataFrame]:
    from vlsafe.probes.compare import direction_similarity, projection_drift, transfer

    ref = variants[0]
    sim = direction_similarity({v.label: v.directions for v in variants}, reference=None)
    sim = sim[["layer", "checkpoint_a", "checkpoint_b", "direction_cosine", "position"]]
    drift = pd.concat([projection_drift(ref.directions, v.harmful, v.harmless, direction_from=ref.label,
                                        activations_from=v.label) for v in variants], ignore_index=True)
    trans = pd.concat([transfer((ref.harmful, ref.harmless), (v.harmful, v.harmless), label_a=ref.label,
                                label_b=v.label) for v in variants[1:]], ignore_index=True)
    return {"similarity.csv": sim, "drift.csv": drift, "transfer.csv": trans}


def _selection(v: _Variant, lm: Any, n_val: int, seed: int, kind: str, batch_size: int, progress: bool) -> pd.DataFrame:
    from vlsafe.probes.directions import select_direction

    hv = _prompt_set("harmful-val", n_val, seed, "harmful").prompts
    bv = _prompt_set("harmless-val", n_val, seed, "harmless").prompts
    sel = select_direction(lm, v.directions, hv, bv, kind=kind, batch_size=batch_size, on_empty="flag",
                           progress=progress)
    sel.table.insert(0, "checkpoint", v.label)
    sel.table["filtered_all"] = sel.filtered_all
    return sel.table


def _figures(out: Path, labels: list[str], layers: pd.DataFrame, curves: pd.DataFrame, onsets: dict[str, Any],
             comps: dict[str, pd.DataFrame], variants: list[_Variant]) -> list[Path]:
    from vlsafe.analysis.figures import save_figure
    from vlsafe.probes import figures as F
    from vlsafe.probes.compare import project

    fig_dir = out / "figures"
    paths = save_figure(F.probe_accuracy_figure(layers, labels), fig_dir, "probe_accuracy")
    paths += save_figure(F.safety_layers_figure(curves, labels, onsets), fig_dir, "safety_layers")
    if "similarity.csv" in comps:
        paths += save_figure(F.similarity_figure(comps["similarity.csv"], labels), fig_dir, "direction_cosine")
    ref = variants[0].directions
    best = layers[layers["checkpoint"] == variants[0].label].sort_values("probe_accuracy").iloc[-1]
    layer = int(best["layer"])
    li, p = ref.index(layer)
    proj = {v.label: (project(v.harmful, ref)[0][:, li, p].numpy(), project(v.harmless, ref)[0][:, li, p].numpy())
            for v in variants}
    paths += save_figure(F.projection_figure(proj, layer, variants[0].label, labels), fig_dir, "projections")
    return paths


def run_probe(specs: Sequence[str], out_dir: str | Path, *, harmful: str = "harmful-train",
              harmless: str = "harmless-train", layers: str | None = None, positions: str = "last",
              backend: str = "hooks", image: str | None = None, n: int | None = None, batch_size: int = 8,
              folds: int = 5, seed: int = 0, pairs: int = 500, select: bool = False, n_val: int = 32,
              score: str = "first_token", figures: bool = True, progress: bool = True,
              remote: str | None = None) -> dict[str, Path]:
    """Run the whole `vlsafe probe` into `out_dir`; returns {output name: path}.

    `remote` (`ndif`, `local` or a host URL) captures through nnsight on NDIF from a weightless local model
    (`vlsafe.probes.backends.nnsight.remote_lm`); `local` is the offline dry run. Remote runs are text-only."""
    from vlsafe.analysis.runinfo import check_out_dir, write_csv, write_run_json
    from vlsafe.probes.directions import save_directions
    from vlsafe.probes.models import load

    if not specs:
        raise VlsafeError("probe needs at least one checkpoint")
    ckpts, labels = _open_all(specs)
    check_out_dir(out_dir, inputs=[c.path for c in ckpts], replaces=False)
    remote_mode, backend = _remote(remote, backend, select, image)
    if image is not None:
        from vlsafe.probes.behavior.images import parse_image_spec

        parse_image_spec(image)
    hset, bset = _prompt_set(harmful, n, seed, "harmful"), _prompt_set(harmless, n, seed, "harmless")
    lays = parse_layers(layers, min(c.num_layers for c in ckpts))
    pos = _with_last(parse_positions(positions))
    variants, selections, notes = [], [], []
    for ckpt, label in zip(ckpts, labels):
        lm = load(ckpt) if not remote_mode else _remote_lm(ckpt, remote_mode)
        conds = [None] + ([image] if image is not None and ckpt.family.is_lvlm else [])
        if image is not None and not ckpt.family.is_lvlm:
            notes.append(f"{label}: text-only model, --image {image} skipped")
        for cond in conds:
            v = _Variant(label if cond is None else f"{label}+{cond}", ckpt, cond)
            _capture_variant(v, lm, hset, bset, lays, pos, backend, batch_size, progress, remote_mode)
            variants.append(v)
            if select:
                selections.append(_selection(v, lm, n_val, seed, score, batch_size, progress))
        del lm
    names = [v.label for v in variants]
    results = [_tables(v, folds, seed, pairs, progress) for v in variants]
    layers_df = pd.concat([r[0] for r in results], ignore_index=True)
    curves = pd.concat([r[1] for r in results], ignore_index=True)
    onsets = {v.label: r[2] for v, r in zip(variants, results)}
    out = Path(out_dir)
    written = {"directions.safetensors": save_directions(out / "directions.safetensors",
                                                         {v.label: v.directions for v in variants}),
               "layers.csv": write_csv(out / "layers.csv", layers_df),
               "safety_layers.csv": write_csv(out / "safety_layers.csv", curves)}
    comps = _comparisons(variants) if len(variants) > 1 else {}
    written.update({name: write_csv(out / name, df) for name, df in comps.items()})
    if selections:
        written["selection.csv"] = write_csv(out / "selection.csv", pd.concat(selections, ignore_index=True))
    fig_paths = _figures(out, names, layers_df, curves, onsets, comps, variants) if figures else []
    config = {"checkpoints": list(specs), "labels": names, "harmful": harmful, "harmless": harmless, "n": n,
              "n_harmful": len(hset), "n_harmless": len(bset), "layers": lays, "positions": positions,
              "backend": backend, "image": image, "batch_size": batch_size, "folds": folds, "pairs": pairs,
              "select": select, "n_val": n_val if select else None, "score": score if select else None,
              "remote": remote}
    written["run.json"] = write_run_json(
        out, kind="probe", tables={kind: f for f, kind in TABLES.items() if f in written}, config=config,
        checkpoints=dict(zip(labels, ckpts)), seed=seed,
        extra={"outputs": sorted([*written, *(str(p.relative_to(out)) for p in fig_paths)]),
               "onset_layers": onsets, "notes": notes})
    written.update({str(p.relative_to(out)): p for p in fig_paths})
    return written


def _remote(remote: str | None, backend: str, select: bool, image: str | None) -> tuple[str | bool, str]:
    """(capture's `remote` value, backend) for `--remote`; one-line errors for what cannot run remotely."""
    if remote is None:
        return False, backend
    from vlsafe.probes.backends.nnsight import check_remote

    if backend not in ("hooks", "nnsight"):
        raise VlsafeError(f"--remote captures with nnsight; --backend {backend} cannot run remotely")
    if select or image is not None:
        raise VlsafeError("--remote runs text-only captures: drop --select (it generates) and --image")
    return check_remote(remote), "nnsight"


def _remote_lm(ckpt: Any, remote: str | bool) -> Any:
    """Weightless model: by hub id for NDIF, from the local directory for the dry run."""
    from vlsafe.probes.backends.nnsight import remote_lm

    return remote_lm(str(ckpt.path) if remote == "local" else ckpt.spec)


def _with_last(positions: Any) -> Any:
    """Positions plus the last token (the safety-layer curves read it), keeping the requested ones first."""
    items = [positions] if isinstance(positions, str) else list(positions)
    return items if "last" in items or -1 in items else items + ["last"]


def register(app: typer.Typer) -> None:
    @app.command()
    def probe(
        ckpts: Annotated[list[str], typer.Argument(help="Checkpoints (HF dirs, files, hub ids, 'default').")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")],
        harmful: Annotated[str, typer.Option(help="Harmful prompt set (shipped name, file, HF id).")] = "harmful-train",
        harmless: Annotated[str, typer.Option(help="Harmless prompt set.")] = "harmless-train",
        layers: Annotated[str, typer.Option(help="Layers, e.g. 0-5,10 (default: all).")] = "all",
        positions: Annotated[str, typer.Option(help="last, post_instruction, mean or e.g. -3,-2,-1.")] = "last",
        backend: Annotated[str, typer.Option(help="Capture backend: hooks, transformer_lens, nnsight.")] = "hooks",
        image: Annotated[str | None, typer.Option(
            help="Also probe LVLMs with this image: blank, noise:SEED or a path.")] = None,
        n: Annotated[int | None, typer.Option(min=1, help="Sample N prompts per set (seeded).")] = None,
        batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward pass.")] = 8,
        folds: Annotated[int, typer.Option(min=2, help="Cross-validation folds.")] = 5,
        pairs: Annotated[int, typer.Option(min=1, help="Random pairs per seed for the safety-layer curves.")] = 500,
        select: Annotated[bool, typer.Option(help="Run refusal-direction selection on the val splits.")] = False,
        n_val: Annotated[int, typer.Option(min=1, help="Prompts per val set for --select.")] = 32,
        score: Annotated[str, typer.Option(help="Refusal score for --select: first_token or opening.")] = "first_token",
        seed: Annotated[int, typer.Option(help="Seed for sampling, CV splits and the control.")] = 0,
        remote: Annotated[str | None, typer.Option(
            help="Capture on NDIF through nnsight: 'ndif' (needs NDIF_API_KEY), a host URL, or 'local' for the "
                 "offline dry run. Weights are never loaded here; text-only.")] = None,
        no_figures: Annotated[bool, typer.Option("--no-figures", help="Skip figures/.")] = False,
    ) -> None:
        """Safety directions, linear probes and safety-layer curves per checkpoint, compared across checkpoints."""
        written = run_probe(ckpts, out, harmful=harmful, harmless=harmless, layers=layers, positions=positions,
                            backend=backend, image=image, n=n, batch_size=batch_size, folds=folds, seed=seed,
                            pairs=pairs, select=select, n_val=n_val, score=score, figures=not no_figures,
                            remote=remote)
        typer.echo(f"wrote {len(written)} files to {out}: {', '.join(sorted(written)[:8])}")
