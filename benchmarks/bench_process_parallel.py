"""Two one-thread processes against one two-thread process on the same work: the logit screen and greedy
generation of a sweep point, on the organism's `lvlm` (or any checkpoint), measured in one run.

    .venv/bin/python benchmarks/bench_process_parallel.py [--ckpt runs/demo/organism/lvlm] [--n 90] [--gen-n 24]

The baseline is one process at `--threads` (default 2) torch threads doing the work once; the alternative is
`--threads` processes at one thread each, started together, each doing the same work (so together they do
`--threads` times as much). `throughput_ratio` = (work done per second by the processes together) / (the
baseline's) — what dispatching sweep points to one-thread workers (`vlsafe sweep --ray local`) can gain at most;
the sweep itself measured 1.37× (`benchmarks/results/sweep.csv`). Forwards under bf16 autocast where the CPU has
it (`precision=auto`, as the demo's sweep). Writes (appends) `benchmarks/results/process_parallel.csv`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402

from bench_common import append_rows  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "process_parallel.csv"


def work(kind: str, ckpt: str, n: int, threads: int) -> float:
    """Seconds for one unit of work (`screen`: logit refusal scores of n val prompts; `generate`: n greedy answers
    of 32 tokens), after a warm-up, at `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)
    from vlsafe.analysis.placement import resolve_precision
    from vlsafe.probes.behavior.datasets import load_prompts
    from vlsafe.probes.models import load

    lm, precision = load(ckpt), resolve_precision("auto")
    if kind == "screen":
        from vlsafe.probes.behavior.logit_judge import LogitJudge

        per = max(1, n // 3)
        prompts = sum((load_prompts(s, limit=per).prompts for s in ("harmful-val", "borderline-val", "harmless-val")),
                      [])
        judge = LogitJudge(lm, kind="opening", batch_size=8, precision=precision)
        judge.scores(prompts[:8])
        t0 = time.perf_counter()
        judge.scores(prompts)
        return time.perf_counter() - t0
    from vlsafe.probes.behavior.generate import generate

    generate(lm, load_prompts("harmless-val", limit=8), max_new_tokens=4, cache=False, progress=False,
             precision=precision)
    t0 = time.perf_counter()
    generate(lm, load_prompts("harmful-val", limit=n), max_new_tokens=32, batch_size=8, cache=False, progress=False,
             precision=precision)
    return time.perf_counter() - t0


def _spawn(kind: str, ckpt: str, n: int, procs: int, threads: int) -> list[float]:
    """Run `procs` copies of `work` at once, each at `threads` threads; their seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", kind, "--ckpt", ckpt, "--n", str(n), "--threads", str(threads)]
    running = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    out = [p.communicate()[0] for p in running]
    if any(p.returncode for p in running):
        raise SystemExit(f"a benchmark process failed: {' '.join(cmd)}")
    return [json.loads(o.strip().splitlines()[-1])["seconds"] for o in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="runs/demo/organism/lvlm")
    ap.add_argument("--n", type=int, default=90, help="prompts for the screen (a third from each val set)")
    ap.add_argument("--gen-n", type=int, default=24, help="prompts for generation")
    ap.add_argument("--threads", type=int, default=2, help="the baseline's threads = the number of processes")
    ap.add_argument("--child", choices=("screen", "generate"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps({"seconds": work(a.child, a.ckpt, a.n, a.threads)}))
        return
    rows = []
    for kind, n in (("screen", a.n), ("generate", a.gen_n)):
        base = _spawn(kind, a.ckpt, n, 1, a.threads)[0]
        each = _spawn(kind, a.ckpt, n, a.threads, 1)
        ratio = (a.threads / max(each)) / (1 / base)
        rows.append({"work": kind, "ckpt": a.ckpt, "n": n, "baseline_threads": a.threads, "baseline_s": round(base, 2),
                     "processes": a.threads, "process_s": " ".join(f"{t:.2f}" for t in each),
                     "throughput_ratio": round(ratio, 2), "cpus": os.cpu_count(),
                     "date": time.strftime("%Y-%m-%d")})
        print(f"{kind:9s} 1 x {a.threads} threads {base:6.2f} s | {a.threads} x 1 thread "
              f"{', '.join(f'{t:.2f}' for t in each)} s each | throughput x{ratio:.2f}")
    append_rows(OUT, pd.DataFrame(rows))


if __name__ == "__main__":
    main()
