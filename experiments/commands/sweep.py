"""`vlsafe sweep CONFIG.yaml -o DIR [--resume]`: a grid of remedies → `pareto.csv` + `figures/pareto.*`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

def register(app: typer.Typer) -> None:
    @app.command()
    def sweep(
        config: Annotated[Path, typer.Argument(help="Sweep YAML: vars, inputs, eval, grid (see experiments/sweep.py).")],
        out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (points/, pareto.csv, figures/, run.json).")],
        resume: Annotated[bool, typer.Option(help="Continue a sweep in OUT: finished points are reused.")] = False,
        var: Annotated[Optional[list[str]], typer.Option("--var", help="Override a YAML var, KEY=VALUE (repeatable).")] = None,
        quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    ) -> None:
        """Materialise and evaluate every grid point (merge, tune, RESTA or a checkpoint), then the Pareto front."""
        from experiments.sweep import load_sweep, run_sweep
        from experiments.yamlvars import parse_vars

        cfg, base = load_sweep(config, parse_vars(var))
        table = run_sweep(cfg, out, base_dir=base, resume=resume, progress=not quiet)
        front = table[table["is_pareto"]]["point"].tolist()
        typer.echo(f"wrote {out / 'pareto.csv'} ({len(table)} points; Pareto: {', '.join(front)})")
