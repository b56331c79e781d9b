"""`vlsafe tune CONFIG.yaml -o DIR`: safety SFT / LoRA / layer-targeted / SPPFT / DPO → an HF checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def tune(
        config: Annotated[Path, typer.Argument(help="Tune YAML: model, method (sft|lora|dpo), data, layers, ...")],
        out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (HF checkpoint, train_log.csv, run.json).")],
        var: Annotated[Optional[list[str]], typer.Option("--var", help="Override a YAML var, KEY=VALUE (repeatable).")] = None,
        quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    ) -> None:
        """Fine-tune a checkpoint as CONFIG says (see experiments/tune.py for the YAML)."""
        from vlsafe.experiments.tune import load_tune_config, run_tune
        from vlsafe.experiments.yamlvars import parse_vars

        run_tune(load_tune_config(config, parse_vars(var)), out, progress=not quiet)
        typer.echo(f"wrote {out}")
