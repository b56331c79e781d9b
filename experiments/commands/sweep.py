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
        ray: Annotated[Optional[str], typer.Option(help="Dispatch points to Ray: auto, local, ray://HOST:10001 "
                                                        "or HOST:6379 (needs vlsafe[ray]).")] = None,
        ray_cpus: Annotated[float, typer.Option(min=0.0, help="CPUs per point with --ray.")] = 1,
        ray_gpus: Annotated[float, typer.Option(min=0.0, help="GPUs per point with --ray.")] = 0,
        write_screened: Annotated[bool, typer.Option(help="Two-stage: write every merge point's checkpoint before "
                                                          "its screen (default: screen it merged in memory).")] = False,
    ) -> None:
        """Materialise and evaluate every grid point (merge, tune, RESTA or a checkpoint), then the Pareto front."""
        from vlsafe.experiments.sweep import load_sweep, run_sweep
        from vlsafe.experiments.yamlvars import parse_vars

        if ray is None and (ray_cpus != 1 or ray_gpus != 0):
            from vlsafe.analysis.errors import VlsafeError

            raise VlsafeError("--ray-cpus/--ray-gpus apply to points dispatched with --ray; give --ray too")
        cfg, base = load_sweep(config, parse_vars(var))
        table = run_sweep(cfg, out, base_dir=base, resume=resume, progress=not quiet, ray=ray,
                          ray_resources={"num_cpus": ray_cpus, "num_gpus": ray_gpus} if ray else None,
                          screen_in_memory=not write_screened)
        front = table[table["is_pareto"]]["point"].tolist()
        typer.echo(f"wrote {out / 'pareto.csv'} ({len(table)} points; Pareto: {', '.join(front)})")
