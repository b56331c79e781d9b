"""Activation patching between two checkpoints: which layer and component carries a change in refusal.

Method (causal tracing between checkpoints): run a *base* model on a prompt and replace,
at one site (layer ℓ, component), its activation at the prompt's text positions with a *donor* model's activation
on the same tokens; score = the refusal log-odds of `vlsafe.probes.scores` (`first_token` or `opening`). The
recovered fraction of a prompt is `(m_patched − m_base) / (m_donor − m_base)`.

- direction `restore` (denoising): base = target (e.g. the LVLM), donor = source (the aligned LLM) — what restores;
- direction `break` (noising): base = source, donor = target — what breaks.

Components: `resid` = the block's input (residual stream entering block ℓ), `attn_out` = the attention output
(after its output projection), `mlp_out` = the MLP output; modules come from the family adapter.

Positions: the two models' prompts are aligned **by their text tokens**: image placeholder tokens are removed and
the remaining token ids are matched (`difflib` longest matching blocks); only matched positions are patched. For
an LVLM with an image against its LLM this patches every text position and no image position.

Cost per batch: one clean forward per model (it scores and records every site at once), then one patched
forward per (site, direction). A patched forward at layer ℓ resumes from block ℓ with the clean forward's earlier
states (`vlsafe.probes.replay`: on average half the blocks, no embedding or vision tower), after a per-batch check
that resuming reproduces the clean logits; the `opening` score, or a failed check, runs full forwards.

>>> res = patch(source_lm, target_lm, prompts, images=None, layers=None)
>>> res.table()        # layer, component, direction, image, recovered, ci_low, ci_high, n, ...
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes import models as M
from vlsafe.probes import scores as S
from vlsafe.probes import templates as T
from vlsafe.probes.interventions import edit_first, edit_input, first_tensor, removing_hooks
from vlsafe.probes.replay import Recording

COMPONENTS = ("resid", "attn_out", "mlp_out")
DIRECTIONS = ("restore", "break")
METHODS = ("exact", "attribution")  # patched forwards, or first-order estimates (vlsafe.probes.attribution)
POSITIONS_NOTE = "text positions matched by token id (image tokens never patched)"
Site = tuple[int, str]

__all__ = ["COMPONENTS", "DIRECTIONS", "METHODS", "Alignment", "PatchResult", "align_text_positions", "patch",
           "recovery", "site_module", "site_hook", "image_token_ids"]


@dataclass
class Alignment:
    """Matched text positions of a base batch and a donor batch: `base[i] ↔ donor[i]` in row `rows[i]`."""

    rows: torch.Tensor
    base: torch.Tensor
    donor: torch.Tensor
    unmatched: list[int]  # per row: text tokens of the base with no partner in the donor


def image_token_ids(lm: Any) -> set[int]:
    """Token ids that stand for image content in `lm`'s inputs (empty for a text-only model)."""
    cfg = getattr(lm.model, "config", None)
    ids = {getattr(cfg, k, None) for k in ("image_token_id", "image_token_index")}
    if M.is_lvlm(lm):
        tok = T.tokenizer_of(lm.processor)
        got = tok.convert_tokens_to_ids(T.image_token(lm.processor))
        ids.add(got if got != getattr(tok, "unk_token_id", None) else None)
    return {int(i) for i in ids if isinstance(i, int)}


def align_text_positions(base: T.Batch, donor: T.Batch, *, base_skip: set[int] = frozenset(),
                         donor_skip: set[int] = frozenset()) -> Alignment:
    """Match each row's non-pad tokens of `base` and `donor` (ids in `*_skip`, the image tokens, never match)."""
    if len(base) != len(donor):
        raise VlsafeError(f"alignment: {len(base)} base rows but {len(donor)} donor rows")
    rows, bpos, dpos, unmatched = [], [], [], []
    for r in range(len(base)):
        bi = [(j, int(t)) for j, (t, m) in enumerate(zip(base.input_ids[r], base.attention_mask[r]))
              if m and int(t) not in base_skip]
        di = [(j, int(t)) for j, (t, m) in enumerate(zip(donor.input_ids[r], donor.attention_mask[r]))
              if m and int(t) not in donor_skip]
        sm = difflib.SequenceMatcher(None, [t for _, t in bi], [t for _, t in di], autojunk=False)
        n = 0
        for a, b, size in sm.get_matching_blocks():
            for k in range(size):
                rows.append(r)
                bpos.append(bi[a + k][0])
                dpos.append(di[b + k][0])
            n += size
        unmatched.append(len(bi) - n)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Alignment(as_long(rows), as_long(bpos), as_long(dpos), unmatched)


