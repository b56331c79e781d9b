"""`vlsafe replicate [CONFIG] -o DIR --seeds 0,1,2 [--vary KEY=V1,V2 ...] [--until STAGE] [--reuse DIR ...]
[--ray ADDRESS] [--profile tiny|full]`: the organism for every seed × varied recipe values (resumable per
combination, optionally one Ray task each), then `replicates.csv`, `summary.csv`, `figures/` and `run.json`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer


def _reporter(total: int) -> Any:
    seen = [0]

    def show(combo: Any, finished: bool) -> None:
        seen[0] += 1
        state = "finished (cached)" if finished else "building"
        typer.echo(f"[replicate] {seen[0]}/{total} {combo.id:<48} {state}")
    return show


def register(app: typer.Typer) -> None:
    @app.command()
    def replicate(
        out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (combos/, replicates.csv, summary.csv, "
                                                              "figures/, run.json); reused as a cache.")],
        seeds: Annotated[str, typer.Option(help="Comma-separated seeds, e.g. 0,1,2.")],
        config: Annotated[Optional[Path], typer.Argument(help="Organism config YAML (default: --profile's).")] = None,
        vary: Annotated[Optional[list[str]], typer.Option(help="A recipe key and its values, KEY=V1,V2 (dotted, "
                                                               "repeatable), e.g. alignment_strength=moderate,strong.")
                        ] = None,
        profile: Annotated[Optional[str], typer.Option(help="tiny or full (default full) when no CONFIG.")] = None,
        ray: Annotated[Optional[str], typer.Option(help="One Ray task per combination: auto, local, "
                                                        "ray://HOST:10001 or HOST:6379 (needs the ray extra).")] = None,
        ray_cpus: Annotated[float, typer.Option(help="CPUs per combination with --ray.")] = 1,
        until: Annotated[Optional[str], typer.Option(help="Build only this stage and the stages it needs, and "
                                                          "evaluate only their checkpoints (e.g. lvlm: no safety "
                                                          "stages).")] = None,
        reuse: Annotated[Optional[list[Path]], typer.Option(help="Another replicate (or organism) folder whose "
                                                                "stages and metrics with the same hashes are "
                                                                "hard-linked, not rebuilt (repeatable).")] = None,
        threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads per organism build.")] = None,
        progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    ) -> None:
        """Replicate the organism over seeds and recipe variants; summarise every metric across seeds."""
        from vlsafe.analysis.errors import VlsafeError
        from vlsafe.experiments.replicate import make_plan, run_replicate

        if out.exists() and not out.is_dir():
            raise VlsafeError(f"{out}: exists and is not a folder")
        plan = make_plan(seeds=seeds, vary=vary, out=out, config=config, profile=profile, threads=threads,
                         until=until, reuse=list(reuse or []))
        typer.echo(f"[replicate] {len(plan.combos)} combination(s) of {plan.source} in {out / 'combos'}")
        _, summary = run_replicate(plan, out, ray=ray, resources={"num_cpus": ray_cpus} if ray else None,
                                   progress=progress, on_combo=_reporter(len(plan.combos)))
        head = summary[summary.checkpoint.eq("lvlm") & summary.metric.str.startswith("drop_")]
        if not head.empty:
            typer.echo(head.to_string(index=False))
        typer.echo(f"[replicate] wrote {out}")
