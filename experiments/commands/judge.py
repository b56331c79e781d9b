"""`vlsafe judge FILE --column NAME [--judge NAME] -o OUT.csv`: judge a column of free-form responses.

OUT keeps every input row and adds `refused` (0/1), `judge_score` and `judge`. The input (CSV, JSONL or JSON)
is checked first: it must be valid UTF-8 (a bad byte is reported with its row), have the column (the available
ones are listed) and no empty responses (unless `--allow-empty`, which lets the judge decide them).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Annotated

import typer

from vlsafe.analysis.errors import VlsafeError


def check_utf8(path: Path) -> None:
    """Raise a one-line `VlsafeError` naming the row (and line) of the first non-UTF-8 byte in `path`."""
    if not path.is_file():
        raise VlsafeError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        return
    except UnicodeDecodeError as e:
        pos, byte = e.start, data[e.start]
    line = data.count(b"\n", 0, pos) + 1
    where = f"line {line}"
    if path.suffix.lower() in (".csv", ".tsv"):
        row = _csv_row_of(data, pos, "\t" if path.suffix.lower() == ".tsv" else ",")
        where = f"row {row} (line {line})" if row else where
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        where = f"row {line}"
    raise VlsafeError(f"{path}: {where}: byte 0x{byte:02x} is not valid UTF-8; re-encode the file as UTF-8")


def _csv_row_of(data: bytes, pos: int, delimiter: str) -> int | None:
    """1-based data row (header excluded) holding byte offset `pos`, quoted multi-line fields respected."""
    head = data[:pos].decode("utf-8", errors="replace")
    rows = list(csv.reader(io.StringIO(head), delimiter=delimiter))
    return max(len(rows) - 1, 1) if rows else None


def check_responses(path: Path, column: str, allow_empty: bool) -> None:
    """Column present (else list the available ones), file not empty, no empty responses unless allowed."""
    from vlsafe.probes.behavior.judges import read_judge_input

    df = read_judge_input(path)
    if column not in df.columns:
        raise VlsafeError(f"{path}: no column {column!r}; available columns: {', '.join(map(str, df.columns))}")
    if df.empty:
        raise VlsafeError(f"{path}: no rows to judge")
    values = df[column].tolist()
    empty = [i + 1 for i, v in enumerate(values) if v is None or v != v or not str(v).strip()]
    if empty and not allow_empty:
        shown = ", ".join(map(str, empty[:5])) + (", …" if len(empty) > 5 else "")
        raise VlsafeError(f"{path}: column {column!r} is empty in {len(empty)} of {len(values)} rows (row {shown}); "
                          "drop them or pass --allow-empty to judge them as given")


def register(app: typer.Typer) -> None:
    @app.command()
    def judge(
        file: Annotated[Path, typer.Argument(help="CSV, JSONL or JSON file of responses.")],
        column: Annotated[str, typer.Option(help="Column holding the responses.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Output CSV (input rows + refused, judge_score).")],
        judge_name: Annotated[str, typer.Option("--judge", help="Judge name (default, substring-rd, "
                                                                "classifier:ID, …).")] = "default",
        prompt_column: Annotated[str | None, typer.Option(help="Column of prompts, for judges that read them.")]
        = None,
        allow_empty: Annotated[bool, typer.Option(help="Judge empty responses instead of refusing the file.")]
        = False,
    ) -> None:
        """Judge each response in FILE as refusal (1) or compliance (0) and write OUT.csv."""
        from vlsafe.probes.behavior.judges import judge_file

        check_utf8(file)
        check_responses(file, column, allow_empty)
        if prompt_column is not None:
            check_responses(file, prompt_column, True)
        df = judge_file(file, column, judge_name, out, prompt_column=prompt_column)
        n, refused = len(df), int(df["refused"].sum())
        typer.echo(f"{file}: {refused}/{n} refused ({refused / n:.3f}) by {df['judge'].iloc[0]} → {out}")
