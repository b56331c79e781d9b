"""`vlsafe report DIR`: a self-contained HTML page for any run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def report(
        run_dir: Annotated[Path, typer.Argument(help="A run directory (any vlsafe output, or the demo tree).")],
        title: Annotated[str, typer.Option(help="Page title.")] = "vlsafe report",
    ) -> None:
        """Write DIR/report.html (figures embedded, no external links) and DIR/figures/report_*.{png,pdf}."""
        from vlsafe.experiments.report import build_report

        out = build_report(run_dir, title=title)
        typer.echo(f"wrote {out}")
