"""`vlsafe gate CKPT --layer L [--layer L2 …] -o DIR`: fit the recognition gates of conditional steering.

For each layer, a `vlsafe.probes.gate.Condition` (a logistic probe, or the difference-in-means direction, on the
block input's last prompt position) fitted on the -train splits, its threshold chosen on harmless-val (at most
`--max-fpr` false positives); `-test` splits are refused. Writes `DIR/layer<L>.json` (+ `.safetensors`),
`conditions.csv` (layer, kind, threshold, val_fpr, val_tpr, n per set) and `run.json`, via a temp folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def gate(
        checkpoint: Annotated[str, typer.Argument(help="The model whose own states the gate reads (e.g. the LVLM).")],
        out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (one condition file per layer).")],
        layer: Annotated[list[int], typer.Option(help="0-based layer whose block input is read (repeatable).")],
        kind: Annotated[str, typer.Option(help="probe (logistic regression) or direction (difference in means).")]
        = "probe",
        max_fpr: Annotated[float, typer.Option(
            min=0.0, max=1.0, help="Largest false-positive rate on harmless-val.")] = 0.05,
        harmful_train: Annotated[str, typer.Option(help="Harmful training prompts.")] = "harmful-train",
        harmless_train: Annotated[str, typer.Option(help="Harmless training prompts.")] = "harmless-train",
        harmless_val: Annotated[str, typer.Option(help="Harmless prompts that set the threshold.")] = "harmless-val",
        harmful_val: Annotated[str, typer.Option(help="Harmful prompts that measure the firing rate.")]
        = "harmful-val",
        batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward pass.")] = 8,
    ) -> None:
        """Fit one gate condition per --layer on CHECKPOINT's own activations; see docs/methods.md (Gated remedies)."""
        import pandas as pd

        from vlsafe.analysis.checkpoints import open_checkpoint
        from vlsafe.analysis.errors import VlsafeError
        from vlsafe.analysis.runinfo import atomic_path, check_out_dir, write_csv, write_run_json
        from vlsafe.probes.gate import prompt_set, fit_condition
        from vlsafe.probes.models import load

        ck = open_checkpoint(checkpoint)  # every check before the model loads
        check_out_dir(out, inputs=[ck.path])
        n = ck.num_layers
        bad = [ℓ for ℓ in layer if not 0 <= ℓ < n]
        if bad:
            raise VlsafeError(f"--layer {bad[0]}: out of range for {checkpoint} (layers 0..{n - 1})")
        for role, name in (("--harmful-train", harmful_train), ("--harmless-train", harmless_train),
                           ("--harmless-val", harmless_val), ("--harmful-val", harmful_val)):
            prompt_set(name, role)
        lm = load(checkpoint)
        conds = [fit_condition(lm, layer=ℓ, kind=kind, harmful_train=harmful_train, harmless_train=harmless_train,
                               harmless_val=harmless_val, harmful_val=harmful_val, max_fpr=max_fpr,
                               batch_size=batch_size, progress=True) for ℓ in dict.fromkeys(layer)]
        rows = [{"layer": c.layer, "kind": c.kind, "threshold": c.threshold, "val_fpr": c.provenance.get("val_fpr"),
                 "val_tpr": c.provenance.get("val_tpr"), **{f"n_{k}": v for k, v in c.provenance["n"].items()}}
                for c in conds]
        with atomic_path(out) as tmp:
            tmp.mkdir(parents=True)
            for c in conds:
                c.save(tmp / f"layer{c.layer}.json")
            write_csv(tmp / "conditions.csv", pd.DataFrame(rows))
            write_run_json(tmp, kind="gate", tables={"conditions": "conditions.csv"}, command="vlsafe gate",
                           config={"checkpoint": checkpoint, "layers": list(dict.fromkeys(layer)), "kind": kind,
                                   "max_fpr": max_fpr, "harmful_train": harmful_train,
                                   "harmless_train": harmless_train, "harmless_val": harmless_val,
                                   "harmful_val": harmful_val},
                           checkpoints={"model": lm.checkpoint})
        typer.echo(pd.DataFrame(rows).to_string(index=False))
        typer.echo(f"wrote {out}")
