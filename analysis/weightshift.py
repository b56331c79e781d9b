"""Where did the weights move: per-tensor and per-layer change between a checkpoint and its descendants.

>>> from vlsafe.analysis.weightshift import diff_checkpoints, aggregate_layers
>>> tensors = diff_checkpoints("llm_dir", ["lvlm_dir"], spectral=True)   # one row per tensor (+ unpaired)
>>> layers = aggregate_layers(tensors)                                    # (layer, module) and module=all

Per paired tensor (W₀ in PRE, W₁ in POST, compared on shared rows): `rel_frobenius` ‖W₁−W₀‖/‖W₀‖,
`cosine` ⟨W₀,W₁⟩/(‖W₀‖‖W₁‖), `max_abs` max|Δ|, `frac_changed` share of entries with |Δ| > atol + rtol·|W₀|,
and the raw fp64 sums (`sq_norm_a` ‖W₀‖², `sq_norm_b`, `sq_norm_delta`, `dot_ab`) that layer aggregates
are built from. Entries that are NaN/Inf on either side are counted in `nonfinite` and left out of the
metrics. All statistics of a piece come from one fused pass (`vlsafe.analysis.kernels.pair_sums`: every element
upcast to fp64, differences, tolerance test and sums in fp64); tensors stream in chunks (see
`vlsafe.analysis.streaming`), so memory stays at a few chunks even for 7B checkpoints.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from vlsafe.analysis.checkpoints import Checkpoint, open_checkpoint
from vlsafe.analysis.kernels import pair_sums, piece_sums, warm_up
from vlsafe.analysis.layergroups import cosine, group_layers
from vlsafe.analysis.names import layer_module
from vlsafe.analysis.pairing import Pairing, checkpoint_labels, pair_checkpoints
from vlsafe.analysis.spectral import EXACT_MAX_NUMEL, left_singular, spectrum
from vlsafe.analysis.streaming import DEFAULT_CHUNK_ELEMS, Job, open_readers, stream_rows

CheckpointLike = Checkpoint | str | os.PathLike
RTOL, ATOL = 1e-3, 1e-8
SPECTRAL_COLUMNS = ("stable_rank", "effective_rank", "top_sigma", "subspace_overlap", "spectral_method",
                    "spectral_error")


@dataclass
class PairStats:
    """fp64 running sums for one tensor pair, fed chunk by chunk.

    ⟨a,b⟩ is recovered as (‖a‖² + ‖b‖² − ‖a−b‖²)/2 from fp64 sums: its absolute error is ~1e-16·(‖a‖² + ‖b‖²),
    so the cosine is exact to ~1e-16 while one pass over the data is saved.
    """

    numel: int = 0
    sq_a: float = 0.0
    sq_b: float = 0.0
    sq_d: float = 0.0
    changed: int = 0
    max_abs: float = 0.0
    nonfinite: int = 0

    @property
    def dot(self) -> float:
        return (self.sq_a + self.sq_b - self.sq_d) / 2

    def update(self, a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL, atol: float = ATOL) -> None:
        """Add one chunk pair (same shape, any float dtype); entries non-finite on either side are left out."""
        a, b = a.reshape(-1), b.reshape(-1)
        if not a.numel():
            return
        s, left_out = piece_sums(lambda x, y: pair_sums(x, y, rtol, atol), a, b)
        sums = s[:, :4].sum(0).tolist()
        self.numel += a.numel()
        self.nonfinite += left_out
        self.sq_a, self.sq_b, self.sq_d = self.sq_a + sums[0], self.sq_b + sums[1], self.sq_d + sums[2]
        self.changed += int(sums[3])
        self.max_abs = max(self.max_abs, float(s[:, 4].max()))

    def metrics(self) -> dict[str, Any]:
        """rel_frobenius, cosine, max_abs, frac_changed, nonfinite and the raw fp64 sums."""
        return {"rel_frobenius": _ratio(math.sqrt(self.sq_d), math.sqrt(self.sq_a)),
                "cosine": cosine(self.dot, self.sq_a, self.sq_b), "max_abs": self.max_abs,
                "frac_changed": self.changed / self.numel if self.numel else math.nan, "nonfinite": self.nonfinite,
                "sq_norm_a": self.sq_a, "sq_norm_b": self.sq_b, "sq_norm_delta": self.sq_d, "dot_ab": self.dot}


def _ratio(num: float, den: float) -> float:
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _as_checkpoint(c: CheckpointLike) -> Checkpoint:
    return c if isinstance(c, Checkpoint) else open_checkpoint(c)


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _base_row(name: str, la: str, lb: str, shape: Sequence[int], status: str, note: str = "") -> dict[str, Any]:
    layer, module = layer_module(name)
    numel = math.prod(int(s) for s in shape)
    return {"checkpoint_a": la, "checkpoint_b": lb, "tensor": name, "layer": layer, "module": module,
            "shape": _shape_str(shape), "numel": numel, "status": status, "note": note}


def _unpaired_rows(pre: Checkpoint, posts: Sequence[Checkpoint], pairings: Sequence[Pairing]) -> list[dict]:
    rows: list[dict] = []
    for post, p in zip(posts, pairings):
        for n in p.only_a:
            rows.append(_base_row(n, p.label_a, p.label_b, pre.infos[n].shape, "only_in_a"))
        for n in p.only_b:
            rows.append(_base_row(n, p.label_a, p.label_b, post.infos[n].shape, "only_in_b"))
        for n, note in p.mismatched.items():
            rows.append(_base_row(n, p.label_a, p.label_b, pre.infos[n].shape, "shape_mismatch", note))
    return rows


class _Spectra:
    """Per-tensor spectral state: W₀'s top-k left singular vectors are computed once for all POSTs."""

    def __init__(self, top_k: int, exact_max_numel: int):
        self.top_k, self.exact_max_numel = top_k, exact_max_numel
        self._u0: torch.Tensor | None = None

    def reset(self) -> None:
        self._u0 = None

    def row(self, w0: torch.Tensor, w1: torch.Tensor, stats: PairStats) -> dict[str, Any]:
        if w0.ndim != 2:
            return {}
        if stats.nonfinite:
            return {"spectral_method": "skipped (non-finite entries)"}
        delta = w1.float() - w0.float()
        u0 = None
        if bool(delta.any()):
            if self._u0 is None or self._u0.shape[0] != w0.shape[0]:
                k = min(self.top_k, *w0.shape)
                _, self._u0, _, _ = left_singular(w0.float(), k, exact_max_numel=self.exact_max_numel)
            u0 = self._u0
        sp = spectrum(delta, u0=u0, top_k=self.top_k, fro_sq=stats.sq_d, exact_max_numel=self.exact_max_numel)
        return {"stable_rank": sp.stable_rank, "effective_rank": sp.effective_rank, "top_sigma": sp.top_sigma,
                "subspace_overlap": sp.subspace_overlap, "spectral_method": sp.method,
                "spectral_error": sp.error_bound}


