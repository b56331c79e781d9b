"""What the benchmark scripts share: best-of-N timing and appending a run's rows to its results CSV."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd


def best_of(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """(fastest wall time in seconds over `repeat` calls of `fn`, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def append_rows(path: Path, table: pd.DataFrame) -> None:
    """Append `table` to the CSV at `path` (earlier runs kept; written atomically) and say so."""
    from vlsafe.analysis.runinfo import write_csv

    if path.is_file():
        table = pd.concat([pd.read_csv(path), table], ignore_index=True)
    write_csv(path, table)
    print(f"wrote {path}")
