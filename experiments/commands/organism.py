"""`vlsafe organism [--profile tiny|full] [--config PATH] [--only STAGE | --until STAGE] -o DIR`: build (or resume)
the model organism — llm-base, llm-aligned, lvlm (+ lvlm-step-N), lvlm-safety-posthoc, lvlm-safety-mixed — and write
`DIR/metrics.csv`, `DIR/stage_times.csv` and `DIR/run.json`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer


def _plan_printer() -> Any:
    def show(spec: Any, reason: str | None, estimate: float) -> None:
        if reason is None:
            typer.echo(f"[organism] {spec.name:<22} cached")
        else:
            typer.echo(f"[organism] {spec.name:<22} building (~{estimate / 60:.1f} min estimated; {reason})")
    return show


def register(app: typer.Typer) -> None:
    @app.command()
    def organism(
        out: Annotated[Path, typer.Option("-o", "--out", help="Output directory (reused as a cache).")],
        profile: Annotated[Optional[str], typer.Option(
            help="tiny (random tiny models, <1 min) or full (SmolLM2, the default); not with --config.")] = None,
        config: Annotated[Optional[Path], typer.Option(help="A config YAML instead of the profile's.")] = None,
        only: Annotated[Optional[str], typer.Option(help="Build just this stage (or 'metrics').")] = None,
        until: Annotated[Optional[str], typer.Option(help="Build this stage and the stages it needs, then evaluate "
                                                          "their checkpoints (e.g. lvlm: no safety stages).")] = None,
        alignment: Annotated[Optional[str], typer.Option(help="Override alignment_strength (moderate|strong).")] = None,
        threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads (overrides the config).")] = None,
        progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    ) -> None:
        """Build the safety-aligned LLM and its LLaVA adaptation (resumable stages), then evaluate them all."""
        from vlsafe.analysis.errors import VlsafeError
        from vlsafe.analysis.runinfo import check_out_dir
        from vlsafe.experiments.organism.api import BENCH_CSV, build_organism, write_organism_run_json
        from vlsafe.experiments.organism.build import stage_scope
        from vlsafe.experiments.organism.config import load_config
        from vlsafe.experiments.organism.metrics import summary_table
        from vlsafe.experiments.organism.stages import specs

        overrides: dict[str, Any] = {}
        if alignment:
            overrides["alignment_strength"] = alignment
        if threads:
            overrides["threads"] = threads
        if profile is not None and config is not None:
            raise VlsafeError("--profile and --config are alternatives: the config file names its own profile")
        cfg = load_config(profile or "full", path=config, overrides=overrides)
        try:  # before anything is written; 'metrics' is a value of --only, not a build stage
            stage_scope(specs(), only=None if only == "metrics" else only, until=until)
        except VlsafeError as e:
            flags = " ".join(f"--{name} {value}" for name, value in (("only", only), ("until", until)) if value)
            raise VlsafeError(f"{flags}: {e}") from None
        check_out_dir(out, replaces=False)
        out.mkdir(parents=True, exist_ok=True)
        bench = BENCH_CSV if cfg.profile == "full" else None  # the budget is about the full profile
        results, metrics = build_organism(cfg, out, only=only, until=until, progress=progress, bench_csv=bench,
                                          on_plan=_plan_printer())
        for r in results:
            if r.status == "built":
                typer.echo(f"[organism] {r.stage:<32} {r.seconds / 60:6.1f} min")
        write_organism_run_json(out, cfg, results)
        if metrics is not None:
            typer.echo(summary_table(metrics).to_string())
        typer.echo(f"[organism] wrote {out}")
