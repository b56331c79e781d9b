"""`vlsafe info CKPT`: family, layers, hidden size, dtype, parameter and tensor counts, name mapping."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer


def info_dict(spec: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> dict[str, Any]:
    """The `vlsafe info --json` record for a checkpoint spec."""
    from vlsafe.analysis.checkpoints import open_checkpoint

    c = open_checkpoint(spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return {
        "checkpoint": spec,
        "path": str(c.path),
        "family": c.family.name,
        "kind": c.family.kind,
        "family_note": c.family.note,
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "dtype": c.dtype,
        "num_parameters": c.num_parameters,
        "num_tensors": len(c.infos),
        "cross_attention_layers": c.cross_attention_layers,
        "mapping": c.mapping_summary(),
    }


def _print_human(d: dict[str, Any]) -> None:
    typer.echo(f"{d['checkpoint']}  ({d['path']})")
    typer.echo(f"  family        {d['family']} ({d['kind']})" + (f"  — {d['family_note']}" if d["family_note"] else ""))
    typer.echo(f"  layers        {d['num_layers']}")
    typer.echo(f"  hidden size   {d['hidden_size']}")
    typer.echo(f"  dtype         {d['dtype']}")
    typer.echo(f"  parameters    {d['num_parameters']:,} ({d['num_parameters'] / 1e6:.1f}M)")
    typer.echo(f"  tensors       {d['num_tensors']}")
    if d["cross_attention_layers"]:
        typer.echo(f"  cross-attn    layers {d['cross_attention_layers']}")
    typer.echo("  mapping (raw → canonical):")
    for ns, m in d["mapping"].items():
        typer.echo(f"    {ns:<10} {m['tensors']} tensors, e.g.")
        for raw, canon in m["examples"].items():
            typer.echo(f"      {raw}  →  {canon}")


def register(app: typer.Typer) -> None:
    @app.command()
    def info(
        ckpt: Annotated[str, typer.Argument(help="HF dir, .safetensors/.gguf file, hub id, or 'default'.")],
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
        allow_pickle: Annotated[bool, typer.Option(help="Allow .bin/.pt pickles (loaded weights_only).")] = False,
        trust_remote_code: Annotated[bool, typer.Option(help="Allow checkpoint-supplied code.")] = False,
    ) -> None:
        """Describe a checkpoint: family, layers, hidden size, dtype, parameters and the raw → canonical names."""
        d = info_dict(ckpt, allow_pickle, trust_remote_code)
        if as_json:
            typer.echo(json.dumps(d, indent=2))
        else:
            _print_human(d)
