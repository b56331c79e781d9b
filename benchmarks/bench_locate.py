"""Benchmark: activation patching (`vlsafe.probes.patching.patch`) against plain forwards of the same batches.

Pair: the embedded SmolLM2 (source) and a copy whose MLP down-projections carry 1 % seeded noise (target).
`patch` runs, per batch, one clean forward per model and one patched forward per (layer, component) — one
direction, `restore` — so its cost is compared with (3·L + 2) plain scoring forwards
(`vlsafe.probes.scores.score_batch`, the same encoded batches). Goal: ratio ≤ 2. Wall and CPU time
(`time.process_time`, steadier on a shared machine) are both recorded. Patched forwards resume from the patched
block (`vlsafe.probes.replay`); `--also-full` times `patch(..., resume=False)` too (a second row, `resume` = False).
`--atp` also times attribution patching (`method="attribution"`) and measures how well its per-site recovered
fractions agree with the exact ones (Spearman over sites, top-5 overlap): written to `locate_atp.csv`.

    .venv/bin/python benchmarks/bench_locate.py [--n 60] [--batch-size 8] [--also-full] [--out benchmarks/results/locate.csv]

Text only (SmolLM2 takes no images); the image condition adds image tokens to the same number of forwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from vlsafe.analysis.runinfo import write_csv  # noqa: E402
from vlsafe.probes import models as M  # noqa: E402
from vlsafe.probes import scores as S  # noqa: E402
from vlsafe.probes.behavior.datasets import load_prompts  # noqa: E402
from vlsafe.probes.patching import patch  # noqa: E402
from vlsafe.probes.templates import batches  # noqa: E402


def perturbed(spec: str, scale: float = 0.01, seed: int = 0):
    lm = M.load(spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in M.blocks(lm.model):
            w = b.mlp_out.weight
            w.add_(torch.randn(w.shape, generator=g) * w.std() * scale)
    return lm


def plain_forwards(lm, prompts: list[str], batch_size: int, count: int) -> float:
    targets = S.score_targets(lm.tokenizer)
    encoded = list(batches(lm, prompts, batch_size=batch_size))
    t, c = time.perf_counter(), time.process_time()
    for batch in encoded:
        for _ in range(count):
            S.score_batch(lm.model, batch, kind="first_token", targets=targets)
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default="default")
    ap.add_argument("--layers", type=int, default=None, help="patch only the first K layers (ratio vs 3K + 2)")
    ap.add_argument("--also-full", action="store_true", help="also time patch(..., resume=False)")
    ap.add_argument("--atp", action="store_true", help="also time attribution patching and its agreement")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-forward baseline (implies --atp)")
    ap.add_argument("--out", default="benchmarks/results/locate.csv")
    args = ap.parse_args()
    source, target = M.load(args.model), perturbed(args.model)
    prompts = load_prompts("harmful-test").sample(args.n, seed=0).prompts
    L = args.layers or M.num_layers(target.model)
    print(f"loaded; {len(prompts)} prompts, {L} layers", flush=True)
    for lm in (source, target):                                  # warm-up: first forwards are slower
        plain_forwards(lm, prompts, args.batch_size, 1)
    timed, results = {}, {}
    for resume in ([True, False] if args.also_full else [True]):
        t, c = time.perf_counter(), time.process_time()
        results[resume] = patch(source, target, prompts, layers=range(L), directions=["restore"],
                                batch_size=args.batch_size, resume=resume)
        timed[resume] = (time.perf_counter() - t, time.process_time() - c)
        print(f"patch (resume={resume}) {timed[resume][0]:.1f} s ({timed[resume][1]:.1f} s CPU)", flush=True)
    if args.no_plain:                         # only the attribution agreement is wanted
        atp_row(source, target, prompts, L, args, results[True], timed[True][0])
        return
    t_plain, c_plain = plain_forwards(target, prompts, args.batch_size, 3 * L + 2)
    print(f"(3L+2) plain forwards {t_plain:.1f} s ({c_plain:.1f} s CPU)")
    rows = [{"model": args.model, "n": args.n, "batch_size": args.batch_size, "layers": L, "components": 3,
             "resume": resume, "patch_s": round(t_p, 2), "plain_3L2_s": round(t_plain, 2),
             "ratio": round(t_p / t_plain, 3), "patch_cpu_s": round(c_p, 2), "plain_cpu_s": round(c_plain, 2),
             "cpu_ratio": round(c_p / c_plain, 3), "threads": torch.get_num_threads()}
            for resume, (t_p, c_p) in timed.items()]
    print(pd.DataFrame(rows).to_string(index=False))
    write_csv(args.out, pd.DataFrame(rows))
    if args.atp:
        atp_row(source, target, prompts, L, args, results[True], timed[True][0])


def atp_row(source, target, prompts: list[str], L: int, args: argparse.Namespace, exact, exact_s: float) -> None:
    """Attribution patching on the same prompts: time, and agreement of its per-site recoveries with `exact`."""
    from scipy.stats import spearmanr

    t = time.perf_counter()
    atp = patch(source, target, prompts, layers=range(L), directions=["restore"], batch_size=args.batch_size,
                method="attribution")
    atp_s = time.perf_counter() - t
    key = ["layer", "component", "direction"]
    m = exact.table(n_boot=200).merge(atp.table(n_boot=200), on=key, suffixes=("_exact", "_atp")).dropna(
        subset=["recovered_exact", "recovered_atp"])
    rho = spearmanr(m["recovered_exact"], m["recovered_atp"]).statistic
    top = lambda col: set(map(tuple, m.nlargest(5, col)[key[:2]].to_numpy()))  # noqa: E731
    row = {"model": args.model, "n": args.n, "layers": L, "sites": len(m), "exact_s": round(exact_s, 2),
           "atp_s": round(atp_s, 2), "speedup": round(exact_s / atp_s, 1), "spearman_sites": round(float(rho), 3),
           "top5_overlap": len(top("recovered_exact") & top("recovered_atp")),
           "median_abs_error": round(float((m["recovered_atp"] - m["recovered_exact"]).abs().median()), 4),
           "threads": torch.get_num_threads()}
    print(pd.DataFrame([row]).to_string(index=False))
    write_csv(Path(args.out).with_name("locate_atp.csv"), pd.DataFrame([row]))


if __name__ == "__main__":
    main()
