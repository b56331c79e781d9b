"""nnsight 0.8 backend: one trace per batch, block inputs/outputs read in forward order, then `tracer.stop()`.

Text models are wrapped as `nnsight.LanguageModel(model, tokenizer=tok)`; LVLMs (which LanguageModel does not
list for text generation) with the generic `nnsight.NNsight(model)`. Either way the wrapped model is the
caller's own (nnsight adds no weights and leaves the modules in place).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from probes import models as M
from probes.backends import Gather, HookRequest, by_layer, first


def wrap(lm: Any) -> Any:
    """The nnsight wrapper for `lm` (LanguageModel for text models, NNsight for LVLMs)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import nnsight

    if M.is_lvlm(lm):
        return nnsight.NNsight(lm.model)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nnsight.LanguageModel(lm.model, tokenizer=lm.tokenizer)


def _envoy(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


class NnsightBackend:
    """Capture `.input` / `.output` of the blocks and their attention/MLP submodules inside `trace`."""

    name = "nnsight"

    def __init__(self, lm: Any, requests: list[HookRequest]):
        self.requests = by_layer(list(requests))
        self.wrapper = wrap(lm)
        model = lm.model
        names = {id(m): n for n, m in model.named_modules()}
        blocks = M.decoder_layers(model)
        self.paths: dict[int, dict[str, str]] = {}
        for layer in self.requests:
            block = blocks[layer]
            self.paths[layer] = {"block": names[id(block)], "attn": names[id(M.attention(block))],
                                 "mlp": names[id(M.mlp(block))]}

    def run(self, batch: Any, gather: Gather) -> dict[HookRequest, torch.Tensor]:
        out: dict[HookRequest, torch.Tensor] = {}
        with torch.no_grad():
            with self.wrapper.trace(**batch.model_inputs(), use_cache=False) as tracer:
                for layer, kinds in self.requests.items():
                    p = self.paths[layer]
                    block = _envoy(self.wrapper, p["block"])
                    if "resid_pre" in kinds:
                        out[("resid_pre", layer)] = gather(block.input)
                    if "attn_out" in kinds:
                        out[("attn_out", layer)] = gather(first(_envoy(self.wrapper, p["attn"]).output))
                    if "mlp_out" in kinds:
                        out[("mlp_out", layer)] = gather(first(_envoy(self.wrapper, p["mlp"]).output))
                    if "resid_post" in kinds:
                        out[("resid_post", layer)] = gather(first(block.output))
                tracer.stop()
        return out

    def close(self) -> None:
        self.wrapper = None

    def __enter__(self) -> "NnsightBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make(lm: Any, requests: list[HookRequest]) -> NnsightBackend:
    return NnsightBackend(lm, requests)
