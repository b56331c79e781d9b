"""Generate the walkthrough notebooks from their reviewable sources: `python notebooks/_build.py [--check]`.

Each notebook's cells live in `notebooks/src/<name>.py` in the "percent" format (as in jupytext/VS Code):
a line `# %%` starts a code cell, `# %% [markdown]` a markdown cell whose lines are `# `-commented, and a
commented IPython magic (`# %matplotlib inline`) becomes the magic itself. The generated `.ipynb` files carry no
outputs and stable cell ids, so regenerating an unchanged source gives an identical file. `--check` exits 1 when
a committed notebook differs from its source (CI drift check).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "src"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
_MARKER = re.compile(r"^# %%(?:\s+\[(markdown|md)\])?\s*$")
_MAGIC = re.compile(r"^# (%{1,2}[A-Za-z].*)$")


def _trim(lines: list[str]) -> str:
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


def _markdown(lines: list[str]) -> str:
    out = []
    for i, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            raise ValueError(f"markdown line {i + 1} is not commented: {line!r}")
        out.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
    return _trim(out)


def parse_cells(text: str) -> list[tuple[str, str]]:
    """(`code` | `markdown`, source) per cell of a percent-format script; text before the first marker is ignored."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        m = _MARKER.match(line)
        if m:
            cells.append(("markdown" if m.group(1) else "code", []))
        elif cells:
            cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        src = _markdown(lines) if kind == "markdown" else _trim([_MAGIC.sub(r"\1", ln) for ln in lines])
        if src:
            out.append((kind, src))
    return out


def build_notebook(source: Path) -> nbformat.NotebookNode:
    """The notebook for one percent-format source file (validated, no outputs, ids `<stem>-NN`)."""
    cells = []
    for i, (kind, src) in enumerate(parse_cells(source.read_text(encoding="utf-8"))):
        cell = new_markdown_cell(src) if kind == "markdown" else new_code_cell(src)
        cell["id"] = f"{source.stem.split('_')[0]}-{i:02d}"
        cells.append(cell)
    nb = new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC, "language_info": {"name": "python"}})
    nbformat.validate(nb)
    return nb


def sources() -> list[Path]:
    """The notebook sources, in order."""
    return sorted(SOURCES.glob("[0-9][0-9]_*.py"))


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write `notebooks/<stem>.ipynb` for every source (or, with `--check`, report the stale ones)."""
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    stale = []
    for src in sources():
        target = HERE / f"{src.stem}.ipynb"
        text = render(build_notebook(src))
        if check:
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                stale.append(target.name)
        else:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target.relative_to(HERE.parent)}")
    if stale:
        print(f"stale notebooks (run python notebooks/_build.py): {', '.join(stale)}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
