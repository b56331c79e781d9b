"""TransformerLens 4.x backend: a `TransformerBridge` around a deep copy of the model, `run_with_cache`.

Boot modifies the model in place (eager attention, swapped modules), so the bridge wraps a copy and the
caller's model is untouched. Works for text Llama-style models and LLaVA (TL ships a LLaVA adapter).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes import models as M
from vlsafe.probes.backends import Gather, HookRequest

TL_NAMES = {"resid_pre": "hook_resid_pre", "resid_post": "hook_resid_post", "attn_out": "hook_attn_out",
            "mlp_out": "hook_mlp_out"}


def build_bridge(lm: Any) -> Any:
    """A `TransformerBridge` over a deep copy of `lm.model` (config and tokenizer passed, so nothing hits the Hub;
    the process environment is left alone)."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    model = lm.model
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    try:
        bridge = build_bridge_from_module(copy.deepcopy(model), archs[0], hf_config=model.config,
                                          tokenizer=lm.tokenizer)
    except (ValueError, KeyError, NotImplementedError, AttributeError) as e:
        raise VlsafeError(f"transformer_lens backend: no TransformerBridge for {archs[0]} "
                          f"({str(e).splitlines()[0][:160]})") from None
    return bridge.eval() if hasattr(bridge, "eval") else bridge


class TransformerLensBackend:
    """Capture through `bridge.run_with_cache(names_filter=…)`, stopping after the last requested layer."""

    name = "transformer_lens"

    def __init__(self, lm: Any, requests: list[HookRequest]):
        self.requests = list(requests)
        self.n_layers = M.num_layers(lm.model)
        self.bridge = build_bridge(lm)
        self.names = {r: f"blocks.{r[1]}.{TL_NAMES[r[0]]}" for r in self.requests}

    def run(self, batch: Any, gather: Gather) -> dict[HookRequest, torch.Tensor]:
        kw: dict[str, Any] = {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
        if batch.pixel_values is not None:
            kw["pixel_values"] = batch.pixel_values
        kw.update(batch.extra)
        last = max(r[1] for r in self.requests)
        stop = last + 1 if last + 1 < self.n_layers else None
        with torch.no_grad():
            _, cache = self.bridge.run_with_cache(batch.input_ids, names_filter=list(set(self.names.values())),
                                                  stop_at_layer=stop, **kw)
        return {r: gather(cache[name]) for r, name in self.names.items()}

    def close(self) -> None:
        self.bridge = None

    def __enter__(self) -> "TransformerLensBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make(lm: Any, requests: list[HookRequest]) -> TransformerLensBackend:
    return TransformerLensBackend(lm, requests)