def site_module(lm: Any, layer: int, component: str) -> torch.nn.Module:
    """The module whose input (`resid`) or output (`attn_out`, `mlp_out`) is the site, from the family adapter."""
    block = M.block(lm.model, layer)
    if component == "resid":
        return block.module
    if component == "attn_out":
        return block.attn
    if component == "mlp_out":
        return block.mlp
    raise VlsafeError(f"unknown patching component {component!r} (expected one of {', '.join(COMPONENTS)})")


@contextlib.contextmanager
def site_hook(lm: Any, site: Site, fn: Any) -> Iterator[None]:
    """Call `fn(h) -> h | None` on the site's tensor during the *first* forward only (later calls of the same
    scoring, the cached continuations of the `opening` score, pass through)."""
    layer, comp = site
    mod, fired = site_module(lm, layer, comp), [False]

    def once(h: torch.Tensor) -> torch.Tensor | None:
        if fired[0]:
            return None
        fired[0] = True
        return fn(h)

    if comp == "resid":
        def pre(module: Any, args: tuple, kwargs: dict) -> Any:
            new = once(args[0] if args else kwargs["hidden_states"])
            return None if new is None else edit_input(args, kwargs, lambda _: new)
        handle = mod.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(module: Any, args: Any, output: Any) -> Any:
            new = once(first_tensor(output))
            return None if new is None else edit_first(output, lambda _: new)
        handle = mod.register_forward_hook(post)
    with removing_hooks([handle]):
        yield


@dataclass
class _Side:
    """One model in one batch: its encoded inputs, score targets and the positions it shares with the other."""

    lm: Any
    batch: T.Batch
    targets: Any
    pos: torch.Tensor
    rows: torch.Tensor


def _clean(side: _Side, sites: list[Site], kind: str, *,
           resume: bool) -> tuple[torch.Tensor, dict[Site, torch.Tensor], Recording | None]:
    """One clean forward: (scores `[n]`, every site's activation at the shared positions `[M, d]`, the recording
    patched forwards resume from — None for the `opening` score or when replay does not reproduce the logits)."""
    got: dict[Site, torch.Tensor] = {}
    rec = Recording(side.lm, sorted({l for l, _ in sites})) if resume and kind == "first_token" else None
    with contextlib.ExitStack() as stack:
        for site in sites:
            def keep(h: torch.Tensor, site: Site = site) -> None:
                got[site] = h[side.rows.to(h.device), side.pos.to(h.device)].detach().clone()
            stack.enter_context(site_hook(side.lm, site, keep))
        if rec is not None:
            stack.enter_context(rec)
        score, last = S.score_batch(side.lm.model, side.batch, kind=kind, targets=side.targets)
    if rec is not None and not rec.check(last):
        rec = None
    return score, got, rec


