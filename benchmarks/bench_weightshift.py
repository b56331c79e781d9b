"""Benchmark the streaming weight diff against raw read throughput of the same files, in the same run.

A (default): SmolLM2-135M (`default`, fp32, 538 MB) vs a noisy copy written to a temp dir.
B (`--big`): a synthetic pair with Llama-2-7B shapes in fp16, sharded like the hub checkpoint (two shards,
~13.5 GB per model, ~27 GB in all), generated on demand and deleted afterwards
(kept and reused with `--keep-big DIR`); refused when less than 60 GB of disk is free.

Each measurement runs in a fresh subprocess (so peak RSS is its own); every repeat runs three raw-read
baselines and the diff over the same files, in an order rotated by one per repeat (no workload always runs
first, or always right after another):
- raw: `safe_open` every shard, `get_tensor` every tensor and touch one element per 4 KiB page (how HF reads);
- seq: plain sequential `readinto` of every file through one reused 16 MiB buffer (buffered, page cache);
- direct: the same with O_DIRECT (no page cache; what the disk itself delivers), where the file system allows it;
- diff: `vlsafe.analysis.weightshift.diff_checkpoints` + `aggregate_layers` (no spectra, no figures).
"cold" runs evict both checkpoints from the page cache first (`posix_fadvise(DONTNEED)`), "warm" runs
read them right after a raw read. The ratio is judged against the *fastest* baseline (median seconds); the
ratio to each one is recorded too. Goals: diff ≥ 0.8 (A) / 0.7 (B) of raw throughput; peak RSS ≤
2 × largest tensor + 500 MB (A), ≤ 2 GB (B). Results: `benchmarks/results/weightshift.csv`.

The goal is judged on cold reads (reading the files from the device). Warm rows are recorded for reference
only (`judged` False): a warm safetensors read maps cached pages without reading them (~0.02 s for A's
1.08 GB) and a warm `readinto` is a memory copy (~0.08 s), so no computation over every byte, which must
itself stream them from memory, can reach 0.8 of either. Every workload starts from the same process
state: the same imports, the diff's numba kernels loaded (numba's first call in a process costs 0.3-0.5 s
even from its disk cache) and the imports' garbage collected (torch, pandas and numba leave enough objects
that the first full collection, which the diff's header parsing triggers and the plain reads never do, took
0.11-0.12 s), all before the clock starts and recorded as `startup_seconds`. The state matters on this VM:
the same O_DIRECT read of A's files took 1.10 s in a bare process, 0.82 s after 3 s of CPU spinning and
0.68-0.82 s after these imports (medians of 6 paired fresh-process runs), so a baseline prepared less than
the diff would be slowed.

    .venv/bin/python benchmarks/bench_weightshift.py [--big] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "weightshift.csv"
MIN_FREE_BIG = 60e9
BASELINES = ("raw", "seq", "direct")
WORKLOADS = BASELINES + ("diff",)


# ---- streaming safetensors writer (two checkpoints at once, no full shard in memory) -------------------
def _header(specs: list[tuple[str, tuple[int, ...]]], dtype: str, itemsize: int) -> bytes:
    meta, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        n = itemsize
        for s in shape:
            n *= s
        meta[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_pair(dirs: tuple[Path, ...], shards: list[list[tuple[str, tuple[int, ...]]]], dtype: str,
               chunks: Iterator[tuple[object, ...]]) -> None:
    """Write one tensor layout to several checkpoint dirs; `chunks` yields one tensor chunk per dir, in order."""
    import torch

    itemsize = {"F16": 2, "BF16": 2, "F32": 4}[dtype]
    weight_map = {}
    for k, specs in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        handles = [open(d / fname, "wb") for d in dirs]
        for h in handles:
            h.write(_header(specs, dtype, itemsize))
        for name, shape in specs:
            need = int(torch.tensor(shape).prod()) if shape else 1
            while need > 0:
                parts = next(chunks)
                for h, t in zip(handles, parts):
                    h.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16
                            else memoryview(t.contiguous().numpy()).cast("B"))
                need -= parts[0].numel()
            assert need == 0, name
            weight_map[name] = fname
        for h in handles:
            h.flush()
            os.fsync(h.fileno())
            h.close()
    if len(shards) > 1:
        for d in dirs:
            (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (cold reads)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def weight_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


# ---- the workloads, each in a child process --------------------------------------------------------------
def _status_mb(key: str) -> float:
    """VmRSS / VmHWM of this process in MB (VmHWM is per address space, so unlike `ru_maxrss` it does
    not inherit the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(what: str, pre: str, post: str) -> dict:
    import torch
    from safetensors import safe_open

    from vlsafe.analysis.kernels import load as load_kernels
    from vlsafe.analysis.weightshift import aggregate_layers, diff_checkpoints

    files = weight_files(Path(pre)) + weight_files(Path(post))
    startup = time.perf_counter()
    load_kernels()  # numba's first call in a process (~0.3-0.5 s, from its disk cache); for every workload alike
    gc.collect()  # the imports' garbage: else the first full collection (~0.12 s) lands in the timed part
    startup = time.perf_counter() - startup
    base = _status_mb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    note = ""
    if what in ("seq", "direct"):
        if not read_files(files, direct=what == "direct") and what == "direct":
            note = "O_DIRECT refused: buffered"
    elif what == "raw":
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    t = st.get_tensor(name)
                    float(t.view(-1)[:: max(1, 4096 // t.element_size())].float().sum())
                    del t
    else:
        aggregate_layers(diff_checkpoints(pre, [post], progress=False))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    del torch
    return {"seconds": seconds, "cpu_seconds": cpu, "startup_seconds": startup,
            "bytes": sum(f.stat().st_size for f in files), "base_rss_mb": base,
            "peak_rss_mb": _status_mb("VmHWM"), "note": note}


def read_files(files: list[Path], direct: bool, block: int = 16 << 20) -> bool:
    """Read every byte of `files` in order through one reused page-aligned buffer, with O_DIRECT when `direct`
    and the file system allows it (else buffered). Returns whether every file was read with O_DIRECT."""
    import mmap

    buf = mmap.mmap(-1, block)  # anonymous mappings are page aligned, as O_DIRECT needs
    view = memoryview(buf)
    all_direct = direct
    try:
        for f in files:
            try:
                fd = os.open(f, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            except OSError:
                fd, all_direct = os.open(f, os.O_RDONLY), False
            try:
                pos = 0
                while n := os.preadv(fd, [view], pos):
                    pos += n
            finally:
                os.close(fd)
    finally:
        view.release()
        buf.close()
    return all_direct


def measure(what: str, pre: Path, post: Path, cold: bool) -> dict:
    if cold:
        evict(weight_files(pre) + weight_files(post))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, "--child", what, "--pre", str(pre), "--post", str(post)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_pair(bench: str, pre: Path, post: Path, repeats: int, largest_bytes: int,
             modes: tuple[str, ...] = ("cold", "warm")) -> list[dict]:
    rows = []
    for mode in modes:
        for r in range(repeats):
            for what in WORKLOADS[r % len(WORKLOADS):] + WORKLOADS[:r % len(WORKLOADS)]:  # no fixed position
                if mode == "warm":
                    measure("raw", pre, post, cold=False)  # bring both into the page cache
                m = measure(what, pre, post, cold=mode == "cold")
                rows.append({"benchmark": bench, "cache": mode, "repeat": r, "workload": what, **m,
                             "mb_per_s": m["bytes"] / m["seconds"] / 1e6,
                             "mb_per_cpu_s": m["bytes"] / m["cpu_seconds"] / 1e6,
                             "largest_tensor_mb": largest_bytes / 1e6, "loadavg_1m": os.getloadavg()[0]})
                print(f"  {bench} {mode:<4} #{r} {what:<4} {m['seconds']:7.2f} s  {rows[-1]['mb_per_s']:7.0f} MB/s  "
                      f"cpu {m['cpu_seconds']:6.2f} s  "
                      f"peak RSS {m['peak_rss_mb']:6.0f} MB  (load {rows[-1]['loadavg_1m']:.1f})", flush=True)
    return rows


def summarize(rows: list[dict], bench: str, goal_ratio: float, rss_bound_mb: float,
              modes: tuple[str, ...] = ("cold", "warm")) -> list[dict]:
    out = []
    for mode in modes:
        def med(what: str, key: str = "seconds") -> float:
            return statistics.median(r[key] for r in rows if r["cache"] == mode and r["workload"] == what)
        dif, cpu = med("diff"), med("diff", "cpu_seconds")
        base = {w: med(w) for w in BASELINES}
        fastest = min(base, key=base.get)
        ratio = base[fastest] / dif
        rss = max(r["peak_rss_mb"] for r in rows if r["workload"] == "diff")
        out.append({"benchmark": bench, "cache": mode, "repeat": "median", "workload": "ratio diff/raw",
                    "seconds": dif, "cpu_seconds": cpu, "ratio": ratio, "baseline": fastest,
                    **{f"ratio_{w}": s / dif for w, s in base.items()}, "peak_rss_mb": rss,
                    "goal_ratio": goal_ratio, "rss_bound_mb": rss_bound_mb, "meets_ratio": ratio >= goal_ratio,
                    "judged": mode == "cold", "startup_seconds": med("diff", "startup_seconds"),
                    "meets_rss": rss <= rss_bound_mb})
        each = ", ".join(f"{w} {s:.2f} s" for w, s in base.items())
        print(f"{bench} {mode}: diff {dif:.2f} s = {ratio:.2f} x the fastest raw read ({fastest}; goal >= "
              f"{goal_ratio}{'' if mode == 'cold' else ', reference only'}); baselines {each}; "
              f"diff peak RSS {rss:.0f} MB (bound {rss_bound_mb:.0f} MB); "
              f"diff CPU time {cpu:.1f} s (load avg {os.getloadavg()[0]:.1f})")
    return out


# ---- A: SmolLM2 ------------------------------------------------------------------------------------------
def bench_small(tmp: Path, repeats: int) -> list[dict]:
    import torch

    from vlsafe.analysis.checkpoints import open_checkpoint

    ck = open_checkpoint("default")
    pre = ck.path
    post = tmp / "smollm2-noisy"
    post.mkdir()
    shutil.copy(pre / "config.json", post / "config.json")
    specs = [(ck.raw_name(n), tuple(i.shape)) for n, i in ck.infos.items()]

    def chunks() -> Iterator[tuple[object, ...]]:
        g = torch.Generator().manual_seed(0)
        for _, t in ck.iter_tensors():
            n = torch.randn(t.shape, generator=g)
            yield (t + 0.01 * t.norm() * n / n.norm(),)
    write_pair((post,), [specs], "F32", chunks())
    largest = max(i.numel for i in ck.infos.values()) * 4
    rows = run_pair("A_smollm2_fp32", pre, post, repeats, largest)
    return rows + summarize(rows, "A_smollm2_fp32", 0.8, 2 * largest / 1e6 + 500)


# ---- B: Llama-2-7B shapes, fp16, hub-like shards ---------------------------------------------------------
def llama7b_shards(max_shard_bytes: float = 10e9) -> list[list[tuple[str, tuple[int, ...]]]]:
    h, f, v, n_layers = 4096, 11008, 32000, 32
    names = [("model.embed_tokens.weight", (v, h))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names += [(p + "input_layernorm.weight", (h,)), (p + "mlp.down_proj.weight", (h, f)),
                  (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                  (p + "post_attention_layernorm.weight", (h,))]
        names += [(p + f"self_attn.{m}_proj.weight", (h, h)) for m in "kqov"]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    shards, cur, size = [], [], 0
    for name, shape in names:
        nbytes = 2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    return shards + [cur]


def bench_big(tmp: Path, repeats: int) -> list[dict]:
    import torch

    pre, post = tmp / "llama7b-a", tmp / "llama7b-b"
    if (tmp / "complete").is_file():
        print(f"B: reusing the pair in {tmp}", flush=True)
        return _measure_big(pre, post, repeats)
    free = shutil.disk_usage(tmp).free
    if free < MIN_FREE_BIG:
        print(f"B skipped: {free / 1e9:.0f} GB free on {tmp}, need {MIN_FREE_BIG / 1e9:.0f} GB")
        return [{"benchmark": "B_llama7b_fp16", "workload": "skipped", "note": f"{free / 1e9:.0f} GB free"}]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000,
           "torch_dtype": "float16"}
    for d in (pre, post):
        shutil.rmtree(d, ignore_errors=True)  # a partial pair from an interrupted --keep-big run
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
    shards = llama7b_shards()
    g = torch.Generator().manual_seed(0)
    pool, noise = torch.randn(1 << 26, generator=g).half(), (0.01 * torch.randn(1 << 26, generator=g)).half()

    def chunks() -> Iterator[tuple[object, ...]]:
        for specs in shards:
            for _, shape in specs:
                left = shape[0] * (shape[1] if len(shape) > 1 else 1)
                while left:
                    n = min(left, 1 << 24)
                    o1, o2 = (int(x) for x in torch.randint(0, (1 << 26) - n + 1, (2,), generator=g))
                    a = pool[o1:o1 + n]
                    yield a, a + noise[o2:o2 + n]
                    left -= n
    t0 = time.perf_counter()
    write_pair((pre, post), shards, "F16", chunks())
    print(f"B: wrote 2 x {sum(f.stat().st_size for f in weight_files(pre)) / 1e9:.1f} GB in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    del pool, noise
    (tmp / "complete").write_text("")
    return _measure_big(pre, post, repeats)


def _measure_big(pre: Path, post: Path, repeats: int) -> list[dict]:
    # 27 GB does not fit the page cache of a 24 GiB machine: only cold reads are meaningful.
    rows = run_pair("B_llama7b_fp16", pre, post, repeats, 32000 * 4096 * 2, modes=("cold",))
    return rows + summarize(rows, "B_llama7b_fp16", 0.7, 2000, modes=("cold",))


def save(rows: list[dict], benches: set[str]) -> None:
    import pandas as pd

    from vlsafe.analysis.runinfo import write_csv

    new = pd.DataFrame(rows)
    if RESULTS.is_file():
        old = pd.read_csv(RESULTS)
        new = pd.concat([old[~old["benchmark"].isin(benches)], new], ignore_index=True)
    write_csv(RESULTS, new)
    print(f"results: {RESULTS}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", action="store_true", help="also run B (Llama-2-7B shapes, ~27 GB temp disk)")
    ap.add_argument("--only-big", action="store_true", help="run B only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="temp dir parent (default: system temp)")
    ap.add_argument("--keep-big", default=None, metavar="DIR",
                    help="generate B's pair into DIR and keep it (reused when already complete) instead of a temp dir")
    ap.add_argument("--child", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    ap.add_argument("--pre", help=argparse.SUPPRESS)
    ap.add_argument("--post", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.pre, args.post)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    rows, benches = [], set()
    with tempfile.TemporaryDirectory(prefix="vlsafe-bench-", dir=args.tmp) as tmp:
        if not args.only_big:
            (Path(tmp) / "a").mkdir()
            rows += bench_small(Path(tmp) / "a", args.repeats)
            benches.add("A_smollm2_fp32")
        if args.big or args.only_big:
            big = Path(args.keep_big) if args.keep_big else Path(tmp) / "b"
            big.mkdir(parents=True, exist_ok=True)
            big_rows = bench_big(big, args.repeats)
            if big_rows:  # skipped (no disk): keep the recorded B rows
                rows += big_rows
                benches.add("B_llama7b_fp16")
    if benches:
        save(rows, benches)


if __name__ == "__main__":
    main()
