"""Merge throughput and memory: vlsafe vs mergekit on the same YAML and inputs, measured in one run.

Inputs: the embedded SmolLM2-135M (fp32, 538 MB) and a noisy copy (1% relative Gaussian noise per tensor).
For `linear`, `ties` and `ties_index` (vlsafe's opt-in `tie_break: index`, which mergekit ignores), each tool
runs in its own fresh subprocess (so peak RSS is its own), `--repeat` times with the same torch thread count
(`--threads`); the best time counts. Ratios are against mergekit measured in the same run. Also reports the
max-abs difference between the two outputs on their common tensors (mergekit adds an untied `lm_head`).

    .venv/bin/python benchmarks/bench_merge.py [--repeat 2] [--out benchmarks/results/merge.csv]
    python benchmarks/bench_merge.py --device cuda --out benchmarks/results/merge_cuda.csv

`--device cpu|cuda|cuda:N|auto` (default cpu; auto = cuda when available) is where each tool computes: mergekit
gets `MergeOptions(device=...)`; vlsafe's `run_merge` gets `device=` when it accepts one, else it streams on the
CPU. Each row records the requested `device`, the `device_used` by that tool, and `device_name`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = {
    "linear": "merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.5}}}}\n"
              "  - {{model: {b}, parameters: {{weight: 0.5}}}}\n",
    "ties": "merge_method: ties\nbase_model: {a}\nmodels:\n  - {{model: {b}, parameters: {{weight: 1.0, density: 0.5}}}}\n",
    # vlsafe's opt-in kthvalue trim (mergekit ignores the parameter and sorts): max_abs shows what ties change
    "ties_index": "merge_method: ties\nbase_model: {a}\nparameters: {{tie_break: index}}\nmodels:\n"
                  "  - {{model: {b}, parameters: {{weight: 1.0, density: 0.5}}}}\n",
}


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(tool: str, config: str, out: str, threads: str, device: str = "cpu") -> None:
    """Run one merge in this process and print timings and memory as JSON."""
    t0 = time.perf_counter()
    import inspect

    import torch
    import yaml

    from vlsafe.analysis.placement import synchronize

    torch.set_num_threads(int(threads))
    used = device
    if tool == "vlsafe":
        from vlsafe.analysis.merging import MergePlan, run_merge

        extra = {"device": device} if "device" in inspect.signature(run_merge).parameters else {}
        used = device if extra else "cpu"

        def go() -> None:
            run_merge(MergePlan.from_dict(yaml.safe_load(Path(config).read_text())), out, progress=False, **extra)
    else:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge as mk_run_merge

        def go() -> None:
            cfg = MergeConfiguration.model_validate(yaml.safe_load(Path(config).read_text()))
            mk_run_merge(cfg, out, options=MergeOptions(lazy_unpickle=False, quiet=True, device=device))
    t1 = time.perf_counter()
    rss0 = _status_mb("VmRSS")
    go()
    synchronize(used)
    t2 = time.perf_counter()
    # VmHWM, not ru_maxrss: after fork+exec Linux carries the parent's peak into ru_maxrss
    peak = _status_mb("VmHWM")
    print(json.dumps({"import_s": t1 - t0, "merge_s": t2 - t1, "rss_before_mb": rss0, "peak_rss_mb": peak,
                      "device_used": used}))


def noisy_copy(src: Path, dst: Path, rel: float = 0.01, seed: int = 0) -> Path:
    """`src` with each float tensor perturbed by Gaussian noise of relative Frobenius size `rel`."""
    import torch
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    tensors = load_file(src / "model.safetensors")
    for k, t in tensors.items():
        noise = torch.randn(t.shape, generator=g)
        tensors[k] = t + noise * (rel * t.norm() / noise.norm())
    dst.mkdir(parents=True)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    return dst


def synthetic_7b_shaped(dst: Path, layers: int, seed: int) -> Path:
    """A Llama-2-7B-shaped bf16 checkpoint (vocab 32000, hidden 4096, MLP 11008) with `layers` layers,
    written tensor by tensor with vlsafe's streaming writer (peak memory per group does not depend on depth)."""
    import torch
    from transformers import LlamaConfig

    from vlsafe.analysis.merging.io import ShardedWriter

    h, m, v = 4096, 11008, 32000
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        shapes.update({p + f"self_attn.{x}_proj.weight": (h, h) for x in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                       p + "mlp.down_proj.weight": (h, m)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    dst.mkdir(parents=True)
    writer = ShardedWriter(dst, [(n, torch.bfloat16, s) for n, s in shapes.items()], "5GB")
    g = torch.Generator().manual_seed(seed)
    for n, shape in shapes.items():
        writer.write(n, (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16))
    writer.close()
    LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=m, num_hidden_layers=layers, num_attention_heads=32,
                num_key_value_heads=32, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
                dtype="bfloat16").to_json_file(dst / "config.json")
    return dst


def _run(tool: str, config: Path, out: Path, threads: int, device: str = "cpu") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", tool, str(config), str(out), str(threads), device],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{tool} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def _max_abs(a: Path, b: Path) -> float:
    from vlsafe.analysis.checkpoints import open_checkpoint

    ca, cb = open_checkpoint(a), open_checkpoint(b)
    common = [n for n in ca.infos if n in cb.infos]
    return max(float((ca.get_tensor(n) - cb.get_tensor(n)).abs().max()) for n in common)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both tools (1 = robust on a shared machine; oversubscribed OpenMP "
                         "threads slowed both tools ~9x in our runs)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto (cuda when available)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "merge.csv"))
    ap.add_argument("--big-layers", type=int, default=2,
                    help="also merge a 7B-shaped bf16 pair with this many layers (0 = skip); vlsafe's peak RSS is "
                         "one tensor group whatever the depth, mergekit's grows with its in-memory output shard")
    ap.add_argument("--methods", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--only-big", action="store_true",
                    help="run only the 7B-shaped merge (use --big-layers 32 for the full depth, ~54 GB of temp "
                         "disk); the CSV's other rows are kept")
    args = ap.parse_args()
    import pandas as pd

    from vlsafe.analysis.placement import device_name, resolve_device
    from vlsafe.analysis.resolve import resolve
    from vlsafe.analysis.runinfo import write_csv

    device = str(resolve_device(args.device))

    base = resolve("default")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        work = Path(tmp)
        pairs = {}
        if not args.only_big:
            noisy = noisy_copy(base, work / "noisy")
            pairs = {m: (base, noisy) for m in args.methods.split(",")}
        if args.big_layers:
            big = [synthetic_7b_shaped(work / f"big{i}", args.big_layers, i) for i in range(2)]
            pairs[f"linear-7b-shaped-{args.big_layers}L-bf16"] = tuple(big)
        for method, (a, b) in pairs.items():
            config = work / f"{method}.yaml"
            config.write_text(CONFIGS[method.split("-")[0]].format(a=a, b=b))
            results = {}
            for tool in ("mergekit", "vlsafe"):
                runs = [_run(tool, config, work / f"out_{method}_{tool}", args.threads, device)
                        for _ in range(args.repeat)]
                results[tool] = min(runs, key=lambda r: r["merge_s"])
                results[tool]["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
            diff = _max_abs(work / f"out_{method}_vlsafe", work / f"out_{method}_mergekit")
            mk = results["mergekit"]
            for tool, r in results.items():
                rows.append({"method": method, "tool": tool, "merge_s": round(r["merge_s"], 3),
                             "wall_s": round(r["wall_s"], 3), "import_s": round(r["import_s"], 3),
                             "peak_rss_mb": round(r["peak_rss_mb"], 1),
                             "merge_rss_mb": round(r["peak_rss_mb"] - r["rss_before_mb"], 1),
                             "speedup_vs_mergekit": round(mk["merge_s"] / r["merge_s"], 2),
                             "wall_speedup_vs_mergekit": round(mk["wall_s"] / r["wall_s"], 2),
                             "rss_ratio_vs_mergekit": round(r["peak_rss_mb"] / mk["peak_rss_mb"], 2),
                             "max_abs_vs_mergekit": diff, "repeats": args.repeat, "threads": args.threads,
                             "device": device, "device_used": r["device_used"], "device_name": device_name(device)})
    df = pd.DataFrame(rows)
    if Path(args.out).is_file():  # keep the rows of methods not run this time
        old = pd.read_csv(args.out)
        df = pd.concat([old[~old["method"].isin(set(df["method"]))], df], ignore_index=True)
    write_csv(args.out, df)
    print(df.to_string(index=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:7])
    else:
        main()