def _patched(side: _Side, site: Site, values: torch.Tensor, kind: str, rec: Recording | None) -> torch.Tensor:
    """Scores of `side` with `values` written at its shared positions of `site`: resumed from the site's block
    when `rec` is given (the blocks before it are the clean forward's), else a full forward."""
    def put(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[side.rows.to(h.device), side.pos.to(h.device)] = values.to(h.device, h.dtype)
        return h

    layer, comp = site
    if rec is not None:
        if comp == "resid":
            last = rec.resume(layer, put(rec.inputs[layer]))
        else:
            last = rec.resume(layer, rec.inputs[layer], hooks={site_module(side.lm, layer, comp): put})
        return S.first_token_score(last, side.targets)
    with site_hook(side.lm, site, put):
        return S.score_batch(side.lm.model, side.batch, kind=kind, targets=side.targets)[0]


@dataclass
class PatchResult:
    """Per-prompt scores: `scores[label]` clean `[n]`; `patched[(direction, layer, component)]` `[n]`."""

    scores: dict[str, np.ndarray]
    patched: dict[tuple[str, int, str], np.ndarray]
    unmatched: np.ndarray
    image: str = "none"
    notes: list[str] = field(default_factory=list)
    method: str = "exact"

    def table(self, *, min_gap: float = 0.1, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """`patching.csv` rows: layer, component, direction, image, recovered (mean of per-prompt fractions),
        ci_low, ci_high (bootstrap over prompts), n (prompts kept), recovered_ratio (ratio of means),
        n_dropped, positions, note, method (`exact` or `attribution`)."""
        rows = []
        for (direction, layer, comp), m in self.patched.items():
            base, donor = ("target", "source") if direction == "restore" else ("source", "target")
            r = recovery(self.scores[base], self.scores[donor], m, min_gap=min_gap, n_boot=n_boot, seed=seed)
            rows.append({"layer": layer, "component": comp, "direction": direction, "image": self.image, **r,
                         "positions": POSITIONS_NOTE, "method": self.method})
        cols = ["layer", "component", "direction", "image", "recovered", "ci_low", "ci_high", "n",
                "recovered_ratio", "n_dropped", "positions", "note", "method"]
        return pd.DataFrame(rows, columns=cols)


def recovery(m_base: np.ndarray, m_donor: np.ndarray, m_patched: np.ndarray, *, min_gap: float = 0.1,
             n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Recovered fraction `(m_patched − m_base)/(m_donor − m_base)`: mean over prompts with
    `|m_donor − m_base| ≥ min_gap` (the rest dropped and counted), its bootstrap 95 % interval over prompts and the
    ratio of means. With no prompt left the recovery is undefined: NaN and a `note`."""
    b, d, p = (np.asarray(x, dtype=np.float64) for x in (m_base, m_donor, m_patched))
    gap = d - b
    keep = np.abs(gap) >= min_gap
    n, dropped = int(keep.sum()), int((~keep).sum())
    if n == 0:
        note = (f"undefined: all {dropped} prompts have |m_donor - m_base| < {min_gap} "
                f"(max gap {np.abs(gap).max() if gap.size else float('nan'):.3g}); the two models score alike")
        return {"recovered": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0,
                "recovered_ratio": float("nan"), "n_dropped": dropped, "note": note}
    frac = (p[keep] - b[keep]) / gap[keep]
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = frac[idx].mean(1)
    note = f"{dropped} prompts dropped (|m_donor - m_base| < {min_gap})" if dropped else ""
    return {"recovered": float(frac.mean()), "ci_low": float(np.quantile(boot, 0.025)),
            "ci_high": float(np.quantile(boot, 0.975)), "n": n,
            "recovered_ratio": float((p[keep] - b[keep]).mean() / gap[keep].mean()), "n_dropped": dropped,
            "note": note}


def _sites(lm: Any, layers: Sequence[int] | None, components: Sequence[str]) -> list[Site]:
    n_layers = M.num_layers(lm.model)
    layers = list(range(n_layers)) if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad or not layers:
        raise VlsafeError(f"patching layers {bad or '[]'} out of range (valid layers: 0..{n_layers - 1})")
    for c in components:
        if c not in COMPONENTS:
            raise VlsafeError(f"unknown patching component {c!r} (expected one of {', '.join(COMPONENTS)})")
    if not components:
        raise VlsafeError("no patching components given")
    cross = sorted(set(layers) & set(M.adapter(lm.model).cross_attention_layers()))
    if cross:  # a text-only forward skips these blocks, so no activation exists to patch there
        raise VlsafeError(f"patching: layers {cross} are cross-attention blocks (skipped without an image); "
                          "leave them out with --layers")
    return [(l, c) for l in layers for c in components]


def check_method(method: str, kind: str) -> None:
    """One-line errors for a patching method that does not exist or does not support the refusal score `kind`."""
    if method not in METHODS:
        raise VlsafeError(f"unknown patching method {method!r} (expected one of {', '.join(METHODS)})")
    if method == "attribution" and kind != "first_token":
        raise VlsafeError(f"attribution patching needs the first_token score (got {kind!r})")


def check_pair(source: Any, target: Any) -> None:
    """One-line errors for a source/target pair that cannot be patched (layers, hidden size, text model type)."""
    def desc(lm: Any) -> tuple[Any, ...]:
        cfg = lm.model.config.get_text_config()
        return getattr(cfg, "model_type", None), M.num_layers(lm.model), M.hidden_size(lm.model)

    (ts, ls, hs), (tt, lt, ht) = desc(source), desc(target)
    name = lambda lm: getattr(getattr(lm, "checkpoint", None), "spec", type(lm.model).__name__)  # noqa: E731
    if ts != tt:
        raise VlsafeError(f"{name(source)} ({ts}) and {name(target)} ({tt}): different language-model families")
    if (ls, hs) != (lt, ht):
        raise VlsafeError(f"{name(source)} ({ls} layers, hidden {hs}) and {name(target)} ({lt} layers, hidden {ht}): "
                          "patching needs the same layers and hidden size")


def patch(source: Any, target: Any, prompts: Sequence[str], *, images: Sequence[Any] | None = None,
          image: str = "none", layers: Sequence[int] | None = None, components: Sequence[str] = COMPONENTS,
          directions: Sequence[str] = DIRECTIONS, kind: str = "first_token", openings: Sequence[str] | None = None,
          batch_size: int = 8, progress: bool = False, resume: bool = True, method: str = "exact",
          precision: str = "fp32") -> PatchResult:
    """Patch every (layer, component) in both `directions` over `prompts`; see the module docstring.

    `images` (one PIL image per prompt) go to each model that takes images; `image` labels the condition;
    `progress` shows a bar over the patched forwards; `resume=False` runs every patched forward from the input
    instead of from the patched block (same numbers, about twice the time; see `vlsafe.probes.replay`).
    `method="attribution"` estimates every site from one backward pass per direction instead of patching it
    (first-order, a screen: `vlsafe.probes.attribution`); `first_token` score only. `precision` is the forward
    math of every forward (`vlsafe.analysis.placement.compute_precision`): `fp32`, `bf16` (autocast; about 2x
    faster on CPUs with native bf16; the scores move slightly, and with them which prompts pass a minimum gap:
    `docs/performance.md`) or `auto`."""
    from tqdm.auto import tqdm

    from vlsafe.analysis.placement import resolve_precision

    prompts = list(prompts)
    if not prompts:
        raise VlsafeError("patching: empty prompt set")
    for d in directions:
        if d not in DIRECTIONS:
            raise VlsafeError(f"unknown patching direction {d!r} (expected one of {', '.join(DIRECTIONS)})")
    check_method(method, kind)
    precision = resolve_precision(precision)
    check_pair(source, target)
    if images is not None and not (M.is_lvlm(source) or M.is_lvlm(target)):
        raise VlsafeError("patching: images given but neither checkpoint takes images")
    sites = _sites(target, layers, components)
    imgs = {lab: (images if images is not None and M.is_lvlm(lm) else None)
            for lab, lm in (("source", source), ("target", target))}
    fmt = {lab: lm.processor or lm.tokenizer for lab, lm in (("source", source), ("target", target))}
    targets = {lab: S.score_targets(fmt[lab], kind, openings) for lab in fmt}
    if list(targets["source"]) != list(targets["target"]):
        raise VlsafeError("patching: the two tokenizers give different refusal tokens; scores would not compare")
    scores: dict[str, list[torch.Tensor]] = {"source": [], "target": []}
    patched: dict[tuple[str, int, str], list[torch.Tensor]] = {}
    unmatched: list[int] = []
    full_batches = 0  # batches whose patched forwards could not resume (opening score, or the replay check failed)
    per_batch = len(directions) * (1 if method == "attribution" else len(sites))
    bar = tqdm(total=-(-len(prompts) // batch_size) * per_batch, unit="forward",
               desc=f"patching ({image})", disable=not progress, leave=False)
    with _forward_math((source, target), precision):
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s:s + batch_size]
            enc = {lab: T.encode(lm, chunk, None if imgs[lab] is None else list(imgs[lab])[s:s + batch_size])
                   for lab, lm in (("source", source), ("target", target))}
            al = align_text_positions(enc["target"], enc["source"], base_skip=image_token_ids(target),
                                      donor_skip=image_token_ids(source))
            unmatched += al.unmatched
            side = {"target": _Side(target, enc["target"], targets["target"], al.base, al.rows),
                    "source": _Side(source, enc["source"], targets["source"], al.donor, al.rows)}
            acts, recs = {}, {}
            for lab in side:
                sc, acts[lab], recs[lab] = _clean(side[lab], sites, kind, resume=resume and method == "exact")
                scores[lab].append(sc)
                full_batches += recs[lab] is None
            if method == "attribution":
                for d in directions:
                    base, donor = ("target", "source") if d == "restore" else ("source", "target")
                    for site, est in _estimated(side[base], sites, acts[base], acts[donor], len(chunk)).items():
                        patched.setdefault((d, *site), []).append(scores[base][-1] + est)
                    bar.update()
                continue
            for site in sites:
                for d in directions:
                    base, donor = ("target", "source") if d == "restore" else ("source", "target")
                    patched.setdefault((d, *site), []).append(_patched(side[base], site, acts[donor][site], kind,
                                                                             recs[base]))
                    bar.update()
    bar.close()
    cat = lambda xs: torch.cat(xs).numpy()  # noqa: E731
    notes = [f"positions: {POSITIONS_NOTE}"]
    if method == "attribution":
        notes.append("attribution patching: first-order estimates (one backward pass per direction), not patched "
                     "forwards; confirm the top sites with exact patching")
    elif resume and full_batches:
        notes.append(f"{full_batches} of {2 * len(scores['source'])} batch forwards ran patched forwards in full "
                     "(opening score, or resuming from the patched block did not reproduce the logits)")
    if precision != "fp32":
        notes.append(f"forward math: {precision} autocast (scores differ slightly from fp32)")
    if any(unmatched):
        notes.append(f"{sum(1 for u in unmatched if u)} prompts have text tokens without a partner (not patched)")
    return PatchResult({k: cat(v) for k, v in scores.items()}, {k: cat(v) for k, v in patched.items()},
                       np.asarray(unmatched), image, notes, method)


@contextlib.contextmanager
def _forward_math(lms: Sequence[Any], precision: str) -> Iterator[None]:
    """Every forward of `lms` at `precision` (bf16: autocast with bf16 copies of the linear weights, restored on
    exit; `vlsafe.analysis.placement`)."""
    from vlsafe.analysis.placement import bf16_linear_weights, compute_precision, input_device

    with contextlib.ExitStack() as stack:
        stack.enter_context(compute_precision(precision, input_device(lms[0].model)))
        for model in {id(lm.model): lm.model for lm in lms}.values():
            stack.enter_context(bf16_linear_weights(model, precision))
        yield


def _estimated(base: _Side, sites: list[Site], base_acts: dict[Site, torch.Tensor],
               donor_acts: dict[Site, torch.Tensor], n: int) -> dict[Site, torch.Tensor]:
    """Attribution estimates of each site's patched score change for the rows of `base` `[n]`."""
    from vlsafe.probes.attribution import attribution_deltas, site_gradients

    _, grads = site_gradients(base.lm, base.batch, sites=sites, rows=base.rows, pos=base.pos, targets=base.targets)
    return attribution_deltas(grads, base_acts, donor_acts, base.rows, n)
