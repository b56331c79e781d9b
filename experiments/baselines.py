"""Safety baselines that need no retraining: SafeLoRA (project a LoRA adapter onto the alignment subspace) and
RESTA (add a safety vector to a fine-tuned model).

**SafeLoRA** (Hsu et al., NeurIPS 2024; docs/methods.md, "SafeLoRA"). Per LoRA-targeted weight W, the alignment matrix is
V = W_aligned − W_base and the projection C = VVᵀ/‖V‖_F (`projection="original"`, as in `IBM/SafeLoRA`; C is not
idempotent). For the adapter's update ΔW = BA: if cos(vec(CBA), vec(BA)) ≤ τ then B ← CB. Selection
(`select`): `threshold` (τ = 0.5) or `number` (τ = the k-th smallest cosine, k = 10). Differences from the
original code, on purpose:

- pairing is **by name** (adapter module → canonical weight name), never a positional `zip`;
- the cosines of every module are computed first, **without touching the adapter**, and only then is the
  selection applied (the original `number` mode projected during its first pass, issue #2);
- V is **streamed** one tensor at a time from the two checkpoints (never two models in memory), and C is never
  formed: CB = V(VᵀB)/‖V‖_F;
- `projection="orthonormal"` uses C = QQᵀ with Q an orthonormal basis of V's leading left singular vectors
  (idempotent). V is numerically full rank for real fine-tunes, so the basis is truncated: `rank` vectors, or
  as many as hold `energy` of ‖V‖²_F.

The diagnostic Pdst (the paper's "projected distance") is reported per module as 1/(1 + ‖B_final − CB‖_F),
1 for projected modules, as in the original code; its mean is in `summary`. An update orthogonal to V's column
space has CB = 0 and cosine 0 (torch's eps-clamped cosine in the original), so it is projected away entirely;
a module whose V is zero (aligned = base there) gets cosine NaN and is never projected.

**RESTA** (Bhardwaj et al., ACL 2024; docs/methods.md, "RESTA and task vectors"): θ = θ_SFT + β·δ_safe, δ_safe = θ_aligned − θ_unaligned,
optionally DARE-sparsified. Implemented as merge plans run by the streaming executor (`vlsafe.analysis.merging`):
task arithmetic on base θ_SFT with weights (β, −β); with `density < 1`, `dare_linear` on base θ_unaligned with
models θ_aligned (weight β, density d) and θ_SFT (weight 1, density 1), so only δ_safe is sparsified (DARE
rescales by the L1 norm as mergekit does, not by 1/d).

>>> safelora_project("runs/lora-adapter", aligned="llama-2-chat", base="llama-2", out_dir="runs/safelora")
>>> resta("runs/sft", aligned="llm-aligned", unaligned="llm-harmful", out_dir="runs/resta", beta=0.5)
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import pandas as pd
import torch
from tqdm.auto import tqdm

from vlsafe.analysis.checkpoints import Checkpoint, open_checkpoint
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.names import families, layer_module
from vlsafe.analysis.runinfo import atomic_path, check_out_dir, read_json_object, write_csv, write_run_json

SELECT_TYPES = ("threshold", "number")
PROJECTIONS = ("original", "orthonormal")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraPair:
    """One LoRA module of an adapter: its key stem, the canonical weight it updates, and A (r×in), B (out×r)."""

    stem: str
    canonical: str
    a: torch.Tensor
    b: torch.Tensor


@dataclass
class SafeLoRAResult:
    """What `safelora_project` did: the output folder, one row per module, and the summary numbers."""

    out_dir: Path
    table: pd.DataFrame
    summary: dict[str, Any]


# ---- adapter I/O ---------------------------------------------------------------------------------------------
def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, all adapter tensors) of a peft LoRA adapter folder (safetensors only)."""
    d = Path(adapter_dir)
    cfg_file, weights = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise VlsafeError(f"{d}: not a peft adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    cfg = read_json_object(cfg_file)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise VlsafeError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise VlsafeError(f"{cfg_file}: DoRA adapters are not supported by SafeLoRA (use_dora is true)")
    if cfg.get("fan_in_fan_out"):
        raise VlsafeError(f"{cfg_file}: fan_in_fan_out adapters (Conv1D weights) are not supported")
    from safetensors.torch import load_file

    return cfg, load_file(str(weights))


def _canonical_for(stem: str, ckpt: Checkpoint) -> str | None:
    """The canonical name in `ckpt` of the weight updated by LoRA module `stem` (any family's raw spelling)."""
    raw = stem.removeprefix(_PEFT_PREFIX) + ".weight"
    candidates = [raw] + [c for fam in families().values() if (c := fam.canonical(raw))]
    if ckpt.family.canonical(raw):
        candidates.insert(0, ckpt.family.canonical(raw))
    return next((c for c in candidates if c in ckpt.infos), None)


def lora_pairs(tensors: dict[str, torch.Tensor], ckpt: Checkpoint, source: str = "adapter") -> list[LoraPair]:
    """Pair each `…lora_A.weight` with its `…lora_B.weight` **by name** and map it to `ckpt`'s canonical weight."""
    pairs = []
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        stem = key[: -len(".lora_A.weight")]
        b_key = stem + ".lora_B.weight"
        if b_key not in tensors:
            raise VlsafeError(f"{source}: '{key}' has no matching '{b_key}'")
        canon = _canonical_for(stem, ckpt)
        if canon is None:
            raise VlsafeError(f"{source}: LoRA module '{stem}' matches no weight of {ckpt.spec}")
        a, b = tensors[key], tensors[b_key]
        want = tuple(ckpt.infos[canon].shape)
        if (b.shape[0], a.shape[1]) != want or a.shape[0] != b.shape[1]:
            raise VlsafeError(f"{source}: '{stem}': B{tuple(b.shape)}·A{tuple(a.shape)} does not fit {canon} {want}")
        pairs.append(LoraPair(stem, canon, a, b))
    orphan = next((k for k in tensors if k.endswith(".lora_B.weight")
                   and k[: -len(".lora_B.weight")] + ".lora_A.weight" not in tensors), None)
    if orphan:
        raise VlsafeError(f"{source}: '{orphan}' has no matching lora_A")
    if not pairs:
        raise VlsafeError(f"{source}: no lora_A/lora_B pairs found")
    order = {n: i for i, n in enumerate(ckpt.infos)}
    return sorted(pairs, key=lambda p: order[p.canonical])  # storage order: one shard open at a time


# ---- the projection -----------------------------------------------------------------------------------------
def projector(v: torch.Tensor, kind: str = "original", *, rank: int | None = None,
              energy: float = 0.9) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """B ↦ CB for the alignment matrix V (out×in), without forming C (None when V = 0).

    `original`: C = VVᵀ/‖V‖_F. `orthonormal`: C = QQᵀ, Q = the first `rank` left singular vectors of V (or the
    fewest holding `energy` of ‖V‖²_F).
    """
    if kind not in PROJECTIONS:
        raise VlsafeError(f"unknown SafeLoRA projection '{kind}'; valid: {', '.join(PROJECTIONS)}")
    norm = torch.linalg.matrix_norm(v)
    if not torch.isfinite(norm) or norm == 0:
        return None  # aligned == base here: no alignment subspace, nothing to project onto
    if kind == "original":
        return lambda b: v @ (v.T @ b) / norm
    u, s, _ = torch.linalg.svd(v, full_matrices=False)
    if rank is None:
        if not 0.0 < energy <= 1.0:
            raise VlsafeError(f"SafeLoRA energy {energy} is outside (0, 1]")
        cum = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
        rank = int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1
    if not 0 < rank <= s.numel():
        raise VlsafeError(f"SafeLoRA rank {rank} is outside 1..{s.numel()}")
    q = u[:, :rank]
    return lambda b: q @ (q.T @ b)


def _cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """cos(vec x, vec y) in fp64; 0 when either is zero (as torch's eps-clamped cosine in the original)."""
    x, y = x.reshape(-1).double(), y.reshape(-1).double()
    den = torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y)
    return float((x @ y) / den) if den > 0 else 0.0


