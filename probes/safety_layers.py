"""Safety-layer analysis after Li et al. (arXiv 2408.17003; `docs/methods.md`, "Safety layers").

**Cosine curves.** Last-token hidden state leaving each block (`resid_post`, no embedding, before the final
norm); cosine over `pairs` random normal–normal (N-N), malicious–malicious (M-M) and normal–malicious (N-M)
pairs, once per seed (10, 100, 1000). Per layer and pair kind: `cosine_mean` and `cosine_std` over all pairs of
all seeds, and `seed_std`, the spread of the per-seed means. N-N and M-M stay high while N-M splits off at the
"safety layers".

**Onset.** `onset_layer` = the first layer where the N-M curve lies more than `margin` (absolute cosine,
default 0.05) below *both* within-class curves: `gap_ℓ = min(NN_ℓ, MM_ℓ) − NM_ℓ > margin`.

**Over-rejection scaling.** `scale_layers(model, s, e, α)` multiplies q, k, v, o, gate, up, down of layers
[s, e) by α and restores them bit-exactly on exit; `over_rejection_scan` generates 16 greedy tokens per benign
prompt per (window, α) and counts refusals with a judge (a callable `str -> bool`; default: case-insensitive
substring match on refusal_direction's 12 prefixes, list id `substring-rd`).
The window whose up-scaling raises refusals most is the candidate safety range.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes import models as M
from vlsafe.probes import templates as T

SEEDS = (10, 100, 1000)
PAIR_KINDS = ("N-N", "M-M", "N-M")
# what each pair kind compares (N = normal, i.e. harmless; M = malicious, i.e. harmful)
PAIR_NAMES = {"N-N": "harmless–harmless", "M-M": "harmful–harmful", "N-M": "harmless–harmful"}
SCALED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _default_substrings() -> tuple[str, ...]:
    """refusal_direction's 12 JailbreakBench prefixes (list id `substring-rd`), matched case-insensitively."""
    from vlsafe.probes.behavior.judge_substring import RD_PREFIXES

    return tuple(s.lower() for s in RD_PREFIXES)


# ---- cosine curves ---------------------------------------------------------------------------------------------

def last_token_states(lm: Any, prompts: Sequence[str], *, layers: Sequence[int] | None = None, images: Any = None,
                      batch_size: int = 8, backend: str = "hooks", progress: bool = False) -> torch.Tensor:
    """`[n, L, d]` fp32 last-token `resid_post` per layer (what `cosine_curves` takes)."""
    from vlsafe.probes.capture import capture

    acts = capture(lm, list(prompts), hooks=("resid_post",), layers=layers, positions="last", images=images,
                   batch_size=batch_size, backend=backend, progress=progress)
    return acts.stack("resid_post")[:, :, 0]


