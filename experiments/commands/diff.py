"""`vlsafe diff PRE POST [POST2 ...] [--base CKPT] [--spectral] -o DIR`: where did the weights move.

Writes `tensors.csv` (one row per tensor and POST, unpaired tensors with `status=only_in_a/only_in_b`),
`layers.csv` (per layer and module, plus `module=all`), `taskvectors.csv` (with `--base`; per layer and
module) and `taskvectors_tensors.csv`, `dynamics.csv` (with two or more POSTs), `figures/` and `run.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Sequence

import pandas as pd
import typer

from vlsafe.analysis.errors import VlsafeError

OUTPUTS = ("tensors.csv", "layers.csv", "run.json")
# file → table kind in run.json (vlsafe.analysis.runinfo.TABLE_KINDS)
TABLES = {"tensors.csv": "diff_tensors", "layers.csv": "diff_layers", "taskvectors.csv": "taskvectors",
          "taskvectors_tensors.csv": "taskvectors_tensors", "dynamics.csv": "dynamics"}


def _figures(out: Path, layers: pd.DataFrame, labels: Sequence[str], tv_layers: pd.DataFrame | None,
             dyn: pd.DataFrame | None) -> list[Path]:
    from vlsafe.analysis import figures as F

    fig_dir = out / "figures"
    paths: list[Path] = []
    if len(layers) and layers["layer"].notna().any():
        paths += F.save_figure(F.layer_module_heatmap(layers), fig_dir, "heatmap_rel_frobenius")
        paths += F.save_figure(F.layer_curves(layers, labels=labels), fig_dir, "layer_curves")
    if tv_layers is not None and len(tv_layers):
        paths += F.save_figure(F.taskvector_figure(tv_layers, labels=labels), fig_dir, "taskvector_cosine")
    if dyn is not None and len(dyn):
        paths += F.save_figure(F.dynamics_figure(dyn), fig_dir, "dynamics")
    return paths


def run_diff(pre: str, posts: Sequence[str], out_dir: str | Path, *, base: str | None = None,
             spectral: bool = False, top_k: int = 8, allow_mismatch: bool = False, tv_mode: str = "chain",
             rtol: float | None = None, atol: float | None = None, figures: bool = True,
             allow_pickle: bool = False, steps: Sequence[int] | None = None,
             progress: bool = True) -> dict[str, Path]:
    """Run the whole `vlsafe diff` into `out_dir`; returns {output name: path}. `steps` (one per PRE and POST)
    sets the training step of each checkpoint in `dynamics.csv` (default: parsed from the names)."""
    from vlsafe.analysis.checkpoints import open_checkpoint
    from vlsafe.analysis.dynamics import dynamics_table
    from vlsafe.analysis.pairing import checkpoint_labels
    from vlsafe.analysis.runinfo import check_out_dir, write_csv, write_run_json
    from vlsafe.analysis.taskvectors import MODES, aggregate_task_vectors, task_vectors
    from vlsafe.analysis.weightshift import ATOL, RTOL, aggregate_layers, diff_checkpoints

    if not posts:
        raise VlsafeError("diff needs PRE and at least one POST checkpoint")
    if steps is not None and len(steps) != 1 + len(posts):
        raise VlsafeError(f"--steps: got {len(steps)} steps for {1 + len(posts)} checkpoints (one per PRE and POST)")
    if base and tv_mode not in MODES:
        raise VlsafeError(f"--tv-mode {tv_mode!r}: expected one of {', '.join(MODES)}")
    rtol, atol = RTOL if rtol is None else rtol, ATOL if atol is None else atol
    specs = [pre, *posts] + ([base] if base else [])
    ckpts = [open_checkpoint(s, allow_pickle=allow_pickle) for s in specs]
    check_out_dir(out_dir, inputs=[c.path for c in ckpts], replaces=False)
    labels = checkpoint_labels(specs)
    n = 1 + len(posts)
    out = Path(out_dir)
    tensors = diff_checkpoints(ckpts[0], ckpts[1:n], labels=labels[:n], spectral=spectral, top_k=top_k,
                               allow_mismatch=allow_mismatch, rtol=rtol, atol=atol, progress=progress)
    layers = aggregate_layers(tensors)
    written = {"tensors.csv": write_csv(out / "tensors.csv", tensors), "layers.csv": write_csv(out / "layers.csv", layers)}
    tv_layers = dyn = None
    if base:
        tv = pd.concat([task_vectors(ckpts[n], ckpts[0], c, mode=tv_mode, labels=[labels[n], labels[0], lb],
                                     progress=progress) for c, lb in zip(ckpts[1:n], labels[1:n])],
                       ignore_index=True)
        tv_layers = aggregate_task_vectors(tv)
        written["taskvectors.csv"] = write_csv(out / "taskvectors.csv", tv_layers)
        written["taskvectors_tensors.csv"] = write_csv(out / "taskvectors_tensors.csv", tv)
    if len(posts) > 1:
        dyn = dynamics_table(tensors, labels[:n], steps)
        written["dynamics.csv"] = write_csv(out / "dynamics.csv", dyn)
    fig_paths = _figures(out, layers, labels[:n], tv_layers, dyn) if figures else []
    config: dict[str, Any] = {"pre": pre, "posts": list(posts), "base": base, "spectral": spectral, "top_k": top_k,
                              "allow_mismatch": allow_mismatch, "tv_mode": tv_mode if base else None,
                              "rtol": rtol, "atol": atol, "labels": labels,
                              "steps": list(steps) if steps is not None else None}
    written["run.json"] = write_run_json(
        out, kind="diff", tables={kind: f for f, kind in TABLES.items() if f in written}, config=config,
        checkpoints=dict(zip(labels, ckpts)), seed=0 if spectral else None,
        extra={"outputs": sorted([*written, *(str(p.relative_to(out)) for p in fig_paths)]),
               "unpaired": int((tensors["status"] != "paired").sum())})
    written.update({str(p.relative_to(out)): p for p in fig_paths})
    return written


def _parse_steps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise VlsafeError(f"--steps {text!r}: give comma-separated integers, e.g. 0,24,48,128") from None


def register(app: typer.Typer) -> None:
    @app.command()
    def diff(
        ckpts: Annotated[list[str], typer.Argument(help="PRE then one or more POST checkpoints.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")],
        base: Annotated[str | None, typer.Option(help="Ancestor checkpoint: adds task-vector geometry.")] = None,
        spectral: Annotated[bool, typer.Option(help="Singular values of ΔW: stable/effective rank, top σ.")] = False,
        top_k: Annotated[int, typer.Option(min=1, help="Top-k σ and subspace size for --spectral.")] = 8,
        allow_mismatch: Annotated[bool, typer.Option(help="Report shape mismatches as rows, not errors.")] = False,
        tv_mode: Annotated[str, typer.Option(help="chain: τ_A=PRE−BASE, τ_B=POST−PRE; "
                                                  "siblings: τ_A=PRE−BASE, τ_B=POST−BASE.")] = "chain",
        rtol: Annotated[float | None, typer.Option(min=0.0, help="frac_changed: |Δ| > atol + rtol·|W₀| (default 1e-3).")] = None,
        atol: Annotated[float | None, typer.Option(min=0.0, help="frac_changed absolute tolerance (default 1e-8).")] = None,
        figures: Annotated[bool, typer.Option(help="Write figures/ (PNG + PDF).")] = True,
        allow_pickle: Annotated[bool, typer.Option(help="Allow .bin/.pt pickles (loaded weights_only).")] = False,
        steps: Annotated[str | None, typer.Option(help="Training step of each checkpoint for dynamics.csv, "
                                                       "comma-separated (default: parsed from the names).")] = None,
    ) -> None:
        """Per-tensor and per-layer weight change from PRE to each POST (streaming), optional spectra,
        task-vector geometry (--base) and dynamics (several POSTs)."""
        if len(ckpts) < 2:
            raise VlsafeError("diff needs PRE and at least one POST checkpoint")
        written = run_diff(ckpts[0], ckpts[1:], out, base=base, spectral=spectral, top_k=top_k,
                           allow_mismatch=allow_mismatch, tv_mode=tv_mode, rtol=rtol, atol=atol, figures=figures,
                           allow_pickle=allow_pickle, steps=_parse_steps(steps))
        typer.echo(f"wrote {len(written)} files to {out}: " + ", ".join(sorted(written)))
