"""Capture activations at chosen hooks, layers and positions, batched with left padding.

>>> from vlsafe.probes.models import load
>>> from vlsafe.probes.capture import capture
>>> lm = load("default")
>>> acts = capture(lm, ["How do I bake bread?", "Write a poem"], hooks=["resid_pre"], positions="post_instruction")
>>> acts.get("resid_pre", 12).shape           # [n, P, d] fp32
>>> acts.stack("resid_pre").shape             # [n, L, P, d]: vlsafe's one layout (see vlsafe.probes.activations)
>>> acts = capture(lm, prompt_set, layers=range(10, 20), accumulate=True)   # fp64 running stats only
>>> acts.mean("resid_pre", 12, label=1)        # [P, d] fp64

Hooks (layer ℓ on the shared axis): `resid_pre` = input of block ℓ (HF `hidden_states[ℓ]`), `resid_post` =
output of block ℓ (HF `hidden_states[ℓ+1]` for ℓ < L−1; HF's last entry is after the final norm),
`attn_out` = self-attention output (after o_proj), `mlp_out` = MLP output. TransformerLens names
(`blocks.{i}.hook_resid_pre`, `…hook_resid_post`, `…hook_attn_out`, `…hook_mlp_out`, `blocks.{i}.hook_in`,
`…hook_out`, `…attn.hook_out`, `…mlp.hook_out`) are accepted and fix their own layer.

Positions: `"last"`, `"post_instruction"` (each token the chat template puts after the user message,
indexed −k…−1), `"mean"` (mean over the prompt's non-pad tokens, image tokens included), a negative int,
or a list mixing these.
"""

from __future__ import annotations

import difflib
import numbers
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.placement import input_device
from vlsafe.probes import models as M
from vlsafe.probes.activations import Activations, model_identity
from vlsafe.probes.backends import get_backend
from vlsafe.probes.templates import Batch, batches, post_instruction_tokens

__all__ = ["capture", "Activations", "KINDS", "parse_hook_name", "resolve_hooks", "resolve_positions", "gatherer"]

KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
_SUFFIX = {"hook_resid_pre": "resid_pre", "hook_in": "resid_pre", "hook_resid_post": "resid_post",
           "hook_out": "resid_post", "hook_attn_out": "attn_out", "attn.hook_out": "attn_out",
           "hook_mlp_out": "mlp_out", "mlp.hook_out": "mlp_out"}
_BLOCK = re.compile(r"^blocks\.(-?\d+)\.(.+)$")


