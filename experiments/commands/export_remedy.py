"""`vlsafe export-remedy SPEC.yaml -o DIR`: a constant steering remedy folded into biases, as a plain checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command(name="export-remedy")
    def export_remedy(
        spec: Annotated[Path, typer.Argument(help="Remedy spec YAML (kind: steer, positions: all; see docs/methods.md).")],
        out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (HF checkpoint and run.json).")],
        checkpoint: Annotated[Optional[str], typer.Option(help="Checkpoint to steer (overrides the spec's 'checkpoint:').")] = None,
    ) -> None:
        """Write CHECKPOINT with the spec's steering vectors in its biases: it needs no hooks, runs in any engine."""
        from vlsafe.probes.remedy_export import export_remedy as run
        from vlsafe.probes.remedy_spec import RemedySpec

        run(RemedySpec.from_yaml(spec), out, checkpoint=checkpoint)
        typer.echo(f"wrote {out}")
