"""Activation-level remedies: edit the residual stream entering chosen blocks, under any forward.

docs/methods.md, "Activation-level remedies". At each remedy layer ℓ (block input, `resid_pre`), in fp64:

- `steer`:     h ← h + α·v_ℓ on every row (v raw or unit, as the spec says);
- `calibrate`: h ← h − α·δ_ℓ on rows that hold an image (CMRM, dataset-level shift δ from `vlsafe locate`);
- `project`:   per image row, Δ = h_ℓ(image + text) − h_ℓ(text) at the last prompt position and
  h ← h − α (Δ·r̂_ℓ) r̂_ℓ (ShiftDC; h(text) from a text-only forward of the same rows, image tokens removed);
- `ablate`:    `interventions.ablate_direction` at the chosen layers (α = 1, all positions).

`positions: all` edits every position (prompt and generated tokens), `last` the last prompt position and every
generated token. A forward is a *new prompt* (prefill) unless it continues a KV cache that already holds tokens
(`cache`/`past_key_values` with a non-zero length, or `cache_position` not starting at 0); the image rows and the
project scalars are set at prefill and reused by the continuations (generation steps, the `opening` score).
Text-only rows are never touched by calibrate and project. Hooks are removed on exit, even on error.

>>> with apply_remedy(lm, RemedySpec.from_yaml("project.yaml")):
...     texts = generate(lm, prompts, images=imgs, cache=False)
>>> with steer(lm, r, layers=[3], alpha=2.0):
...     refusal_score(lm, prompts)
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterator, Mapping, Sequence

import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes import models as M
from vlsafe.probes.interventions import edit_input, removing_hooks, ablate_direction
from vlsafe.probes.remedy_spec import RemedySpec, vectors

__all__ = ["apply_remedy", "evaluate_remedy", "steer", "calibrate", "project", "RemedySpec", "is_prefill"]

Vectors = torch.Tensor | Mapping[int, torch.Tensor]


class _State:
    """Per-context state: which rows hold an image, prefill or continuation, and the per-prompt project data."""

    def __init__(self) -> None:
        self.busy = False            # the text-only forward of `project` is running: edit nothing, record h
        self.prefill = True
        self.rows: torch.Tensor | None = None          # [B] bool, image rows of the current prompt batch
        self.text: dict[int, torch.Tensor] = {}        # layer → [B, d] fp64 h(text) at the last position
        self.coef: dict[int, torch.Tensor] = {}        # layer → [B] fp64 (Δ·r̂) per row, set at prefill


def is_prefill(kwargs: Mapping[str, Any]) -> bool:
    """True for a forward over the prompt (no cache position past 0), False for a cached decoding step."""
    pos = kwargs.get("cache_position")
    if isinstance(pos, torch.Tensor) and pos.numel() and int(pos.reshape(-1)[0]) > 0:
        return False
    for key in ("cache", "past_key_values"):
        c = kwargs.get(key)
        if c is None:
            continue
        if hasattr(c, "get_seq_length"):
            if int(c.get_seq_length()) > 0:
                return False
        elif isinstance(c, (tuple, list)) and len(c) > 0:
            return False
    return True


def _image_id_tensor(lm: Any) -> torch.Tensor:
    from vlsafe.probes.patching import image_token_ids

    return torch.tensor(sorted(image_token_ids(lm)), dtype=torch.long)


def _text_only(ids: torch.Tensor, mask: torch.Tensor, image_ids: torch.Tensor, pad: int) -> dict[str, torch.Tensor]:
    """The rows without their image placeholder tokens, left re-padded, with position ids `cumsum(mask) − 1`."""
    keep = mask.bool() & ~torch.isin(ids, image_ids.to(ids.device))
    rows = [ids[r][keep[r]] for r in range(ids.shape[0])]
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), pad, dtype=ids.dtype, device=ids.device)
    m = torch.zeros((len(rows), T), dtype=mask.dtype, device=ids.device)
    for i, r in enumerate(rows):
        out[i, T - len(r):] = r
        m[i, T - len(r):] = 1
    return {"input_ids": out, "attention_mask": m, "position_ids": (m.long().cumsum(-1) - 1).clamp(min=0)}


class _Remedy:
    """The hooks of one steer/calibrate/project context."""

    def __init__(self, lm: Any, kind: str, vecs: dict[int, torch.Tensor], alpha: float, positions: str) -> None:
        self.lm, self.kind, self.vecs, self.alpha, self.positions = lm, kind, vecs, float(alpha), positions
        self.st = _State()
        self.image_ids = _image_id_tensor(lm) if kind != "steer" else None
        pad = getattr(lm.tokenizer, "pad_token_id", None)
        self.pad = int(pad) if pad is not None else 0

    # ---- top-level pre-hook: a new prompt or a continuation? -------------------------------------------------

    def on_forward(self, _m: Any, args: tuple, kwargs: dict) -> None:
        st = self.st
        if st.busy:
            return None
        st.prefill = is_prefill(kwargs)
        if self.kind == "steer":
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not st.prefill:
            if st.rows is None or (ids is not None and ids.shape[0] != st.rows.shape[0]):
                raise VlsafeError(f"remedy {self.kind}: a cached continuation without its prompt's forward")
            return None
        if ids is None:
            raise VlsafeError(f"remedy {self.kind}: needs input_ids to find image rows (got inputs_embeds)")
        st.rows = torch.isin(ids, self.image_ids.to(ids.device)).any(-1).cpu()
        st.text, st.coef = {}, {}
        if self.kind == "project" and bool(st.rows.any()):
            mask = kwargs.get("attention_mask")
            self._text_states(ids, torch.ones_like(ids) if mask is None else mask)
        return None

    @torch.no_grad()
    def _text_states(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """h_ℓ(text) at the last position of every image row, from a forward without image tokens."""
        st, sel = self.st, self.st.rows.nonzero().reshape(-1)
        inputs = _text_only(ids[sel.to(ids.device)], mask[sel.to(mask.device)], self.image_ids, self.pad)
        st.busy, st.text = True, {}
        try:
            self.lm.model(**inputs, use_cache=False)
        finally:
            st.busy = False
        for ℓ, h in list(st.text.items()):
            full = torch.zeros((st.rows.shape[0], h.shape[-1]), dtype=torch.float64)
            full[sel] = h
            st.text[ℓ] = full

    # ---- block pre-hooks ---------------------------------------------------------------------------------------

    def on_block(self, layer: int) -> Any:
        def hook(_m: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self.st.busy:
                if self.kind == "project":
                    h = args[0] if args else kwargs["hidden_states"]
                    self.st.text[layer] = h[:, -1].detach().to(torch.float64).cpu()
                return None
            return edit_input(args, kwargs, lambda h: self._edit(layer, h))
        return hook

    def _delta(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """What is added at this layer: `[d]` (every row) or `[B, d]` (per row), fp64 on h's device."""
        v = self.vecs[layer].to(h.device)
        if self.kind == "steer":
            return self.alpha * v
        st = self.st
        if st.rows is None or st.rows.shape[0] != h.shape[0]:
            raise VlsafeError(f"remedy {self.kind}: block {layer} saw {h.shape[0]} rows, the prompt had "
                              f"{None if st.rows is None else st.rows.shape[0]}")
        rows = st.rows.to(device=h.device, dtype=torch.float64)
        if self.kind == "calibrate":
            return -self.alpha * rows[:, None] * v
        if st.prefill:
            shift = h[:, -1].to(torch.float64) - st.text.get(layer, torch.zeros(h.shape[0], h.shape[-1],
                                                                                 dtype=torch.float64)).to(h.device)
            st.coef[layer] = (shift @ v) * rows
        return -self.alpha * st.coef[layer].to(h.device)[:, None] * v

    def _edit(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        delta = self._delta(layer, h)
        if self.positions == "last" and self.st.prefill:
            out = h.clone()
            out[:, -1] = (h[:, -1].to(torch.float64) + delta).to(h.dtype)
            return out
        delta = delta if delta.dim() == 1 else delta[:, None, :]
        return (h.to(torch.float64) + delta).to(h.dtype)

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        handles = [M.unwrap(self.lm.model).register_forward_pre_hook(self.on_forward, with_kwargs=True,
                                                                        prepend=True)]
        try:
            blocks = M.decoder_layers(self.lm.model)
            for ℓ in sorted(self.vecs):
                handles.append(blocks[ℓ].register_forward_pre_hook(self.on_block(ℓ), with_kwargs=True))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        with removing_hooks(handles):
            yield


# ---- public API ---------------------------------------------------------------------------------------------

def _per_layer(lm: Any, vector: Vectors, layers: Sequence[int], what: str, *, unit: bool) -> dict[int, torch.Tensor]:
    """`vector` (`[d]`, `[L, d]` over all model layers, or {layer: [d]}) as fp64 `[d]` per layer, checked."""
    n, d = M.num_layers(lm.model), M.hidden_size(lm.model)
    layers = [int(ℓ) for ℓ in layers]
    if not layers or any(not 0 <= ℓ < n for ℓ in layers):
        raise VlsafeError(f"{what}: layers {layers} must be a non-empty subset of 0..{n - 1}")
    out = {}
    for ℓ in layers:
        v = vector[ℓ] if isinstance(vector, Mapping) or torch.as_tensor(vector).dim() == 2 else vector
        v = torch.as_tensor(v).detach().to(torch.float64).cpu().reshape(-1)
        if v.numel() != d:
            raise VlsafeError(f"{what}: the vector of layer {ℓ} has {v.numel()} entries, the hidden size is {d}")
        if unit:
            if v.norm() == 0 or not torch.isfinite(v.norm()):
                raise VlsafeError(f"{what}: the direction of layer {ℓ} has zero or non-finite norm")
            v = v / v.norm()
        out[ℓ] = v
    return out


def _checked(kind: str, lm: Any, alpha: Any, positions: str) -> float:
    if kind != "steer" and not M.is_lvlm(lm):
        raise VlsafeError(f"{kind}: acts on image inputs but the model takes no images")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise VlsafeError(f"{kind}: alpha must be a number, got {alpha!r}")
    if positions not in ("all", "last"):
        raise VlsafeError(f"{kind}: positions must be 'all' or 'last', got {positions!r}")
    return float(alpha)


def steer(lm: Any, vector: Vectors, *, layers: Sequence[int], alpha: float = 1.0,
          positions: str = "all") -> ContextManager[None]:
    """h ← h + α·v at the inputs of `layers` on every row (`vector` used as given, not normalised)."""
    a = _checked("steer", lm, alpha, positions)
    return _Remedy(lm, "steer", _per_layer(lm, vector, layers, "steer", unit=False), a, positions).hooks()


def calibrate(lm: Any, shift: Vectors, *, layers: Sequence[int], alpha: float = 1.0,
              positions: str = "all") -> ContextManager[None]:
    """h ← h − α·δ at the inputs of `layers` on rows that hold an image (CMRM)."""
    a = _checked("calibrate", lm, alpha, positions)
    return _Remedy(lm, "calibrate", _per_layer(lm, shift, layers, "calibrate", unit=False), a, positions).hooks()


def project(lm: Any, direction: Vectors, *, layers: Sequence[int], alpha: float = 1.0,
            positions: str = "all") -> ContextManager[None]:
    """h ← h − α (Δ·r̂) r̂ on image rows, Δ = h(image + text) − h(text) at the last prompt position (ShiftDC)."""
    a = _checked("project", lm, alpha, positions)
    return _Remedy(lm, "project", _per_layer(lm, direction, layers, "project", unit=True), a, positions).hooks()


@contextlib.contextmanager
def apply_remedy(lm: Any, spec: RemedySpec) -> Iterator[Any]:
    """Run every forward of `lm` inside the block under the remedy `spec` (validated against `lm` first).

    Yields None, or for a `kind: gated` spec the `vlsafe.probes.gated.Gate` (its per-prompt decisions)."""
    if spec.kind == "gated":
        from vlsafe.probes.gated import apply_gated

        with apply_gated(lm, spec) as gate:
            yield gate
        return
    vecs = vectors(spec, lm)
    if spec.kind == "ablate":
        with contextlib.ExitStack() as stack:
            for ℓ, r in vecs.items():
                stack.enter_context(ablate_direction(lm.model, r, layers=[ℓ]))
            yield
        return
    with _Remedy(lm, spec.kind, vecs, spec.alpha, spec.positions).hooks():
        yield


def evaluate_remedy(lm: Any, spec: RemedySpec, sets: Sequence[Any], *, checkpoint: str | None = None,
                    **kwargs: Any) -> tuple[Any, Any]:
    """`evaluate_model(lm, sets, **kwargs)` under the remedy (generations bypass the cache: hooks are present).

    `checkpoint` labels the rows (default `remedy-<spec.key()>`). `answer_loglik` sets score prompt + answer in
    one forward, whose last position is not the prompt's: refused for `project`, `gated` and `positions: last`.
    Under a gated spec the generations gain `gate_fired`."""
    from vlsafe.probes.behavior.evaluate import evaluate_model

    if spec.kind in ("project", "gated") or spec.positions == "last":
        bad = [getattr(es.prompts, "name", "?") for es in sets if es.metric == "answer_loglik"]
        if bad:
            raise VlsafeError(f"{spec.source}: {spec.kind} (positions {spec.positions}) cannot score answer_loglik "
                              f"set {bad[0]!r}: its forward holds the answer after the prompt")
    with apply_remedy(lm, spec) as gate:
        return evaluate_model(lm, sets, checkpoint=checkpoint or f"remedy-{spec.key()}", gate=gate, **kwargs)
