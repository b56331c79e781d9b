"""Benchmark: exact activation patching at fp32 against bf16 autocast (`patch(..., precision="bf16")`), same run.

Default pair: the demo organism's `llm-aligned` (source) and `lvlm` (target) under `runs/demo/organism`, the
prompts `vlsafe locate` samples (harmful-train, `--n`, seed 0), text and, with `--image scene`, the seeded scenes —
the demo's own locate grid (30 layers x 3 components, both directions). Each precision patches the same prompts and
images (fp32 first, then bf16); agreement of the per-site recovered fractions (the `patching.csv` numbers, min gap
0.1): Spearman over sites (all, restore, break), largest and median absolute difference, top-5 overlap of the
restore sites. One repetition, wall and CPU time; `--only-image none` (or `scene`) times one condition. Written to
`benchmarks/results/locate_precision.csv` (one row per condition) and the per-site numbers to
`locate_precision_sites.csv`.

    .venv/bin/python benchmarks/bench_locate_precision.py [--pre DIR] [--post DIR] [--n 16] [--image scene]
    .venv/bin/python benchmarks/bench_locate_precision.py --gemm     # the GEMM rates behind the lower bounds
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

from bench_common import gemm_rates  # noqa: E402
from vlsafe.analysis.runinfo import write_csv  # noqa: E402
from vlsafe.experiments.locate import _image_size, prepare, resolve_images  # noqa: E402
from vlsafe.probes.patching import patch  # noqa: E402

KEY = ["layer", "component", "direction"]


def timed(inp, images, label: str, precision: str, batch_size: int):
    t, c = time.perf_counter(), time.process_time()
    res = patch(inp.source, inp.target, inp.harmful, images=images, image=label, batch_size=batch_size,
                precision=precision)
    return res, time.perf_counter() - t, time.process_time() - c


def sites(fp32, bf16) -> pd.DataFrame:
    """Per-site recovered fractions at both precisions (sites defined at both)."""
    return fp32.table(n_boot=100).merge(bf16.table(n_boot=100), on=[*KEY, "image"],
                                        suffixes=("_fp32", "_bf16")).dropna(subset=["recovered_fp32",
                                                                                    "recovered_bf16"])


def agreement(m: pd.DataFrame) -> dict:
    from scipy.stats import spearmanr

    rho = lambda d: round(float(spearmanr(d["recovered_fp32"], d["recovered_bf16"]).statistic), 4)  # noqa: E731
    diff = (m["recovered_bf16"] - m["recovered_fp32"]).abs()
    restore = m[m.direction == "restore"]
    top = lambda col: set(map(tuple, restore.nlargest(5, col)[KEY[:2]].to_numpy()))  # noqa: E731
    return {"sites": len(m), "spearman_sites": rho(m), "spearman_restore": rho(restore),
            "spearman_break": rho(m[m.direction == "break"]),
            "max_abs_diff": round(float(diff.max()), 4), "median_abs_diff": round(float(diff.median()), 4),
            "top5_restore_overlap": len(top("recovered_fp32") & top("recovered_bf16"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pre", default="runs/demo/organism/llm-aligned")
    ap.add_argument("--post", default="runs/demo/organism/lvlm")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--image", action="append", default=[], help="image conditions besides text (e.g. scene)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--only-image", default=None, help="time only this condition (none = text)")
    ap.add_argument("--gemm", action="store_true", help="only measure the GEMM rates (locate_gemm.csv)")
    ap.add_argument("--out", default="benchmarks/results/locate_precision.csv")
    args = ap.parse_args()
    if args.gemm:
        rates = gemm_rates()
        print(rates.to_string(index=False))
        write_csv(Path(args.out).with_name("locate_gemm.csv"), rates)
        return
    inp = prepare(args.pre, args.post, images=args.image, n=args.n)
    rows, per_site = [], []
    for spec in [None, *inp.images]:
        images = None if spec is None else resolve_images(spec, len(inp.harmful), size=_image_size(inp.target),
                                                          seed=0).images
        label = spec or "none"
        if args.only_image and label != args.only_image:
            continue
        (r32, t32, c32), (r16, t16, c16) = (timed(inp, images, label, p, args.batch_size) for p in ("fp32", "bf16"))
        row = {"date": time.strftime("%Y-%m-%d"), "pre": args.pre, "post": args.post, "n": len(inp.harmful),
               "image": label, "directions": 2,
               "fp32_s": round(t32, 1), "bf16_s": round(t16, 1), "speedup": round(t32 / t16, 2),
               "fp32_cpu_s": round(c32, 1), "bf16_cpu_s": round(c16, 1), **agreement(m := sites(r32, r16)),
               "threads": torch.get_num_threads()}
        print(pd.DataFrame([row]).to_string(index=False), flush=True)
        rows.append(row)
        per_site.append(m)
    write_csv(args.out, pd.DataFrame(rows))
    write_csv(Path(args.out).with_name(Path(args.out).stem + "_sites.csv"), pd.concat(per_site, ignore_index=True))


if __name__ == "__main__":
    main()
