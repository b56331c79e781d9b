"""`vlsafe merge CONFIG.yaml -o DIR`: a mergekit-style merge, streamed, into an HF checkpoint of the base's family."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def merge(
        config: Annotated[Path, typer.Argument(help="Merge YAML (mergekit keys + vlsafe layers/modules/per-layer maps).")],
        out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (HF checkpoint, mergekit.yaml, run.json).")],
        out_shard_size: Annotated[str, typer.Option(help="Max bytes per output shard, e.g. 5GB, 500MB.")] = "5GB",
        seed: Annotated[Optional[int], typer.Option(help="Seed for DARE masks (overrides the YAML's 'seed').")] = None,
        allow_pickle: Annotated[bool, typer.Option(help="Allow .bin/.pt pickle inputs (loaded weights_only).")] = False,
        trust_remote_code: Annotated[bool, typer.Option(help="Allow checkpoint-supplied code.")] = False,
        threads: Annotated[Optional[int], typer.Option(
            min=1, help="torch CPU threads (1 is fastest on a busy machine).")] = None,
        quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    ) -> None:
        """Merge checkpoints as CONFIG says; an LVLM + LLM merge touches only the language model."""
        from vlsafe.analysis.merging import load_plan, run_merge

        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        plan = load_plan(config)
        if seed is not None:
            plan = plan.model_copy(update={"seed": seed})
        run_merge(plan, out, out_shard_size=out_shard_size, allow_pickle=allow_pickle,
                  trust_remote_code=trust_remote_code, progress=not quiet)
        typer.echo(f"wrote {out}")
