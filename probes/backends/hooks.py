"""Default capture backend: PyTorch forward (pre-)hooks on the language model's blocks.

Only the requested hooks are registered; each hook gathers the requested positions immediately, and the
forward stops right after the last requested block (no final norm, no lm_head over the vocabulary).
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
        if layers:
            self._handles.append(ad.layers()[max(layers)].register_forward_hook(self._stop))

    def _pre_hook(self, layer: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            self._out[("resid_pre", layer)] = self._gather(h)
        return hook

    def _hook(self, kind: str, layer: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            self._out[(kind, layer)] = self._gather(first(output))
        return hook

    @staticmethod
    def _stop(module: Any, args: Any, output: Any) -> None:
        raise _StopForward

    def run(self, batch: Any, gather: Gather) -> dict[HookRequest, torch.Tensor]:
        """One forward over `batch`; returns `{(kind, layer): gathered}`."""
        self._out, self._gather = {}, gather
        try:
            with torch.inference_mode():
                self.model(**batch.model_inputs(), use_cache=False)
        except _StopForward:
            pass
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
