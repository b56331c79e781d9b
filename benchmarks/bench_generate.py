"""Batched generation vs a per-prompt loop on SmolLM2, measured in one run; same greedy outputs asserted.

    .venv/bin/python benchmarks/bench_generate.py [--n 32] [--tokens 32] [--batch-sizes 8 16 32] [--threads N]
    python benchmarks/bench_generate.py --device cuda --vllm --n 128 --batch-sizes 16 64 128 \\
        --out benchmarks/results/generate_cuda.csv

`--device cpu|cuda|cuda:N|auto` (default cpu; auto = cuda when available) puts the model there; every row records
`device` and `device_name`. `--vllm` adds a row for the vLLM engine (`vlsafe.probes.behavior.vllm_backend`, needs
`vlsafe[vllm]` and a GPU; engine start-up is timed separately and not counted), same outputs checked.

The baseline is `generate(lm, [prompt], batch_size=1)` in a loop (no padding, same code path); each batched run
is `generate(lm, prompts, batch_size=B)` (length-sorted, left-padded). The cache is off for both; a last row
times a cache hit. Goal (issue 5): batched ≥ 4× the loop's prompts/s. Writes `benchmarks/results/generate.csv`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from vlsafe.analysis.placement import device_name, resolve_device, synchronize  # noqa: E402
from vlsafe.analysis.runinfo import write_csv  # noqa: E402
from vlsafe.probes.behavior.datasets import load_prompts  # noqa: E402
from vlsafe.probes.behavior.generate import generate  # noqa: E402
from vlsafe.probes.models import load  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "generate.csv"


def _timed(fn, device="cpu"):
    synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - t0


def _vllm_row(lm, prompts: list[str], tokens: int, loop: list[str], t_loop: float) -> dict:
    """One vLLM generation over all prompts (engine built and warmed first; its start-up time is recorded)."""
    from vlsafe.probes.behavior.vllm_backend import engine, generate_vllm

    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    t0 = time.perf_counter()
    llm = engine(lm.checkpoint.path, dtype=dtype, gpu_memory_utilization=0.5)
    generate_vllm(lm.checkpoint, prompts[:2], max_new_tokens=tokens, llm=llm, progress=False)
    startup = time.perf_counter() - t0
    out, t = _timed(lambda: generate_vllm(lm.checkpoint, prompts, max_new_tokens=tokens, llm=llm, progress=False))
    mismatched = [i for i, (a, b) in enumerate(zip(out, loop)) if a != b]
    return {"method": "vllm engine", "batch_size": len(prompts), "seconds": t, "prompts_per_s": len(prompts) / t,
            "speedup": t_loop / t, "same_outputs": out == loop, "mismatched": ",".join(map(str, mismatched)),
            "engine_startup_s": startup}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="default")
    ap.add_argument("--prompts", default="harmless-test")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto (cuda when available)")
    ap.add_argument("--vllm", action="store_true", help="also time the vLLM engine (needs vlsafe[vllm] and a GPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (1 avoids OpenMP oversubscription on a busy shared CPU)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = str(resolve_device(args.device))
    lm = load(args.ckpt, device=device)
    prompts = load_prompts(args.prompts, limit=args.n).prompts
    kw = dict(max_new_tokens=args.tokens, cache=False, progress=False)
    generate(lm, prompts[:2], **kw)  # warm-up (allocator, kernels)
    loop, t_loop = _timed(lambda: [generate(lm, [p], batch_size=1, **kw)[0] for p in prompts], device)
    base = {"ckpt": args.ckpt, "n_prompts": len(prompts), "max_new_tokens": args.tokens,
            "threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0], "device": device,
            "device_name": device_name(device)}
    rows = [{**base, "method": "per-prompt loop", "batch_size": 1, "seconds": t_loop,
             "prompts_per_s": len(prompts) / t_loop, "speedup": 1.0, "same_outputs": True}]
    ok = True
    for bs in args.batch_sizes:
        out, t = _timed(lambda: generate(lm, prompts, batch_size=bs, **kw), device)
        same = out == loop
        ok &= same
        mismatched = [i for i, (a, b) in enumerate(zip(out, loop)) if a != b]
        rows.append({**base, "method": "batched", "batch_size": bs, "seconds": t, "prompts_per_s": len(prompts) / t,
                     "speedup": t_loop / t, "same_outputs": same, "mismatched": ",".join(map(str, mismatched))})
    with tempfile.TemporaryDirectory() as cache_dir:
        ckw = dict(batch_size=max(args.batch_sizes), max_new_tokens=args.tokens, cache=Path(cache_dir), progress=False)
        generate(lm, prompts, **ckw)
        hit, t_hit = _timed(lambda: generate(lm, prompts, **ckw))
    rows.append({**base, "method": "cache hit", "batch_size": max(args.batch_sizes), "seconds": t_hit,
                 "prompts_per_s": len(prompts) / t_hit, "speedup": t_loop / t_hit, "same_outputs": hit == loop})
    if args.vllm:
        rows.append({**base, **_vllm_row(lm, prompts, args.tokens, loop, t_loop)})
    df = pd.DataFrame(rows)
    write_csv(args.out, df)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        cols = ["method", "batch_size", "seconds", "prompts_per_s", "speedup", "same_outputs"]
        print(df[cols].to_string(index=False))
    best = df[df["method"] == "batched"]["speedup"].max()
    print(f"best batched speedup {best:.2f}x (goal >= 4x); outputs identical: {ok}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
