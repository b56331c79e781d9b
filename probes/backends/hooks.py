"""Default capture backend: PyTorch forward (pre-)hooks on the language model's blocks.

Only the requested hooks are registered; each hook gathers the requested positions immediately, and the
forward stops right after the last requested block (no final norm, no lm_head over the vocabulary).

mllama's cross-attention blocks are skipped by a text-only forward; a block that did not run is the identity,
so its `resid_pre` and `resid_post` are the residual stream passing it (read at the next block's input, or the
final norm's) and its `attn_out` and `mlp_out` are zero.
"""

from __future__ import annotations

from typing import Any

import torch

from vlsafe.probes import models as M
from vlsafe.probes.backends import Gather, HookRequest, by_layer, first


class _StopForward(Exception):
    """Raised by the last hook to end the forward early."""


class HooksBackend:
    """Forward hooks on the family adapter's blocks, attention and MLP modules; see module docstring."""

    name = "hooks"

    def __init__(self, lm: Any, requests: list[HookRequest]):
        self.model = lm.model
        self.requests = list(requests)
        self._handles: list[Any] = []
        self._out: dict[HookRequest, torch.Tensor] = {}
        self._gather: Gather | None = None
        self._after: dict[int, torch.Tensor] = {}
        self._register()

    def _register(self) -> None:
        ad = M.adapter(self.model)
        layers = by_layer(self.requests)
        for layer, kinds in layers.items():
            parts = ad.block(layer)
            block = parts.module
            if "resid_pre" in kinds:
                self._handles.append(block.register_forward_pre_hook(self._pre_hook(layer), with_kwargs=True))
            if "attn_out" in kinds:
                self._handles.append(parts.attn.register_forward_hook(self._hook("attn_out", layer)))
            if "mlp_out" in kinds:
                self._handles.append(parts.mlp.register_forward_hook(self._hook("mlp_out", layer)))
            if "resid_post" in kinds:
                self._handles.append(block.register_forward_hook(self._hook("resid_post", layer)))
        for layer in [l for l in layers if ad.block(l).cross]:
            nxt = ad.layers()[layer + 1] if layer + 1 < len(ad.layers()) else ad.require("final_norm")
            self._handles.append(nxt.register_forward_pre_hook(self._passing(layer), with_kwargs=True))
        if layers:
            self._handles.append(ad.layers()[max(layers)].register_forward_hook(self._stop))
            if ad.block(max(layers)).cross:  # skipped: stop once the residual passing it is read
                nxt = max(layers) + 1
                last = ad.layers()[nxt] if nxt < len(ad.layers()) else ad.require("final_norm")
                self._handles.append(last.register_forward_pre_hook(self._stop_pre))

    def _pre_hook(self, layer: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            self._out[("resid_pre", layer)] = self._gather(h)
        return hook

    def _passing(self, layer: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            self._after[layer] = self._gather(args[0] if args else kwargs["hidden_states"])
        return hook

    def _fill_skipped(self) -> None:
        """Requests at cross-attention blocks that did not run: the passing residual, zero block outputs."""
        for kind, layer in self.requests:
            if (kind, layer) not in self._out and layer in self._after:
                h = self._after[layer]
                self._out[(kind, layer)] = h if kind.startswith("resid") else torch.zeros_like(h)

    def _hook(self, kind: str, layer: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            self._out[(kind, layer)] = self._gather(first(output))
        return hook

    @staticmethod
    def _stop(module: Any, args: Any, output: Any) -> None:
        raise _StopForward

    @staticmethod
    def _stop_pre(module: Any, args: Any) -> None:
        raise _StopForward

    def run(self, batch: Any, gather: Gather) -> dict[HookRequest, torch.Tensor]:
        """One forward over `batch`; returns `{(kind, layer): gathered}`."""
        self._out, self._after, self._gather = {}, {}, gather
        try:
            with torch.inference_mode():
                self.model(**batch.model_inputs(), use_cache=False)
        except _StopForward:
            pass
        self._fill_skipped()
        out, self._out, self._gather = self._out, {}, None
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "HooksBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make(lm: Any, requests: list[HookRequest]) -> HooksBackend:
    return HooksBackend(lm, requests)