def _unknown(name: str, layer: int | None) -> VlsafeError:
    i = 0 if layer is None else layer
    valid = list(KINDS) + list(_SUFFIX) + [f"blocks.{i}.{s}" for s in _SUFFIX]
    near = difflib.get_close_matches(name, valid, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; valid kinds: {', '.join(KINDS)}"
    return VlsafeError(f"unknown hook name {name!r}{hint}")


def parse_hook_name(name: str) -> tuple[str, int | None]:
    """`"resid_pre"` → (`resid_pre`, None); `"blocks.3.hook_mlp_out"` → (`mlp_out`, 3). Unknown → VlsafeError."""
    name = str(name).strip()
    if name in KINDS:
        return name, None
    if name in _SUFFIX:
        return _SUFFIX[name], None
    m = _BLOCK.match(name)
    if m and m.group(2) in _SUFFIX:
        return _SUFFIX[m.group(2)], int(m.group(1))
    raise _unknown(name, int(m.group(1)) if m else None)


def _check_layer(layer: Any, n_layers: int) -> int:
    try:
        ok = not isinstance(layer, bool) and int(layer) == layer
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise VlsafeError(f"layer {layer!r} is not an integer (valid layers: 0..{n_layers - 1})")
    if not 0 <= int(layer) < n_layers:
        raise VlsafeError(f"layer {int(layer)} out of range (valid layers: 0..{n_layers - 1})")
    return int(layer)


def resolve_hooks(hooks: str | Sequence[str], layers: Sequence[int] | None, n_layers: int) -> list[tuple[str, int]]:
    """(kind, layer) requests: short kinds × `layers` (default all), TL names at their own layer; de-duplicated."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    if not hooks:
        raise VlsafeError("no hooks requested (use e.g. resid_pre, resid_post, attn_out, mlp_out)")
    if layers is not None:
        layers = [_check_layer(l, n_layers) for l in ([layers] if isinstance(layers, int) else layers)]
        if not layers:
            raise VlsafeError(f"empty layer list (valid layers: 0..{n_layers - 1})")
    default = list(range(n_layers)) if layers is None else layers
    out: list[tuple[str, int]] = []
    for h in hooks:
        kind, layer = parse_hook_name(h)
        for l in default if layer is None else [_check_layer(layer, n_layers)]:
            if (kind, l) not in out:
                out.append((kind, l))
    return out


def resolve_positions(positions: Any, *, tokenizer: Any = None, chat: bool = True) -> list[int | str]:
    """Position labels: negative ints (from the end of each left-padded prompt) and/or `"mean"`."""
    items = [positions] if isinstance(positions, (str, numbers.Integral)) else list(positions)
    if not items:
        raise VlsafeError("no positions requested (use 'last', 'post_instruction', 'mean' or negative ints)")
    out: list[int | str] = []
    for p in items:
        if p == "last":
            new: list[int | str] = [-1]
        elif p == "mean":
            new = ["mean"]
        elif p == "post_instruction":
            if not chat:
                raise VlsafeError("positions='post_instruction' needs chat formatting (chat=True)")
            new = list(range(-len(post_instruction_tokens(tokenizer)), 0))
        elif isinstance(p, numbers.Integral) and not isinstance(p, bool) and p < 0:
            new = [int(p)]
        else:
            raise VlsafeError(f"bad position {p!r}: use 'last', 'post_instruction', 'mean' or a negative int "
                              "(counted from the end; prompts are left-padded)")
        out += [q for q in new if q not in out]
    return out


def gatherer(positions: Sequence[int | str], attention_mask: torch.Tensor) -> Any:
    """A function `h[n, T, d]` → fp32 `[n, len(positions), d]` at `positions` (ints from the end, "mean")."""
    ints = [p for p in positions if p != "mean"]
    mask = attention_mask.unsqueeze(-1)
    denom = attention_mask.sum(-1, keepdim=True)

    def gather(h: torch.Tensor) -> torch.Tensor:
        cols = []
        if ints:
            picked = h[:, ints, :].float()
        for p in positions:
            if p == "mean":
                m = mask.to(h.device, torch.float32)
                cols.append(((h.float() * m).sum(1) / denom.to(h.device)).unsqueeze(1))
            else:
                cols.append(picked[:, ints.index(p)].unsqueeze(1))
        return torch.cat(cols, dim=1).detach().to("cpu", copy=True)

    return gather


def _unpack(prompts: Any, images: Any, lm: Any) -> tuple[list[str], list[Any] | None, list[Any] | None]:
    labels = None
    if hasattr(prompts, "prompts") and not isinstance(prompts, (str, list, tuple)):
        texts = list(prompts.prompts)
        labels = list(getattr(prompts, "labels", None) or [])
        labels = labels if any(lab is not None for lab in labels) else None
        if images is None:
            specs = [getattr(r, "image", None) for r in getattr(prompts, "records", [])]
            images = [_spec_image(s, lm) for s in specs] if any(s is not None for s in specs) else None
    else:
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise VlsafeError("empty prompt set")
    if images is not None and not isinstance(images, (list, tuple)):
        images = [images] * len(texts)   # one image for every prompt
    return texts, labels, images


def _spec_image(spec: Any, lm: Any) -> Any:
    if spec is None or not isinstance(spec, (str, Path)):
        return spec
    from vlsafe.probes.behavior.images import make_image
    from vlsafe.probes.templates import blank_image

    return make_image(str(spec), size=blank_image(lm).size[0])


def _check_lengths(batch: Batch, positions: Sequence[int | str], start: int) -> None:
    need = max([-p for p in positions if p != "mean"], default=1)
    short = (batch.lengths < need).nonzero()
    if len(short):
        i = int(short[0])
        raise VlsafeError(f"prompt {start + i} has {int(batch.lengths[i])} tokens, fewer than position -{need}")


def capture(lm: Any, prompts: Sequence[str] | Any, *, hooks: str | Sequence[str] = ("resid_pre",),
            layers: Sequence[int] | None = None, positions: Any = "last", images: Any = None,
            batch_size: int = 8, backend: str = "hooks", accumulate: bool = False, cov: bool = False,
            spill_to: str | Path | None = None, progress: bool = True, chat: bool = True,
            system: str | None = None, remote: bool | str = False, remote_model: str | None = None) -> Activations:
    """Run `prompts` through `lm` in left-padded batches and keep the requested activations.

    `prompts`: strings or a `PromptSet` (its labels and image specs are used). `images`: one PIL image (or None)
    per prompt, or a single image for all. `accumulate=True` keeps only fp64 running stats per (hook, layer,
    position, label) — memory independent of the number of prompts (`cov=True` adds full covariances).
    `spill_to=DIR` writes each batch to `DIR/chunk_NNNNN.safetensors` instead of holding it in memory.
    `remote=True` (nnsight backend only) runs the forward passes on NDIF (`NDIF_API_KEY`; a hub-id `lm` is
    then never loaded here), `remote="local"` is the offline dry run; see `vlsafe.probes.backends.nnsight`.
    Models spread over devices (`load_model(device_map=...)`) work with every backend: inputs go to the
    embedding's device and activations are gathered to the CPU accumulator.
    """
    lm = _remote_lm(lm, backend, remote) if remote else M.load(lm)
    texts, labels, images = _unpack(prompts, images, lm)
    requests = resolve_hooks(hooks, layers, M.num_layers(lm.model))
    pos = resolve_positions(positions, tokenizer=lm.processor or lm.tokenizer, chat=chat)
    if accumulate and spill_to is not None:
        raise VlsafeError("accumulate=True keeps statistics only; spill_to is for full activations")
    ident = model_identity(lm)
    meta = {**ident, "backend": backend, "chat": chat, "system": system, "positions_spec": str(positions),
            "prompt_set": getattr(prompts, "name", None), "ids": list(getattr(prompts, "ids", []) or []) or None}
    if remote:
        meta["remote"] = remote
    acts = Activations(requests, pos, M.hidden_size(lm.model), labels, meta, accumulate=accumulate, cov=cov)
    spill = Path(spill_to) if spill_to is not None else None
    if spill is not None:
        spill.mkdir(parents=True, exist_ok=True)
    n_batches = -(-len(texts) // max(batch_size, 1))
    device = input_device(lm.model)
    with _backend(backend, lm, requests, remote, remote_model) as be:
        it = batches(lm, texts, images, batch_size=batch_size, chat=chat, system=system)
        for b, batch in enumerate(tqdm(it, total=n_batches, disable=not progress, desc=f"capture[{be.name}]")):
            start = b * batch_size
            _check_lengths(batch, pos, start)
            batch = batch.to(device)
            out = be.run(batch, gatherer(pos, batch.attention_mask))
            acts.add(out, labels=None if labels is None else labels[start:start + len(batch)],
                     spill_file=spill / f"chunk_{b:05d}.safetensors" if spill is not None else None)
    if spill is not None:
        acts.write_spill_meta(spill)
    return acts


def _remote_lm(lm: Any, backend: str, remote: Any) -> Any:
    """The model for a remote capture: checked backend and key; a hub id becomes a weightless model."""
    from vlsafe.probes.backends import nnsight as NB

    if str(backend).lower() != "nnsight":
        raise VlsafeError(f"remote execution needs backend='nnsight' (got {backend!r})")
    remote = NB.check_remote(remote)
    if remote != "local":
        NB.api_key()
        if NB.is_hub_id(lm):
            return NB.remote_lm(lm)
    return M.load(lm)


def _backend(name: str, lm: Any, requests: list[tuple[str, int]], remote: Any, remote_model: str | None) -> Any:
    if not remote:
        return get_backend(name, lm, requests)
    from vlsafe.probes.backends import nnsight as NB

    return NB.make(lm, requests, remote=remote, remote_model=remote_model)
