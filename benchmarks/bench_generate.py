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

Remedy rows (`remedy: plain`, `remedy: steer`, `remedy: gated`; `--remedies-only` runs just these): the same
batches generated plainly, under `steer` (the difference-in-means direction of harmful-/harmless-train at
`--remedy-layer`, × `--alpha`) and under that steer gated by a probe condition at `--condition-layer` (fitted on
the train splits, threshold on harmless-val), interleaved `--repeats` times, fastest kept; `ratio_to_plain` is the
time over plain generation's (goals: steer ≤ 1.15, gated ≤ 1.2). `same_outputs` of the gated row checks that each
prompt got the steered answer exactly when the gate fired and the plain one otherwise; `gate_fire_rate` says how
often it fired. `--remedies-only` writes `benchmarks/results/generate_remedies.csv`.
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
OUT_REMEDIES = OUT.with_name("generate_remedies.csv")  # --remedies-only


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


def _remedy_setup(lm, condition_layer: int | None, remedy_layer: int | None, alpha: float):
    """(condition, steering vector, remedy layer) fitted on the shipped train splits (and harmless-val)."""
    from vlsafe.probes.capture import capture
    from vlsafe.probes.directions import mean_diff
    from vlsafe.probes.gate import fit_condition
    from vlsafe.probes.models import num_layers

    n = num_layers(lm.model)
    cl = n // 2 if condition_layer is None else condition_layer
    rl = (2 * n) // 3 if remedy_layer is None else remedy_layer
    train = {k: load_prompts(k, limit=32) for k in ("harmful-train", "harmless-train")}
    cond = fit_condition(lm, layer=cl, kind="probe", harmful_train=train["harmful-train"],
                         harmless_train=train["harmless-train"], harmless_val=load_prompts("harmless-val", limit=32))
    acts = [capture(lm, train[k], layers=[rl], progress=False) for k in ("harmful-train", "harmless-train")]
    r = mean_diff(*acts, layers=[rl], normalize=True)[0, 0]
    return cond, alpha * r, rl


def _remedy_rows(lm, prompts: list[str], *, bs: int, kw: dict, device: str, args) -> list[dict]:
    """Plain vs steer vs gated generation on the same batches (see the module docstring)."""
    import contextlib

    from vlsafe.probes.gated import gated
    from vlsafe.probes.remedies import steer

    cond, vec, rl = _remedy_setup(lm, args.condition_layer, args.remedy_layer, args.alpha)
    methods = {"plain": contextlib.nullcontext, "steer": lambda: steer(lm, vec, layers=[rl]),
               "gated": lambda: gated(lm, cond, steer(lm, vec, layers=[rl]), layers=[rl])}
    best: dict[str, float] = {}
    outs: dict[str, list[str]] = {}
    fired: list[bool] = []
    for _ in range(max(args.repeats, 1)):
        for name, ctx in methods.items():
            with ctx() as gate:
                out, t = _timed(lambda: generate(lm, prompts, batch_size=bs, **kw), device)
                if name == "gated":
                    fired = gate.fired_for(prompts)
            outs.setdefault(name, out)
            best[name] = min(best.get(name, float("inf")), t)
    consistent = outs["gated"] == [s if f else p for p, s, f in zip(outs["plain"], outs["steer"], fired)]
    extra = {"condition_layer": cond.layer, "remedy_layer": rl, "alpha": args.alpha, "repeats": args.repeats}
    return [{"method": f"remedy: {name}", "batch_size": bs, "seconds": t, "prompts_per_s": len(prompts) / t,
             "ratio_to_plain": t / best["plain"], "same_outputs": consistent if name == "gated" else None,
             "gate_fire_rate": sum(fired) / len(fired) if name == "gated" else None, **extra}
            for name, t in best.items()]


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
    ap.add_argument("--out", type=Path, default=None, help=f"CSV (default {OUT.name}; {OUT_REMEDIES.name} with "
                    "--remedies-only)")
    ap.add_argument("--condition-layer", type=int, default=None, help="gate condition layer (default: L // 2)")
    ap.add_argument("--remedy-layer", type=int, default=None, help="steering layer (default: 2L // 3)")
    ap.add_argument("--alpha", type=float, default=4.0, help="steering strength (× the unit direction)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the remedy rows (fastest kept)")
    ap.add_argument("--remedies-only", action="store_true", help="only the remedy rows (plain, steer, gated)")
    args = ap.parse_args(argv)
    args.out = args.out or (OUT_REMEDIES if args.remedies_only else OUT)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = str(resolve_device(args.device))
    lm = load(args.ckpt, device=device)
    prompts = load_prompts(args.prompts, limit=args.n).prompts
    kw = dict(max_new_tokens=args.tokens, cache=False, progress=False)
    generate(lm, prompts[:2], **kw)  # warm-up (allocator, kernels)
    base = {"ckpt": args.ckpt, "n_prompts": len(prompts), "max_new_tokens": args.tokens,
            "threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0], "device": device,
            "device_name": device_name(device)}
    if args.remedies_only:
        return _report_remedies(pd.DataFrame([{**base, **r} for r in _remedy_rows(
            lm, prompts, bs=max(args.batch_sizes), kw=kw, device=device, args=args)]), args.out)
    loop, t_loop = _timed(lambda: [generate(lm, [p], batch_size=1, **kw)[0] for p in prompts], device)
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
    remedy = _remedy_rows(lm, prompts, bs=max(args.batch_sizes), kw=kw, device=device, args=args)
    rows += [{**base, **r, "speedup": t_loop / r["seconds"]} for r in remedy]
    df = pd.DataFrame(rows)
    write_csv(args.out, df)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        cols = ["method", "batch_size", "seconds", "prompts_per_s", "speedup", "same_outputs"]
        print(df[cols].to_string(index=False))
    best = df[df["method"] == "batched"]["speedup"].max()
    print(f"best batched speedup {best:.2f}x (goal >= 4x); outputs identical: {ok}; wrote {args.out}")
    _print_ratios(df)
    return 0 if ok and _gate_ok(df) else 1


def _gate_ok(df: pd.DataFrame) -> bool:
    return bool(df.loc[df["method"] == "remedy: gated", "same_outputs"].all())


def _print_ratios(df: pd.DataFrame) -> None:
    r = df.set_index("method")["ratio_to_plain"]
    print(f"time over plain generation: steer {r['remedy: steer']:.2f}x (goal <= 1.15x), gated "
          f"{r['remedy: gated']:.2f}x (goal <= 1.2x); gate fired on "
          f"{df.set_index('method').loc['remedy: gated', 'gate_fire_rate']:.0%} of prompts; "
          f"gated outputs consistent: {_gate_ok(df)}")


def _report_remedies(df: pd.DataFrame, out: Path) -> int:
    write_csv(out, df)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(df[["method", "batch_size", "seconds", "prompts_per_s", "ratio_to_plain", "same_outputs"]]
              .to_string(index=False))
    _print_ratios(df)
    print(f"wrote {out}")
    return 0 if _gate_ok(df) else 1


if __name__ == "__main__":
    sys.exit(main())