def _states(x: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(x).to(torch.float64)
    if t.dim() == 4 and t.shape[2] == 1:   # [n, L, 1, d]: one position
        t = t[:, :, 0]
    if t.dim() != 3:
        raise VlsafeError(f"safety-layer curves: {what} states must be [n, L, d], got shape {tuple(t.shape)}")
    if t.shape[0] < 2:
        raise VlsafeError(f"safety-layer curves: need at least 2 {what} prompts, got {t.shape[0]}")
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def _pairs(rng: np.random.Generator, n_a: int, n_b: int | None, r: int) -> tuple[np.ndarray, np.ndarray]:
    """`r` random index pairs: within one set (i ≠ j) when `n_b` is None, else across two sets."""
    i = rng.integers(0, n_a, r)
    if n_b is None:
        return i, (i + rng.integers(1, n_a, r)) % n_a
    return i, rng.integers(0, n_b, r)


def cosine_curves(normal: Any, malicious: Any, *, pairs: int = 500, seeds: Sequence[int] = SEEDS,
                  layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Tidy per-layer curves `layer, pair, cosine_mean, cosine_std, seed_std, n_pairs` from `[n, L, d]` states."""
    a, b = _states(normal, "normal"), _states(malicious, "malicious")
    if a.shape[1:] != b.shape[1:]:
        raise VlsafeError(f"safety-layer curves: normal states {tuple(a.shape[1:])} and malicious "
                          f"{tuple(b.shape[1:])} differ in layers × hidden size")
    lays = list(range(a.shape[1])) if layers is None else list(layers)
    if len(lays) != a.shape[1]:
        raise VlsafeError(f"safety-layer curves: {len(lays)} layer labels for {a.shape[1]} layers")
    per_seed: dict[str, list[torch.Tensor]] = {k: [] for k in PAIR_KINDS}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        for kind, (x, y, cross) in zip(PAIR_KINDS, ((a, a, False), (b, b, False), (a, b, True))):
            i, j = _pairs(rng, x.shape[0], y.shape[0] if cross else None, pairs)
            per_seed[kind].append((x[i] * y[j]).sum(-1))          # [r, L]
    rows = []
    for kind, chunks in per_seed.items():
        allc = torch.cat(chunks)                                    # [r * seeds, L]
        seed_means = torch.stack([c.mean(0) for c in chunks])       # [seeds, L]
        for li, layer in enumerate(lays):
            rows.append({"layer": layer, "pair": kind, "cosine_mean": float(allc[:, li].mean()),
                         "cosine_std": float(allc[:, li].std()) if allc.shape[0] > 1 else 0.0,
                         "seed_std": float(seed_means[:, li].std()) if len(chunks) > 1 else 0.0,
                         "n_pairs": int(allc.shape[0])})
    return pd.DataFrame(rows)


def separation_gap(curves: pd.DataFrame) -> pd.Series:
    """`min(NN, MM) − NM` per layer (index = layer)."""
    wide = curves.pivot(index="layer", columns="pair", values="cosine_mean")
    missing = [k for k in PAIR_KINDS if k not in wide]
    if missing:
        raise VlsafeError(f"safety-layer curves: missing pair kinds {missing}")
    return wide[["N-N", "M-M"]].min(axis=1) - wide["N-M"]


def onset_layer(curves: pd.DataFrame, *, margin: float = 0.05) -> int | None:
    """First layer where N-M lies more than `margin` below both N-N and M-M (None if it never does)."""
    gap = separation_gap(curves)
    over = gap[gap > margin]
    return int(over.index[0]) if len(over) else None


# ---- over-rejection scaling ------------------------------------------------------------------------------------

def _scaled_linears(block: torch.nn.Module) -> list[torch.nn.Module]:
    found = [m for n, m in block.named_modules() if n.split(".")[-1] in SCALED and hasattr(m, "weight")]
    if not found:
        raise VlsafeError(f"{type(block).__name__}: no q/k/v/o/gate/up/down projections to scale")
    return found


@contextlib.contextmanager
def scale_layers(model: Any, start: int, end: int, alpha: float) -> Iterator[None]:
    """Multiply the q, k, v, o, gate, up, down weights of layers [start, end) by `alpha`; restore exactly on exit."""
    blocks = M.decoder_layers(model)
    if not 0 <= start < end <= len(blocks):
        raise VlsafeError(f"layer window [{start}, {end}) out of range for a {len(blocks)}-layer model")
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for block in list(blocks)[start:end]:
                for lin in _scaled_linears(block):
                    saved.append((lin.weight, lin.weight.detach().clone()))
                    lin.weight.mul_(alpha)
        yield
    finally:
        with torch.no_grad():
            for param, original in saved:
                param.copy_(original)


def substring_judge(text: str, *, substrings: Sequence[str] | None = None) -> bool:
    """True when `text` contains one of the refusal substrings (case-insensitive; default list `substring-rd`)."""
    low = text.lower()
    return any(s.lower() in low for s in (substrings or _default_substrings()))


@torch.no_grad()
def greedy_continuations(lm: Any, prompts: Sequence[str], *, max_new_tokens: int = 16, images: Any = None,
                         batch_size: int = 8) -> list[str]:
    """Greedy continuations (new tokens only, decoded) of chat-formatted prompts, left-padded batches."""
    tok = getattr(lm.tokenizer, "tokenizer", None) or lm.tokenizer
    from vlsafe.analysis.placement import input_device

    device = input_device(lm.model)
    out: list[str] = []
    for batch in T.batches(lm, list(prompts), images, batch_size=batch_size):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                  for k, v in batch.model_inputs(position_ids=False).items()}
        gen = lm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(gen[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    return out


def sliding_windows(num_layers: int, width: int, *, stride: int = 1) -> list[tuple[int, int]]:
    """All windows [s, s + width) inside `num_layers` layers, every `stride` layers."""
    if not 1 <= width <= num_layers:
        raise VlsafeError(f"window width {width} out of range for a {num_layers}-layer model")
    return [(s, s + width) for s in range(0, num_layers - width + 1, stride)]


def over_rejection_scan(lm: Any, prompts: Sequence[str], windows: Sequence[tuple[int, int]], *,
                        alphas: Sequence[float] = (1.1,), judge: Callable[[str], bool] | None = None,
                        max_new_tokens: int = 16, batch_size: int = 8, progress: bool = True) -> pd.DataFrame:
    """Refusal rate on benign `prompts` with each window scaled by each α, plus an unscaled baseline row.

    Columns `start, end, alpha, n, refusals, refusal_rate, delta` (delta = rate − baseline rate).
    Li et al. used α = 1.1 (and 5, 15 in ablations) and the 721-prompt over-rejection set.
    """
    prompts = list(prompts)
    if not prompts:
        raise VlsafeError("over-rejection scan: empty prompt set")
    judge = judge or substring_judge
    rate = lambda: sum(bool(judge(t)) for t in greedy_continuations(  # noqa: E731
        lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size))
    base = rate()
    rows = [{"start": None, "end": None, "alpha": 1.0, "refusals": base}]
    for (s, e), a in tqdm([(w, a) for w in windows for a in alphas], desc="over-rejection scan",
                          disable=not progress, leave=False):
        with scale_layers(lm.model, s, e, a):
            rows.append({"start": s, "end": e, "alpha": float(a), "refusals": rate()})
    df = pd.DataFrame(rows)
    df["n"] = len(prompts)
    df["refusal_rate"] = df["refusals"] / len(prompts)
    df["delta"] = df["refusal_rate"] - base / len(prompts)
    return df[["start", "end", "alpha", "n", "refusals", "refusal_rate", "delta"]]
