"""What `eval.precision: bf16` saves in a sweep's screen: `evaluate_loaded` in screen mode (the logit refusal score,
one prompt forward + one cached continuation per refusal opening, no generation) at fp32 vs bf16 (autocast,
`vlsafe.probes.behavior.logit_judge.LogitJudge(precision=)`), and how far the bf16 scores move.

Inputs: the organism's LVLM (SmolLM2-135M-based LLaVA), the eval section of experiments/configs/sweep-organism.yaml
as the template (its screen stage: opening score, its openings, batch size), `--limit` prompts per set on the four
sets harmful-val, harmful-val+blank, borderline-val, harmless-val; the model loaded once, a one-prompt warm-up per
precision untimed. One repetition each by default (`--repeat`, best time counts): on a shared CPU, say so when
quoting. Agreement: Spearman rank correlation of the per-prompt scores (all prompts, and the lowest per set), the
largest |log-odds| difference, and the share of prompts whose refused/not decision changes.

    .venv/bin/python benchmarks/bench_eval_precision.py --organism runs/demo/organism \\
        [--limit 30] [--repeat 1] [--threads 1] [--out benchmarks/results/eval_precision.csv]

Rows are appended to `--out` (one run = two rows).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_common import append_rows, best_of  # noqa: E402

SETS = {"harmful": "harmful-val", "harmful_image": "harmful-val+blank", "borderline": "borderline-val",
        "harmless": "harmless-val"}


def _log_odds(p):
    import numpy as np

    p = np.asarray(p, dtype=np.float64)
    return np.log(p) - np.log1p(-p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organism", type=Path, default=ROOT / "runs" / "demo" / "organism",
                    help="folder with lvlm/ (read only)")
    ap.add_argument("--config", type=Path, default=ROOT / "experiments" / "configs" / "sweep-organism.yaml")
    ap.add_argument("--limit", type=int, default=30, help="prompts per set")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the CPU is shared)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_precision.csv")
    args = ap.parse_args(argv)

    import numpy as np
    import pandas as pd
    import torch
    from scipy.stats import spearmanr

    from vlsafe.analysis.placement import native_bf16
    from vlsafe.experiments.sweep_config import load_sweep
    from vlsafe.experiments.sweep_eval import evaluate_loaded
    from vlsafe.probes.models import load

    torch.set_num_threads(args.threads)
    cfg, _ = load_sweep(args.config)
    screen = cfg.eval.stage_config("screen")
    if {k: getattr(screen, k) for k in SETS} != SETS:
        raise SystemExit(f"{args.config}: the eval sets are not {SETS}")
    lm = load(str(args.organism / "lvlm"))
    runs = {}
    for precision in ("fp32", "bf16"):
        c = screen.model_copy(update={"precision": precision, "limit": args.limit})
        evaluate_loaded(lm, c.model_copy(update={"limit": 1}))                     # warm-up, untimed
        runs[precision] = best_of(lambda: evaluate_loaded(lm, c)[0], args.repeat)
    (t32, g32), (t16, g16) = runs["fp32"], runs["bf16"]
    assert list(g32["id"]) == list(g16["id"]) and list(g32["prompt_set"]) == list(g16["prompt_set"])
    s32, s16 = _log_odds(g32["judge_score"]), _log_odds(g16["judge_score"])
    rho = float(spearmanr(s32, s16).statistic)
    per_set = {n: float(spearmanr(s32[m], s16[m]).statistic)
               for n, m in ((n, (g32["prompt_set"] == n).to_numpy()) for n in g32["prompt_set"].unique())}
    flips = float((g32["refused"].to_numpy() != g16["refused"].to_numpy()).mean())
    rates = {p: g.groupby("prompt_set", sort=False)["refused"].mean().round(3).to_dict() for p, (_, g) in runs.items()}
    threads, cores = torch.get_num_threads(), os.cpu_count()
    date = datetime.date.today().isoformat()
    note = (f"{args.organism.name}/lvlm: screen stage of {args.config.name} (opening score, "
            f"{len(screen.openings or [])} openings, batch {screen.batch_size}), {args.limit} prompts x 4 sets "
            f"({len(g32)} prompts); CPU native bf16: {native_bf16()}; best of {args.repeat} on a shared CPU; "
            f"run in this order: fp32, bf16; model loaded once, one-prompt warm-up each")
    rows = [{"precision": p, "wall_s": round(t, 2), "ratio_vs_fp32": round(t / t32, 3), "prompts": len(g),
             "spearman_vs_fp32": 1.0 if p == "fp32" else round(rho, 4),
             "min_set_spearman": 1.0 if p == "fp32" else round(min(per_set.values()), 4),
             "max_abs_logodds_diff": 0.0 if p == "fp32" else round(float(np.abs(s32 - s16).max()), 4),
             "decision_flips": 0.0 if p == "fp32" else round(flips, 4),
             "refusal_rates": "; ".join(f"{k}={v}" for k, v in rates[p].items()),
             "threads": threads, "cores": cores, "date": date, "note": note}
            for p, (t, g) in runs.items()]
    table = pd.DataFrame(rows)
    print(table.drop(columns="note").to_string(index=False))
    print(f"bf16 screen {t32:.1f} s -> {t16:.1f} s ({t32 / t16:.2f}x); Spearman {rho:.4f} overall, per set "
          + ", ".join(f"{n} {r:.4f}" for n, r in per_set.items()) + f"; decisions changed on {flips:.1%}")
    append_rows(args.out, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
