"""`vlsafe locate PRE POST [--image SPEC] [--prompts SET] [--n N] -o DIR`: where safety is lost (activation
patching PRE ↔ POST, POST's image-induced shift, every localisation signal on one layer axis).
See `vlsafe.experiments.locate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def locate(
        pre: Annotated[str, typer.Argument(help="Source checkpoint (e.g. the aligned LLM).")],
        post: Annotated[str, typer.Argument(help="Target checkpoint (e.g. the LVLM built from it).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")],
        image: Annotated[list[str] | None, typer.Option(
            help="Also patch with this image attached (POST must take images): blank, noise:SEED, scene or a "
                 "path; repeatable.")] = None,
        prompts: Annotated[str, typer.Option(
            help="Harmful prompt set (patching, shift); a -train split by default, because signals.csv may choose "
                 "a remedy's layers.")] = "harmful-train",
        harmless: Annotated[str, typer.Option(
            help="Harmless prompt set (refusal direction, shift).")] = "harmless-train",
        n: Annotated[int | None, typer.Option(min=1, help="Sample N prompts per set (seeded).")] = None,
        layers: Annotated[str, typer.Option(help="Layers to patch, e.g. 0-5,10 (default: all).")] = "all",
        score: Annotated[str, typer.Option(help="Refusal score: first_token or opening.")] = "first_token",
        method: Annotated[str, typer.Option(
            help="exact: one patched forward per site (resumed from the patched block); attribution: first-order "
                 "estimates of every site from one backward pass per direction — a fast screen whose numbers can "
                 "be far off where refusal saturates; confirm its top layers with exact patching.")] = "exact",
        precision: Annotated[str, typer.Option(
            help="Forward math of the patching: fp32, bf16 (autocast; ~2x faster on CPUs with native bf16, the "
                 "scores move slightly and per-site recoveries with them) or auto (bf16 where native).")] = "fp32",
        min_gap: Annotated[float, typer.Option(help="Drop prompts whose two models' scores differ by less.")] = 0.1,
        n_boot: Annotated[int, typer.Option(min=1, help="Bootstrap resamples for the intervals.")] = 1000,
        diff: Annotated[Path | None, typer.Option(help="A `vlsafe diff PRE POST` run: weight-shift signals.")] = None,
        probe: Annotated[Path | None, typer.Option(help="A `vlsafe probe PRE POST` run: probe signals.")] = None,
        batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward pass.")] = 8,
        seed: Annotated[int, typer.Option(help="Seed for sampling, scenes and the bootstrap.")] = 0,
        no_figures: Annotated[bool, typer.Option("--no-figures", help="Skip figures/.")] = False,
    ) -> None:
        """Which layers and components carry the change in refusal from PRE to POST (patching, image shift,
        signals table)."""
        from vlsafe.analysis.checkpoints import open_checkpoint
        from vlsafe.analysis.runinfo import check_out_dir
        from vlsafe.experiments.commands.probe import parse_layers
        from vlsafe.experiments.locate import run_locate

        check_out_dir(out, inputs=[pre, post], replaces=False)
        lays = parse_layers(layers, open_checkpoint(post).num_layers)
        written = run_locate(pre, post, out, images=image or (), prompts=prompts, harmless=harmless, n=n,
                             layers=lays, kind=score, min_gap=min_gap, n_boot=n_boot, seed=seed,
                             batch_size=batch_size, diff=diff, probe=probe, figures=not no_figures, method=method,
                             precision=precision)
        typer.echo(f"wrote {len(written)} files to {out}: {', '.join(sorted(written)[:8])}")
