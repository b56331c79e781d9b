"""Task-vector geometry over three checkpoints: norms of τ_A, τ_B and their cosine, per tensor and per layer.

>>> from vlsafe.analysis.taskvectors import task_vectors, aggregate_task_vectors
>>> tv = task_vectors("llm", "lvlm", "lvlm_safe", mode="chain")   # τ_A = LVLM − LLM, τ_B = SAFE − LVLM
>>> layers = aggregate_task_vectors(tv)                           # per (layer, module) and module=all

`mode="siblings"`: τ_A = θ_A − θ₀, τ_B = θ_B − θ₀ (two descendants of one base). `mode="chain"`:
τ_A = θ_A − θ₀, τ_B = θ_B − θ_A (the paper's τ_VL = LVLM − LLM vs τ_safety = safety-tuned − LVLM).
Only language-model tensors are compared (vision tower and projector excluded); embedding and head
matrices on the rows shared by all three (the LVLM's added `<image>`/`<pad>` rows are left out). Dot
products and squared norms are accumulated per tensor in fp64; a layer's cosine is
Σ⟨τ_A,τ_B⟩ / √(Σ‖τ_A‖² Σ‖τ_B‖²) over its tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from vlsafe.analysis.checkpoints import Checkpoint, open_checkpoint
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.kernels import piece_sums, triple_sums, warm_up
from vlsafe.analysis.layergroups import cosine, group_layers
from vlsafe.analysis.names import layer_module
from vlsafe.analysis.pairing import checkpoint_labels, pair_checkpoints
from vlsafe.analysis.streaming import DEFAULT_CHUNK_ELEMS, Job, open_readers, stream_rows

MODES = ("siblings", "chain")


@dataclass
class TaskStats:
    """fp64 running ‖τ_A‖², ‖τ_B‖², ⟨τ_A,τ_B⟩ of one tensor."""

    numel: int = 0
    sq_a: float = 0.0
    sq_b: float = 0.0
    dot: float = 0.0
    nonfinite: int = 0

    def update(self, w0: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, chain: bool) -> None:
        """Add one chunk triple (same shape); entries non-finite in any of the three are left out."""
        w0, wa, wb = w0.reshape(-1), wa.reshape(-1), wb.reshape(-1)
        if not w0.numel():
            return
        s, left_out = piece_sums(lambda x0, xa, xb: triple_sums(x0, xa, xb, chain), w0, wa, wb)
        sa, sb, d = s.sum(0).tolist()
        self.sq_a, self.sq_b, self.dot = self.sq_a + sa, self.sq_b + sb, self.dot + d
        self.nonfinite += left_out
        self.numel += w0.numel()


def _ckpt(c: Checkpoint | str) -> Checkpoint:
    return c if isinstance(c, Checkpoint) else open_checkpoint(c)


def task_vectors(base: Checkpoint | str, a: Checkpoint | str, b: Checkpoint | str, *, mode: str = "siblings",
                 labels: Sequence[str] | None = None, chunk_elems: int = DEFAULT_CHUNK_ELEMS,
                 prefetch: bool = True, progress: bool = True) -> pd.DataFrame:
    """Per language-model tensor: ‖τ_A‖, ‖τ_B‖, cos(τ_A, τ_B) (and the fp64 sums), streaming three checkpoints."""
    if mode not in MODES:
        raise VlsafeError(f"task-vector mode '{mode}': expected one of {', '.join(MODES)}")
    warm_up()
    base, a, b = _ckpt(base), _ckpt(a), _ckpt(b)
    lb = list(labels) if labels else checkpoint_labels([base.spec, a.spec, b.spec])
    pa = pair_checkpoints(base, a, namespaces=("language",))
    pb = pair_checkpoints(base, b, namespaces=("language",))
    second = pair_checkpoints(a, b, namespaces=("language",)) if mode == "chain" else pb
    names = [n for n in base.names("language") if n in pa.rows and n in pb.rows and n in second.rows]
    if not names:
        raise VlsafeError(f"{base.spec}, {a.spec}, {b.spec}: no language-model tensor present in all three")
    jobs = [Job(n, (r, r, r)) for n in names for r in [min(pa.rows[n], pb.rows[n], second.rows[n])]]
    readers = open_readers([base, a, b])
    rows, st = [], TaskStats()
    bar = tqdm(total=len(jobs), unit="tensor", desc="task vectors", disable=not progress)
    try:
        for name, _, _, (w0, wa, wb), last in stream_rows(readers, jobs, chunk_elems, prefetch):
            st.update(w0, wa, wb, mode == "chain")
            if last:
                rows.append(_row(name, st, lb, mode, pa.notes.get(name) or pb.notes.get(name, "")))
                st = TaskStats()
                bar.update()
    finally:
        bar.close()
        for r in readers:
            r.close()
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    return df


def _row(name: str, st: TaskStats, labels: Sequence[str], mode: str, note: str) -> dict[str, Any]:
    layer, module = layer_module(name)
    if st.nonfinite:
        note = "; ".join(x for x in (note, f"{st.nonfinite} non-finite entries excluded") if x)
    return {"base": labels[0], "checkpoint_a": labels[1], "checkpoint_b": labels[2], "mode": mode,
            "tensor": name, "layer": layer, "module": module, "numel": st.numel,
            "norm_a": math.sqrt(st.sq_a), "norm_b": math.sqrt(st.sq_b), "cosine": cosine(st.dot, st.sq_a, st.sq_b),
            "sq_norm_a": st.sq_a, "sq_norm_b": st.sq_b, "dot": st.dot, "nonfinite": st.nonfinite, "note": note}


def aggregate_task_vectors(tv: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, module) and per layer (`module=all`) norms and cosine from the fp64 per-tensor sums."""
    g = group_layers(tv, ["base", "checkpoint_a", "checkpoint_b", "mode"], ["numel", "sq_norm_a", "sq_norm_b", "dot"])
    g["numel"] = g["numel"].astype("int64")
    g["norm_a"], g["norm_b"] = g["sq_norm_a"].map(math.sqrt), g["sq_norm_b"].map(math.sqrt)
    g["cosine"] = [cosine(d, a, b) for d, a, b in zip(g["dot"], g["sq_norm_a"], g["sq_norm_b"])]
    return g[["base", "checkpoint_a", "checkpoint_b", "mode", "layer", "module", "n_tensors", "numel", "norm_a",
              "norm_b", "cosine", "dot"]]