def select_modules(cosines: dict[str, float], select: str = "threshold", *, threshold: float = 0.5,
                   num: int = 10) -> tuple[set[str], float]:
    """Which modules to project and the τ used: cos ≤ τ, with τ given (`threshold`) or the `num`-th smallest
    cosine (`number`; ties at τ are all projected, as in the original). Pure: nothing is modified."""
    if select not in SELECT_TYPES:
        raise VlsafeError(f"unknown SafeLoRA select_layers_type '{select}'; valid: {', '.join(SELECT_TYPES)}")
    finite = sorted(c for c in cosines.values() if not math.isnan(c))
    if select == "number":
        if not 0 < num:
            raise VlsafeError(f"SafeLoRA num_proj_layers must be positive, got {num}")
        tau = finite[min(num, len(finite)) - 1] if finite else float("-inf")
    else:
        tau = float(threshold)
    return {k for k, c in cosines.items() if not math.isnan(c) and c <= tau}, tau


def _project_pairs(pairs: list[LoraPair], aligned: Checkpoint, base: Checkpoint, kind: str, rank: int | None,
                   energy: float, dtype: torch.dtype, progress: bool) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Pass 1 (read-only): per module, the cosine and the candidate CB, streaming V one tensor at a time."""
    from vlsafe.analysis.merging.io import MergeReader

    ra, rb = MergeReader(aligned), MergeReader(base)
    cos, cb = {}, {}
    try:
        for p in tqdm(pairs, desc="SafeLoRA cosines", unit="module", disable=not progress):
            if not rb.has(p.canonical):
                raise VlsafeError(f"{base.spec}: no tensor '{p.canonical}' (needed for LoRA module '{p.stem}')")
            w_al, w_b = ra.get(p.canonical), rb.get(p.canonical)
            if w_al.shape != w_b.shape:
                raise VlsafeError(f"{p.canonical}: shape {tuple(w_al.shape)} in {aligned.spec} vs "
                                  f"{tuple(w_b.shape)} in {base.spec}")
            v = w_al.to(dtype) - w_b.to(dtype)
            del w_al, w_b
            proj = projector(v, kind, rank=rank, energy=energy)
            b, a = p.b.to(dtype), p.a.to(dtype)
            cb[p.stem] = proj(b) if proj is not None else b
            cos[p.stem] = _cosine(cb[p.stem] @ a, b @ a) if proj is not None else float("nan")
            del v
    finally:
        ra.close()
        rb.close()
    return cos, cb


def safelora_project(adapter_dir: str | Path, aligned: str | Checkpoint, base: str | Checkpoint,
                     out_dir: str | Path, *, select: Literal["threshold", "number"] = "threshold",
                     threshold: float = 0.5, num: int = 10,
                     projection: Literal["original", "orthonormal"] = "original", rank: int | None = None,
                     energy: float = 0.9, dtype: str | torch.dtype = torch.float64,
                     progress: bool = True) -> SafeLoRAResult:
    """Project a peft LoRA adapter with SafeLoRA and write the projected adapter to `out_dir` (atomically).

    `aligned`/`base` are the checkpoints whose difference defines the alignment subspace (e.g. a chat model and
    its pre-alignment base). Writes the adapter files, `safelora.csv` (`module, tensor, layer, layer_module,
    cosine, projected, pdst`) and `run.json`. Returns the table and a summary (τ, counts, mean Pdst).
    """
    from vlsafe.analysis.loading import as_dtype

    dt = as_dtype(dtype)
    al = aligned if isinstance(aligned, Checkpoint) else open_checkpoint(aligned)
    bs = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    check_out_dir(out_dir, inputs=[adapter_dir, al.path, bs.path])
    cfg, tensors = read_adapter(adapter_dir)
    pairs = lora_pairs(tensors, al, source=str(adapter_dir))
    cos, cb = _project_pairs(pairs, al, bs, projection, rank, energy, dt, progress)
    chosen, tau = select_modules(cos, select, threshold=threshold, num=num)
    out_tensors, rows = dict(tensors), []
    for p in pairs:
        key = p.stem + ".lora_B.weight"
        if p.stem in chosen:
            out_tensors[key] = cb[p.stem].to(p.b.dtype).contiguous()
        final = out_tensors[key].to(dt)
        layer, module = layer_module(p.canonical)
        rows.append({"module": p.stem, "tensor": p.canonical, "layer": layer, "layer_module": module,
                     "cosine": cos[p.stem], "projected": p.stem in chosen,
                     "pdst": float(1.0 / (1.0 + torch.linalg.matrix_norm(final - cb[p.stem])))})
    table = pd.DataFrame(rows)
    summary = {"select_layers_type": select, "tau": tau, "projection": projection, "modules": len(pairs),
               "projected": len(chosen), "mean_pdst": float(table["pdst"].mean()),
               "threshold": threshold if select == "threshold" else None, "num_proj_layers": num if select == "number" else None,
               "rank": rank, "energy": energy if projection == "orthonormal" and rank is None else None}
    out = _write_adapter(Path(adapter_dir), Path(out_dir), out_tensors, table, summary, al, bs)
    return SafeLoRAResult(out, table, summary)


def _write_adapter(src: Path, out: Path, tensors: dict[str, torch.Tensor], table: pd.DataFrame,
                   summary: dict[str, Any], aligned: Checkpoint, base: Checkpoint) -> Path:
    from safetensors.torch import save_file

    with atomic_path(out) as tmp:
        tmp.mkdir()
        for f in src.iterdir():
            if f.is_file() and f.name not in (ADAPTER_WEIGHTS, "run.json", "safelora.csv"):
                shutil.copy2(f, tmp / f.name)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_csv(tmp / "safelora.csv", table)
        write_run_json(tmp, kind="safelora", tables={"safelora": "safelora.csv"},
                       config={"adapter": str(src), **summary},
                       checkpoints={"aligned": aligned, "base": base}, extra={"summary": summary})
    return out


# ---- RESTA ----------------------------------------------------------------------------------------------------
def resta_plan(sft: str, aligned: str, unaligned: str, *, beta: float = 1.0, density: float = 1.0,
               seed: int = 0, rescale: bool = True, layers: list[int] | None = None,
               modules: list[str] | None = None, dtype: str = "float32") -> Any:
    """The `MergePlan` computing θ_SFT + β·DARE_d(θ_aligned − θ_unaligned) (see the module docstring)."""
    from vlsafe.analysis.merging.config import LayerMap, MergePlan, ModelEntry

    if not 0.0 < density <= 1.0:
        raise VlsafeError(f"RESTA density {density} is outside (0, 1]")
    if density == 1.0:
        from vlsafe.analysis.merging.plans import plan_resta

        plan = plan_resta(sft, aligned, unaligned, beta, layers=layers, dtype=dtype)
        return plan.model_copy(update={"modules": modules}) if modules else plan
    if modules:
        raise VlsafeError("RESTA with DARE (density < 1) supports a 'layers' selection but not 'modules'")
    weight: Any = float(beta) if layers is None else LayerMap(layers={int(i): float(beta) for i in layers}, default=0.0)
    plan = MergePlan(merge_method="dare_linear", base_model=unaligned, dtype=dtype, seed=seed, tokenizer_source=sft,
                     parameters={"rescale": rescale},
                     models=[ModelEntry(model=aligned, parameters={"weight": weight, "density": float(density)}),
                             ModelEntry(model=sft, parameters={"weight": 1.0, "density": 1.0})])
    plan.validate_structure("RESTA plan")
    return plan


def resta(sft: str, aligned: str, unaligned: str, out_dir: str | Path, *, beta: float = 1.0,
          density: float = 1.0, seed: int = 0, rescale: bool = True, layers: list[int] | None = None,
          modules: list[str] | None = None, dtype: str = "float32", progress: bool = True) -> Path:
    """Write θ_SFT + β·δ_safe (optionally DARE-sparsified δ_safe) to `out_dir` through the streaming executor.

    The output keeps `sft`'s layout (an LVLM SFT model with LLM safety endpoints merges the language model
    only). With `density < 1` the executor's base is `unaligned`, so `sft` and `unaligned` must share the
    same tensor names and shapes.
    """
    from vlsafe.analysis.merging.executor import run_merge

    plan = resta_plan(sft, aligned, unaligned, beta=beta, density=density, seed=seed, rescale=rescale,
                      layers=layers, modules=modules, dtype=dtype)
    if density < 1.0:
        _check_same_layout(open_checkpoint(sft), open_checkpoint(unaligned))
    return run_merge(plan, out_dir, progress=progress, kind="resta")


def _check_same_layout(a: Checkpoint, b: Checkpoint) -> None:
    for name, info in a.infos.items():
        other = b.infos.get(name)
        if other is None or tuple(other.shape) != tuple(info.shape):
            got = "missing" if other is None else str(tuple(other.shape))
            raise VlsafeError(f"RESTA with DARE needs {a.spec} and {b.spec} to share tensors: '{name}' is {got} in "
                              f"{b.spec}, {tuple(info.shape)} in {a.spec} (use density 1)")
