"""What the benchmark scripts share: best-of-N timing and appending a run's rows to its results CSV."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch


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


def gemm_rates(rows: int = 552, reps: int = 200) -> pd.DataFrame:
    """GFLOP/s of one SmolLM2 block's seven linear layers (`rows` token rows) at fp32 and bf16 — the rates the
    lower bounds in docs/performance.md divide by (the best of three timed runs: a bound wants the fastest)."""
    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    out = []
    for dt in (torch.float32, torch.bfloat16):
        x = {k: torch.randn(rows, k, dtype=dt) for k in (576, 1536)}
        ws = [torch.randn(i, o, dtype=dt) for i, o in shapes]
        times = []
        for rep in (20, reps, reps, reps):                       # warm-up, then three timed runs
            t = time.perf_counter()
            for _ in range(rep):
                for (i, _o), w in zip(shapes, ws):
                    x[i] @ w
            times.append(time.perf_counter() - t)
        rates = [sum(2 * rows * i * o for i, o in shapes) * reps / t / 1e9 for t in times[1:]]
        out.append({"dtype": str(dt).removeprefix("torch."), "rows": rows, "gflops_best": round(max(rates), 1),
                    "gflops_min": round(min(rates), 1), "threads": torch.get_num_threads()})
    return pd.DataFrame(out)
