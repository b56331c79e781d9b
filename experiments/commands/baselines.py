"""`vlsafe safelora ADAPTER --aligned A --base B -o DIR` and `vlsafe resta SFT --aligned A --unaligned U -o DIR`:
the two retraining-free safety baselines of `vlsafe.experiments.baselines`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def _layers(text: Optional[str], checkpoint: str) -> list[int] | None:
    from vlsafe.analysis.checkpoints import open_checkpoint
    from vlsafe.experiments.commands.probe import parse_layers

    return parse_layers(text, open_checkpoint(checkpoint).num_layers) if text else None


def register(app: typer.Typer) -> None:
    @app.command()
    def safelora(
        adapter: Annotated[Path, typer.Argument(help="A peft LoRA adapter folder (adapter_config.json + weights).")],
        aligned: Annotated[str, typer.Option(help="The aligned checkpoint (e.g. the chat model the LoRA was trained on).")],
        base: Annotated[str, typer.Option(help="Its pre-alignment base; V = W_aligned − W_base per module.")],
        out: Annotated[Path, typer.Option("-o", "--out", help="Output adapter folder (+ safelora.csv, run.json).")],
        select: Annotated[str, typer.Option(help="'threshold' (project where cos ≤ τ) or 'number' (the k lowest).")] = "threshold",
        threshold: Annotated[float, typer.Option(help="τ for --select threshold.")] = 0.5,
        num: Annotated[int, typer.Option(help="k for --select number.")] = 10,
        projection: Annotated[str, typer.Option(help="'original' (C = VVᵀ/‖V‖, as IBM/SafeLoRA) or 'orthonormal'.")] = "original",
        rank: Annotated[Optional[int], typer.Option(help="Orthonormal basis size (default: --energy decides).")] = None,
        energy: Annotated[float, typer.Option(help="Share of ‖V‖² the orthonormal basis keeps when --rank is unset.")] = 0.9,
        quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    ) -> None:
        """SafeLoRA: project a LoRA adapter's updates onto the alignment subspace where they leave it."""
        from vlsafe.analysis.errors import VlsafeError
        from vlsafe.experiments.baselines import safelora_project

        if select not in ("threshold", "number") or projection not in ("original", "orthonormal"):
            raise VlsafeError(f"--select must be threshold|number and --projection original|orthonormal "
                              f"(got {select!r}, {projection!r})")
        if rank is not None and projection != "orthonormal":
            raise VlsafeError("--rank sizes the orthonormal basis; it needs --projection orthonormal")
        res = safelora_project(adapter, aligned, base, out, select=select, threshold=threshold,  # type: ignore[arg-type]
                               num=num, projection=projection, rank=rank, energy=energy,  # type: ignore[arg-type]
                               progress=not quiet)
        s = res.summary
        typer.echo(f"projected {s['projected']} of {s['modules']} modules (τ = {s['tau']:.3g}, "
                   f"mean Pdst {s['mean_pdst']:.3f}); wrote {res.out_dir}")

    @app.command()
    def resta(
        sft: Annotated[str, typer.Argument(help="The fine-tuned model to make safer (an LLM or an LVLM).")],
        aligned: Annotated[str, typer.Option(help="Safety-aligned endpoint of the safety vector.")],
        unaligned: Annotated[str, typer.Option(help="Unaligned endpoint: δ_safe = aligned − unaligned.")],
        out: Annotated[Path, typer.Option("-o", "--out", help="Output checkpoint folder (+ mergekit.yaml, run.json).")],
        beta: Annotated[float, typer.Option(help="Scale of the safety vector.")] = 1.0,
        density: Annotated[float, typer.Option(help="DARE density of δ_safe (1 = dense).")] = 1.0,
        seed: Annotated[int, typer.Option(help="Seed of the DARE masks.")] = 0,
        layers: Annotated[Optional[str], typer.Option(help="Only these decoder layers, e.g. '10-19' or '3,5,7'.")] = None,
        quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    ) -> None:
        """RESTA: θ_SFT + β·δ_safe, streamed (an LVLM with LLM endpoints merges its language model only)."""
        from vlsafe.experiments.baselines import resta as run_resta

        path = run_resta(sft, aligned, unaligned, out, beta=beta, density=density, seed=seed,
                         layers=_layers(layers, sft), progress=not quiet)
        typer.echo(f"wrote {path}")
