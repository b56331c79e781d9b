"""What a two-stage sweep's screen saves per merge point: the model to screen built by writing the merge and loading
it (`run_merge` into a temp folder + `load`, the screen before) vs merged in memory (`load_merged`: load the layout
model + `merge_into`, the screen now), and loading the layout model alone (the floor of both).

Inputs: the organism's LVLM (SmolLM2-135M-based LLaVA) as base and its aligned LLM, a whole-LM task-arithmetic merge
(`weight: --alpha`), fp32 on CPU. The input files are read once first, so every variant sees them in the page cache.
One repetition each by default (`--repeat`, best time counts): on a shared CPU, say so when quoting. The two models
are compared tensor by tensor (`models_equal`: torch.equal on every state-dict entry).

    .venv/bin/python benchmarks/bench_merge_screen.py --organism runs/demo/organism \\
        [--alpha 0.5] [--repeat 1] [--threads N] [--out benchmarks/results/merge_screen.csv]

Rows are appended to `--out` (one run = three rows).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_common import append_rows, best_of  # noqa: E402


def _warm(path: Path) -> None:
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            while fh.read(1 << 24):
                pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organism", type=Path, default=ROOT / "runs" / "demo" / "organism",
                    help="folder with lvlm/ and llm-aligned/ (read only)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "merge_screen.csv")
    args = ap.parse_args(argv)

    import pandas as pd
    import torch

    from vlsafe.analysis.merging import MergePlan, load_merged, run_merge
    from vlsafe.probes.models import load

    if args.threads:
        torch.set_num_threads(args.threads)
    lvlm, llm = args.organism / "lvlm", args.organism / "llm-aligned"
    plan = MergePlan.from_dict({"merge_method": "task_arithmetic", "base_model": str(lvlm),
                                "models": [{"model": str(llm), "parameters": {"weight": args.alpha}}]})
    _warm(lvlm), _warm(llm)
    with tempfile.TemporaryDirectory(prefix="bench-merge-screen-", dir="/tmp") as tmp:
        def written():
            out = Path(tmp) / f"m{time.monotonic_ns()}"
            return load(run_merge(plan, out, progress=False))
        t_load, _ = best_of(lambda: load(str(lvlm)), args.repeat)
        t_written, a = best_of(written, args.repeat)
        t_memory, b = best_of(lambda: load_merged(plan), args.repeat)
        sa, sb = a.model.state_dict(), b.model.state_dict()
        equal = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    threads, cores = torch.get_num_threads(), os.cpu_count()
    date = datetime.date.today().isoformat()
    note = (f"{lvlm.parent.name}: task_arithmetic base lvlm + llm-aligned weight {args.alpha}, whole LM, fp32, CPU; "
            f"best of {args.repeat}; run in this order: load, written, in memory; inputs in the page cache")
    rows = [{"variant": v, "wall_s": round(t, 2), "ratio_vs_written": round(t / t_written, 3), "models_equal": eq,
             "threads": threads, "cores": cores, "date": date, "note": note}
            for v, t, eq in (("written: run_merge + load", t_written, equal),
                             ("in memory: load + merge_into", t_memory, equal), ("load only (floor)", t_load, None))]
    table = pd.DataFrame(rows)
    print(table.drop(columns="note").to_string(index=False))
    print(f"in memory saves {t_written - t_memory:.1f} s per merge point ({t_written / t_memory:.1f}x faster); "
          f"models equal: {equal}")
    append_rows(args.out, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