def _jobs(pre: Checkpoint, pairings: Sequence[Pairing], spectral: bool) -> list[Job]:
    jobs = []
    for name in pre.names():
        rows = [p.rows.get(name, 0) for p in pairings]
        if any(rows):
            whole = spectral and len(pre.infos[name].shape) == 2
            jobs.append(Job(name, (max(rows), *rows), whole))
    return jobs


def diff_checkpoints(pre: CheckpointLike, posts: Sequence[CheckpointLike] | CheckpointLike, *,
                     labels: Sequence[str] | None = None, spectral: bool = False, top_k: int = 8,
                     allow_mismatch: bool = False, rtol: float = RTOL, atol: float = ATOL,
                     exact_max_numel: int = EXACT_MAX_NUMEL, chunk_elems: int = DEFAULT_CHUNK_ELEMS,
                     prefetch: bool = True, progress: bool = True) -> pd.DataFrame:
    """Compare PRE with each POST tensor by tensor, streaming; one row per (POST, tensor).

    Rows carry `status` = `paired`, `only_in_a` (PRE only), `only_in_b` (POST only) or `shape_mismatch`
    (with `allow_mismatch`). `labels` names PRE and the POSTs (default: directory/file names). With
    `spectral`, 2-D tensors also get the columns of `vlsafe.analysis.spectral.spectrum` (top-k σ as a string).
    """
    warm_up()
    pre = _as_checkpoint(pre)
    posts = [_as_checkpoint(p) for p in ([posts] if isinstance(posts, (str, os.PathLike, Checkpoint)) else posts)]
    labels = list(labels) if labels else checkpoint_labels([pre.spec, *(p.spec for p in posts)])
    pairings = [pair_checkpoints(pre, p, label_a=labels[0], label_b=lb, allow_mismatch=allow_mismatch)
                for p, lb in zip(posts, labels[1:])]
    readers = open_readers([pre, *posts])
    jobs = _jobs(pre, pairings, spectral)
    spectra = _Spectra(top_k, exact_max_numel) if spectral else None
    rows: list[dict[str, Any]] = []
    stats = [PairStats() for _ in posts]
    bar = tqdm(total=sum(pre.infos[j.name].numel for j in jobs), unit="el", unit_scale=True,
               desc=f"diff {labels[0]}", disable=not progress)
    try:
        for name, start, stop, (w0, *w1s), last in stream_rows(readers, jobs, chunk_elems, prefetch):
            for k, w1 in enumerate(w1s):
                if w1 is not None:
                    stats[k].update(w0[: w1.shape[0]] if w1.ndim else w0, w1, rtol, atol)
            bar.update(w0.numel())
            if last:
                rows += _finish(name, pre, pairings, stats, spectra, w0, w1s)
                stats = [PairStats() for _ in posts]
    finally:
        bar.close()
        for r in readers:
            r.close()
    rows += _unpaired_rows(pre, posts, pairings)
    return _frame(rows, spectral)


