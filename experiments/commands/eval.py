"""`vlsafe eval CKPT [CKPT ...] --prompts SET [SET ...] [--judge NAME] -o DIR`: refusal rates with Wilson CIs.
`vlsafe eval --rejudge RUN_DIR --judge NAME -o DIR`: the same files from an earlier run's stored responses.

Writes `generations.jsonl` (checkpoint, prompt_set, id, category, label, prompt, image, response, refused,
judge_score, judge), `summary.csv` (checkpoint, prompt_set, n, refusal_rate, ci_low, ci_high, judge, category
— empty on the overall row, else one row per category — refusals, asr), `figures/refusal_rates.{png,pdf}`
and `run.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

MULTI_OPTIONS = ("--prompts", "-p")


def expand_multi(args: list[str], options: tuple[str, ...] = MULTI_OPTIONS) -> list[str]:
    """Rewrite `--prompts A B C` as `--prompts A --prompts B --prompts C` (values run until the next option)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        out.append(a)
        i += 1
        if a == "--":
            out.extend(args[i:])
            break
        if a in options:
            first = True
            while i < len(args) and (first or not args[i].startswith("-")):
                if not first:
                    out.append(a)
                out.append(args[i])
                first = False
                i += 1
    return out


class MultiValueCommand(TyperCommand):
    """A typer command whose `--prompts` option takes several space-separated values."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_multi(list(args)))


def register(app: typer.Typer) -> None:
    @app.command(name="eval", cls=MultiValueCommand)
    def eval_(
        out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")],
        ckpts: Annotated[list[str] | None, typer.Argument(help="Checkpoints: HF dirs, files, hub ids or 'default'.",
                                                          show_default=False)] = None,
        prompts: Annotated[list[str] | None, typer.Option("--prompts", "-p",
                                                         help="Prompt sets: shipped names (harmful-test, "
                                                              "harmless-test+blank, …), files or HF dataset ids.",
                                                         show_default=False)] = None,
        judge: Annotated[str, typer.Option(help="Judge: default, substring-rd, classifier:ID, logit, …")] = "default",
        max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per prompt.")] = 64,
        limit: Annotated[int | None, typer.Option(help="Keep the first N prompts of each set.")] = None,
        batch_size: Annotated[int, typer.Option(min=1, help="Prompts per generation batch.")] = 16,
        seed: Annotated[int, typer.Option(help="Seed recorded in run.json (generation is greedy).")] = 0,
        no_cache: Annotated[bool, typer.Option("--no-cache", help="Skip the generation cache.")] = False,
        rejudge: Annotated[Path | None, typer.Option(
            help="An earlier eval run directory: judge its stored responses again with --judge (no model is "
                 "loaded or run; give no checkpoints or prompts; the generation options do not apply) and "
                 "write a complete run to --out.")] = None,
    ) -> None:
        """Generate on prompt sets, judge refusals, and report refusal rates with Wilson 95 % intervals (or, with
        --rejudge RUN_DIR, judge an earlier run's responses again with another judge)."""
        from vlsafe.analysis.errors import VlsafeError
        from vlsafe.analysis.runinfo import check_out_dir
        from vlsafe.probes.behavior.eval_outputs import overall_rows
        from vlsafe.probes.behavior.evaluate import evaluate, rejudge_run

        check_out_dir(out, inputs=ckpts or [], replaces=False)
        if rejudge is not None:
            if ckpts or prompts:
                raise VlsafeError("eval --rejudge: the run's own checkpoints and prompt sets are used; give none")
            _, summary = rejudge_run(rejudge, judge=judge, out_dir=out)
        elif not ckpts or not prompts:
            raise VlsafeError("eval: give checkpoints and --prompts SET ... (or --rejudge RUN_DIR)")
        else:
            from vlsafe.analysis.pairing import checkpoint_labels

            labels = checkpoint_labels(ckpts)
            _, summary = evaluate(dict(zip(labels, ckpts)), prompts, judge=judge, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, limit=limit, out_dir=out, seed=seed, cache=not no_cache)
        for row in overall_rows(summary).itertuples():
            typer.echo(f"{row.checkpoint:<24} {row.prompt_set:<28} n={row.n:<5} refusal {row.refusal_rate:.3f} "
                       f"[{row.ci_low:.3f}, {row.ci_high:.3f}]")
        typer.echo(f"wrote {out}/generations.jsonl, summary.csv, metrics.csv, figures/, run.json")
