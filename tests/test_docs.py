"""The docs are true to the code: every `vlsafe CMD --flag` the README and docs/ mention exists in that command's
`--help`, every command is in the README's CLI reference, the README's Python imports import, and no module cites
a document that is not in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.fixture(scope="module")
def commands() -> dict[str, set[str]]:
    """Every sub-command of the real CLI → the option strings its `--help` lists."""
    from vlsafe.experiments.cli import app

    group = typer.main.get_command(app)
    assert hasattr(group, "commands"), type(group)
    return {name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
            for name, cmd in group.commands.items()}


def code_of(text: str) -> list[str]:
    """The shell snippets of a Markdown text: lines of ```bash blocks and `inline code` spans."""
    blocks = [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)
              if lang in ("", "bash", "sh", "console")]
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [ln for b in blocks for ln in b.splitlines()] + spans


def mentions(text: str) -> list[tuple[str, list[str]]]:
    """(command, [--flags]) for each `vlsafe CMD ...` in the code of a Markdown text."""
    out = []
    for snippet in code_of(text):
        for part in re.split(r"(?:^|\s|\$\(|;|&&|\|)vlsafe (?=[a-z])", " " + snippet.split("#")[0])[1:]:
            out.append((part.split()[0], re.findall(r"(?<![\w-])--[a-z][\w-]*", part)))
    return out


def test_mentions_parser_finds_flags_and_stops_at_cells() -> None:
    text = ("| `vlsafe diff PRE POST [--base CKPT] [--spectral] -o DIR` | `--not-this` |\nvlsafe is prose --no\n"
            "```bash\nvlsafe info x --json   # --comment\n```\n")
    assert mentions(text) == [("info", ["--json"]), ("diff", ["--base", "--spectral"])]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_mentioned_command_and_flag_exists(doc: Path, commands: dict[str, set[str]]) -> None:
    wrong = []
    for cmd, flags in mentions(doc.read_text()):
        if cmd not in commands:
            wrong.append(f"vlsafe {cmd}: no such command")
            continue
        wrong += [f"vlsafe {cmd} {f}: no such option" for f in flags if f not in commands[cmd]]
    assert not wrong, f"{doc.name}: " + "; ".join(sorted(set(wrong)))


def test_readme_cli_reference_lists_every_command(commands: dict[str, set[str]]) -> None:
    readme = (REPO / "README.md").read_text()
    table = readme.split("## CLI reference", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `vlsafe ([a-z-]+)", table, flags=re.M))
    assert listed == set(commands), f"missing: {set(commands) - listed}, unknown: {listed - set(commands)}"


def test_readme_python_imports_import() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    lines = [ln.split("#")[0].rstrip() for b in blocks for ln in b.splitlines()
             if re.match(r"^(from vlsafe[\w.]* import|import vlsafe)", ln)]
    assert lines, "the README shows no vlsafe import"
    for line in lines:
        exec(compile(line, "README.md", "exec"), {})


WRITTEN = {"findings.md"}  # Markdown files vlsafe writes (`vlsafe report`), named in docstrings as outputs


def test_no_module_cites_a_missing_document() -> None:
    missing = []
    for py in [*REPO.glob("analysis/**/*.py"), *REPO.glob("probes/**/*.py"), *REPO.glob("experiments/**/*.py"),
               *REPO.glob("experiments/configs/*.yaml"), *REPO.glob("vlsafe/*.py")]:
        text = py.read_text()
        for name in set(re.findall(r"\b((?:[\w-]+/)*[\w-]+\.md)\b", text)):
            if name.rsplit("/", 1)[-1] in WRITTEN:  # a file vlsafe writes into a run directory, not a document
                continue
            if not (REPO / name).exists():
                missing.append(f"{py.relative_to(REPO)} cites {name}")
    assert not missing, "; ".join(sorted(missing))