def _finish(name: str, pre: Checkpoint, pairings: Sequence[Pairing], stats: Sequence[PairStats],
            spectra: _Spectra | None, w0: torch.Tensor, w1s: Sequence[torch.Tensor | None]) -> list[dict]:
    out = []
    if spectra is not None:
        spectra.reset()
    for p, st, w1 in zip(pairings, stats, w1s):
        if name not in p.rows:
            continue
        shape = (p.rows[name], *pre.infos[name].shape[1:]) if pre.infos[name].shape else ()
        row = _base_row(name, p.label_a, p.label_b, shape, "paired", p.notes.get(name, ""))
        row.update(st.metrics())
        if st.nonfinite:
            row["note"] = "; ".join(x for x in (row["note"], f"{st.nonfinite} non-finite entries excluded") if x)
        if spectra is not None and w1 is not None and w0.ndim == 2 and w0.shape[0] >= w1.shape[0]:
            row.update(spectra.row(w0[: w1.shape[0]], w1, st))
        out.append(row)
    return out


_COLUMNS = ("checkpoint_a", "checkpoint_b", "tensor", "layer", "module", "shape", "numel", "status",
            "rel_frobenius", "cosine", "max_abs", "frac_changed", "nonfinite", "sq_norm_a", "sq_norm_b",
            "sq_norm_delta", "dot_ab", "note")


def _frame(rows: list[dict[str, Any]], spectral: bool) -> pd.DataFrame:
    cols = list(_COLUMNS) + (list(SPECTRAL_COLUMNS) if spectral else [])
    df = pd.DataFrame(rows, columns=cols)
    df["layer"] = df["layer"].astype("Int64")
    df["nonfinite"] = df["nonfinite"].astype("Int64")
    return df


def aggregate_layers(tensors: pd.DataFrame) -> pd.DataFrame:
    """Per (POST, layer, module) and per (POST, layer) with `module=all`, from the fp64 sums.

    rel_frobenius = √(Σ‖ΔW‖² / Σ‖W₀‖²), cosine = Σ⟨W₀,W₁⟩ / √(Σ‖W₀‖² Σ‖W₁‖²) over the group's tensors —
    a numel-weighted aggregate, not a mean of ratios. Embedding, final norm and head rows have no layer.
    """
    paired = tensors[tensors["status"] == "paired"]
    paired = paired.assign(changed=paired["frac_changed"] * paired["numel"],
                           nonfinite=paired["nonfinite"].astype("int64"))
    g = group_layers(paired, ["checkpoint_a", "checkpoint_b"],
                     ["numel", "sq_norm_a", "sq_norm_b", "sq_norm_delta", "dot_ab", "changed", "nonfinite"],
                     ["max_abs"])
    g["numel"] = g["numel"].astype("int64")
    g["rel_frobenius"] = [_ratio(math.sqrt(d), math.sqrt(a)) for d, a in zip(g["sq_norm_delta"], g["sq_norm_a"])]
    g["cosine"] = [cosine(d, a, b) for d, a, b in zip(g["dot_ab"], g["sq_norm_a"], g["sq_norm_b"])]
    g["frac_changed"] = [c / n if n else math.nan for c, n in zip(g["changed"], g["numel"])]
    return g[["checkpoint_a", "checkpoint_b", "layer", "module", "n_tensors", "numel", "rel_frobenius", "cosine",
              "max_abs", "frac_changed", "nonfinite", "sq_norm_a", "sq_norm_delta"]]


def unpaired(tensors: pd.DataFrame) -> pd.DataFrame:
    """The rows of tensors present on one side only (or mismatched), e.g. a LLaVA's vision tower."""
    return tensors[tensors["status"] != "paired"].reset_index(drop=True)
