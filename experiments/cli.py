"""The `vlsafe` command line. Each sub-command lives in `experiments/commands/<name>.py` and exposes
`register(app)`; modules there are discovered automatically, so adding a command touches one file.

User errors (`VlsafeError`) print one line, `vlsafe: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import typer

from vlsafe.analysis.errors import VlsafeError

app = typer.Typer(
    name="vlsafe",
    help="How vision-language adaptation changes an LLM's safety — weights, activations, behaviour, remedies.\n\n"
         "Checkpoints are HF directories, .safetensors/.gguf files, hub ids, or the word 'default' "
         "(the embedded SmolLM2-135M-Instruct).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """vlsafe: one layer axis for weights, activations, behaviour and remedies."""


def _register_commands() -> None:
    import vlsafe.experiments.commands as pkg

    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}").register(app)


_register_commands()


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning `VlsafeError` into a one-line message and exit status 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(args=argv, standalone_mode=False)
    except VlsafeError as e:
        print(f"vlsafe: error: {e}", file=sys.stderr)
        return 2
    except (typer.Exit, SystemExit) as e:
        return int(getattr(e, "exit_code", getattr(e, "code", 0)) or 0)
    except Exception as e:  # (typer's) click usage errors arrive here with standalone_mode=False
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # one line, like every other error
            ctx = getattr(e, "ctx", None)
            where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            print(f"vlsafe: error: {e.format_message()}{where}", file=sys.stderr)
            return int(e.exit_code)
        if e.__class__.__name__ == "Abort":
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
