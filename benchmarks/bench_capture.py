"""Benchmark: all-layer residual capture on SmolLM2 vs a plain HF forward, TransformerLens and nnsight.

Measured in one run (median of `--repeats`), same left-padded batch for every method:
  plain      model(**batch, output_hidden_states=True)           (the baseline, ratio 1.0)
  vlsafe     vlsafe.probes.capture.capture(hooks=resid_pre+resid_post, all layers, positions=post_instruction)
  tl         TransformerBridge.run_with_cache(names_filter=[blocks.*.hook_resid_pre/post])   (bridge booted once)
  nnsight    LanguageModel.trace saving every block's input and output
Goal: vlsafe ≤ 1.05× plain and faster than tl and nnsight. Also: accumulator memory vs number of prompts
(`capture(..., accumulate=True)`), which must stay flat.

    .venv/bin/python benchmarks/bench_capture.py [--repeats 3] [--batches 8 32] [--out benchmarks/results/capture.csv]
    python benchmarks/bench_capture.py --device cuda --batches 8 32 128 --out benchmarks/results/capture_cuda.csv

`--device cpu|cuda|cuda:N|auto` (default cpu; auto = cuda when available) puts the model there; GPU timings wait
for the device (`torch.cuda.synchronize`) before the clock stops. Every row records `device` and `device_name`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from vlsafe.analysis.placement import device_name, resolve_device, synchronize  # noqa: E402
from vlsafe.analysis.runinfo import write_csv  # noqa: E402
from vlsafe.probes import models as M  # noqa: E402
from vlsafe.probes.backends.nnsight import wrap  # noqa: E402
from vlsafe.probes.backends.transformer_lens import build_bridge  # noqa: E402
from vlsafe.probes.capture import capture  # noqa: E402
from vlsafe.probes.templates import encode  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HARMLESS = ROOT / "probes" / "behavior" / "prompts" / "harmless.jsonl"


def load_prompts(n: int) -> list[str]:
    """The shipped harmless prompts if present, else generated sentences."""
    if HARMLESS.is_file():
        rows = [json.loads(line)["prompt"] for line in HARMLESS.read_text().splitlines() if line.strip()]
        if len(rows) >= n:
            return rows[:n]
    return [f"Write {i % 5 + 1} sentences about topic number {i} for a school newsletter." for i in range(n)]


def timed_round_robin(fns: dict, repeats: int, device: str = "cpu") -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per function; one warm-up each, then the functions are interleaved per repeat
    so that load from other processes hits every method alike. CPU time (`time.process_time`, all threads of
    this process) is the steadier figure on a shared machine. On a GPU the clock stops after a synchronize."""
    for fn in fns.values():
        fn()
    synchronize(device)
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            synchronize(device)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def methods(lm, prompts: list[str], bridge, nns) -> dict:
    L = M.num_layers(lm.model)
    batch = encode(lm, prompts).to(next(lm.model.parameters()).device)
    names = [f"blocks.{i}.hook_resid_{k}" for i in range(L) for k in ("pre", "post")]

    def plain():
        with torch.inference_mode():
            return lm.model(**batch.model_inputs(), output_hidden_states=True).hidden_states

    def vlsafe():
        return capture(lm, prompts, hooks=["resid_pre", "resid_post"], positions="post_instruction",
                       batch_size=len(prompts), progress=False)

    def tl():
        with torch.no_grad():
            return bridge.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                         position_ids=batch.position_ids, names_filter=names)[1]

    def nnsight_trace():
        out = []
        with torch.no_grad():
            with nns.trace(**batch.model_inputs()):
                for i in range(L):
                    out.append(nns.model.layers[i].input.save())
                    out.append(nns.model.layers[i].output.save())
        return out

    return {"plain": plain, "vlsafe": vlsafe, "tl": tl, "nnsight": nnsight_trace}


def bench_speed(lm, batches: list[int], repeats: int, device: str = "cpu") -> list[dict]:
    bridge, nns = build_bridge(lm), wrap(lm)
    rows = []
    for n in batches:
        prompts = load_prompts(n)
        tokens = int(encode(lm, prompts).input_ids.numel())
        timed = timed_round_robin(methods(lm, prompts, bridge, nns), repeats, device)
        base_w, base_c = timed["plain"]
        for name, (wall, cpu) in timed.items():
            rows.append({"benchmark": "speed", "method": name, "batch": n, "tokens": tokens, "seconds": wall,
                         "cpu_seconds": cpu, "ratio_vs_plain": wall / base_w, "cpu_ratio_vs_plain": cpu / base_c,
                         "repeats": repeats, "loadavg_1m": os.getloadavg()[0], "bytes": None})
            print(f"batch {n:3d} ({tokens} tokens)  {name:8s} wall {wall:7.3f} s ×{wall / base_w:.2f}   "
                  f"cpu {cpu:7.3f} s ×{cpu / base_c:.2f}   (load {os.getloadavg()[0]:.1f})", flush=True)
    return rows


def bench_memory(lm, counts: list[int]) -> list[dict]:
    rows = []
    L, d = M.num_layers(lm.model), M.hidden_size(lm.model)
    for n in counts:
        acts = capture(lm, load_prompts(n), hooks=["resid_pre"], positions="post_instruction", batch_size=8,
                       accumulate=True, progress=False)
        stat_bytes = sum(s.nbytes for s in acts._stats.values())
        full_bytes = n * L * len(acts.positions) * d * 4
        rows.append({"benchmark": "accumulator_memory", "method": "vlsafe_accumulate", "batch": 8, "tokens": None,
                     "seconds": None, "ratio_vs_plain": None, "repeats": 1, "bytes": stat_bytes,
                     "n_prompts": n, "tensor_mode_bytes": full_bytes})
        print(f"accumulate {n:4d} prompts: stats {stat_bytes / 1e6:.2f} MB (tensor mode would hold "
              f"{full_bytes / 1e6:.2f} MB)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--memory-counts", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto (cuda when available)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "capture.csv")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    lm = M.load("default", device=device)
    print(f"SmolLM2: {M.num_layers(lm.model)} layers on {device} ({device_name(device)}), torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    rows = bench_speed(lm, args.batches, args.repeats, device) + bench_memory(lm, args.memory_counts)
    write_csv(args.out, pd.DataFrame(rows).assign(device=device, device_name=device_name(device)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
