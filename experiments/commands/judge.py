"""`vlsafe judge FILE --column NAME [--judge NAME] -o OUT.csv`: judge a column of free-form responses.

OUT keeps every input row and adds `refused` (0/1), `judge_score` and `judge`; a calibrated judge (the default,
or `--calibration FILE`) also prints the refusal rate corrected for its error. `--labels COLUMN` (human 0/1
labels) also writes `OUT.agreement.csv` (accuracy, Cohen's κ, confusion, sensitivity, specificity; overall and
per category) and `OUT.calibration.json` (the judge's calibration for `--calibration` in later runs).
`--compare default,substring-rd,…` writes instead one agreement table between the judges (and the labels). The input (CSV, JSONL or JSON)
is checked first: it must be valid UTF-8 (a bad byte is reported with its row), have the column (the available
ones are listed) and no empty responses (unless `--allow-empty`, which lets the judge decide them).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Annotated, Any

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


def check_responses(df: Any, path: Path, column: str, allow_empty: bool) -> None:
    """Column present (else list the available ones), file not empty, no empty responses unless allowed
    (`df` is the table read from `path`)."""
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
        out: Annotated[Path, typer.Option("--out", "-o", help="Output CSV (input rows + refused, judge_score); "
                                                               "with --compare, the agreement table.")],
        judge_name: Annotated[str, typer.Option("--judge", help="Judge name (default, substring-rd, "
                                                                "classifier:ID, …).")] = "default",
        prompt_column: Annotated[str | None, typer.Option(help="Column of prompts, for judges that read them.")]
        = None,
        allow_empty: Annotated[bool, typer.Option(help="Judge empty responses instead of refusing the file.")]
        = False,
        labels: Annotated[str | None, typer.Option(help="Column of human 0/1 refusal labels: also write "
                                                        "OUT.agreement.csv and OUT.calibration.json.")] = None,
        calibration: Annotated[Path | None, typer.Option(help="A judge calibration JSON (from --labels) for the "
                                                              "judge-corrected refusal rate.")] = None,
        compare: Annotated[str | None, typer.Option(help="Comma-separated judges to compare (e.g. "
                                                         "default,substring-rd): OUT is their agreement table.")]
        = None,
        category_column: Annotated[str | None, typer.Option(help="Column of categories for the per-category "
                                                                 "report (default: 'category' if present).")] = None,
    ) -> None:
        """Judge each response in FILE as refusal (1) or compliance (0) and write OUT.csv; with --labels also the
        agreement report and the judge's calibration; with --compare one agreement table between judges."""
        from vlsafe.probes.behavior.agreement import read_labelled
        from vlsafe.probes.behavior.judges import read_judge_input

        if out.is_dir():
            raise VlsafeError(f"{out}: is a folder; -o names the output CSV file")
        unused = [flag for flag, given in (("--calibration", calibration is not None and (compare or labels)),
                                           ("--judge", compare is not None and judge_name != "default"),
                                           ("--category-column", category_column is not None and labels is None))
                  if given]
        if unused:
            raise VlsafeError(f"{unused[0]} does not apply here (--calibration: plain judging only; --judge: not "
                              "with --compare, which names its judges; --category-column: with --labels)")
        check_utf8(file)
        df = read_judge_input(file)  # read once; every check below runs before anything is judged or written
        check_responses(df, file, column, allow_empty)
        read_labelled(df, column, labels, prompt_column, where=str(file))  # labels 0/1, prompts complete
        if compare is not None:
            _compare(df, file, column, out, compare, labels, prompt_column)
        elif labels is not None:
            _calibrate(df, file, column, out, judge_name, labels, prompt_column, category_column)
        else:
            _judge(df, file, column, out, judge_name, prompt_column, calibration)


def _judge(df: Any, file: Path, column: str, out: Path, judge_name: str, prompt_column: str | None,
           calibration: Path | None) -> None:
    from vlsafe.probes.behavior.judges import write_table_atomic, get_judge, judge_table

    j = get_judge(judge_name, calibration=calibration)  # refuses another judge's calibration
    df = judge_table(df, column, j, prompt_column=prompt_column, where=str(file))
    write_table_atomic(df, out)
    n, refused = len(df), int(df["refused"].sum())
    typer.echo(f"{file}: {refused}/{n} refused ({refused / n:.3f}) by {j.name} → {out}")
    if j.calibration is not None:
        typer.echo(corrected_line(refused, n, j.calibration))


def corrected_line(k: int, n: int, cal: Any) -> str:
    """One line: the judge-corrected refusal rate, its interval and the calibration it comes from."""
    from vlsafe.probes.behavior.calibration import corrected_rate

    est, lo, hi = corrected_rate(k, n, cal)
    return (f"corrected for judge error: {est:.3f} [{lo:.3f}, {hi:.3f}] (sensitivity {cal.sensitivity:.3f} of "
            f"{cal.n_pos}, specificity {cal.specificity:.3f} of {cal.n_neg}, on {cal.source or 'given labels'})")


def _calibrate(df: Any, file: Path, column: str, out: Path, judge_name: str, labels: str, prompt_column: str | None,
               category_column: str | None) -> None:
    from vlsafe.probes.behavior.agreement import calibrate_file
    from vlsafe.probes.behavior.judges import write_table_atomic, get_judge

    j = get_judge(judge_name)
    judged, report, cal = calibrate_file(df, column=column, labels=labels, judge=j, prompt_column=prompt_column,
                                         category_column=category_column, where=str(file))
    rep_path, cal_path = out.with_name(out.stem + ".agreement.csv"), out.with_name(out.stem + ".calibration.json")
    write_table_atomic(judged, out)
    write_table_atomic(report, rep_path)
    cal.save(cal_path)
    typer.echo(report.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    typer.echo(f"wrote {out}, {rep_path} and {cal_path} (use --calibration {cal_path} in later runs)")


def _compare(df: Any, file: Path, column: str, out: Path, compare: str, labels: str | None,
             prompt_column: str | None) -> None:
    from vlsafe.probes.behavior.agreement import compare_file
    from vlsafe.probes.behavior.judges import write_table_atomic, get_judge

    names = [n.strip() for n in compare.split(",") if n.strip()]
    if len(names) < 2 and labels is None:
        raise VlsafeError(f"--compare {compare!r}: give at least two judges (or one and --labels)")
    table = compare_file(df, column=column, judges=[get_judge(n) for n in names], labels=labels,
                         prompt_column=prompt_column, where=str(file))
    write_table_atomic(table, out)
    typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    typer.echo(f"wrote {out}")
