"""`vlsafe demo`: the main job on the embedded default, end to end, into one report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (reused as a cache).")] = Path("runs/demo"),
        profile: Annotated[str, typer.Option(help="full: the SmolLM2 organism (~30 min first time, cached after); "
                                                  "tiny: the same pipeline on tiny random models (~2 min).")] = "full",
    ) -> None:
        """Organism → weight shift → probes → localisation → behaviour → merge sweep → report.html.

        Each stage runs the same `vlsafe` command a researcher would; a second run reuses every cached stage.
        """
        from vlsafe.analysis.runinfo import check_out_dir
        from vlsafe.experiments.demo import run_demo

        check_out_dir(out, replaces=False)
        report = run_demo(out, profile=profile, echo=typer.echo)
        typer.echo(f"[demo] done: {report}")
