"""Capture backends: each runs one `Batch` and returns the requested activations, gathered at the positions.

A backend is a context manager built from `(lm, requests)` where `requests` is a list of `(kind, layer)` with
kind in `resid_pre`, `resid_post`, `attn_out`, `mlp_out`; `run(batch, gather)` returns
`{(kind, layer): gather(hidden[n, T, d])}`. `gather` reduces the sequence axis to the requested positions
(it is applied inside the hook, so full sequences are never kept).

- `hooks` (default): PyTorch forward (pre-)hooks on the decoder blocks; stops the forward after the last
  requested layer (no final norm, no lm_head).
- `transformer_lens`: TL 4.x `TransformerBridge` around a deep copy of the model, `run_with_cache` with a
  names filter.
- `nnsight`: nnsight 0.8 trace, modules read in forward order.

Backends leave process state alone (no environment variables, no thread counts): the TransformerLens and
nnsight wrappers are given the in-memory model, its config and tokenizer, so nothing is fetched from the Hub.
(`huggingface_hub` reads `HF_HUB_OFFLINE` once, when it is imported, so setting it at call time would not
make anything offline; export it before starting Python.)
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

import torch

from vlsafe.analysis.errors import VlsafeError

HookRequest = tuple[str, int]
Gather = Callable[[torch.Tensor], torch.Tensor]
BACKENDS = {"hooks": "vlsafe.probes.backends.hooks", "transformer_lens": "vlsafe.probes.backends.transformer_lens",
            "nnsight": "vlsafe.probes.backends.nnsight"}
_ALIASES = {"tl": "transformer_lens", "transformerlens": "transformer_lens", "torch": "hooks", "native": "hooks"}


class Backend(Protocol):
    """What `vlsafe.probes.capture.capture` needs from a backend."""

    name: str

    def run(self, batch: Any, gather: Gather) -> dict[HookRequest, torch.Tensor]: ...

    def close(self) -> None: ...

    def __enter__(self) -> "Backend": ...

    def __exit__(self, *exc: Any) -> None: ...


def get_backend(name: str, lm: Any, requests: list[HookRequest]) -> Backend:
    """Instantiate backend `name` (`hooks`, `transformer_lens`/`tl`, `nnsight`) for `requests` on `lm`."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in BACKENDS:
        raise VlsafeError(f"unknown capture backend {name!r} (choose from {', '.join(BACKENDS)})")
    if key != "hooks":
        _refuse_cross_attention(lm, key)
    module = importlib.import_module(BACKENDS[key])
    return module.make(lm, requests)


def _refuse_cross_attention(lm: Any, backend: str) -> None:
    """Models with cross-attention blocks (mllama) are captured by `hooks` only: a text-only forward skips those
    blocks, which the hooks backend reads as pass-throughs and the library wrappers cannot see."""
    from vlsafe.probes import models as M

    layers = M.adapter(getattr(lm, "model", lm)).cross_attention_layers()
    if layers:
        raise VlsafeError(f"capture backend {backend!r} does not support cross-attention layers "
                          f"({', '.join(map(str, layers))}); use backend='hooks'")


def by_layer(requests: list[HookRequest]) -> dict[int, set[str]]:
    """`{layer: {kinds}}` in ascending layer order."""
    out: dict[int, set[str]] = {}
    for kind, layer in sorted(requests, key=lambda r: r[1]):
        out.setdefault(layer, set()).add(kind)
    return out


def first(x: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (first element of a tuple/list, else itself)."""
    return x[0] if isinstance(x, (tuple, list)) else x
