"""Run a language model from block ℓ on: record one clean forward's block inputs, then re-run only the blocks a
change at layer ℓ can affect.

Activation patching at layer ℓ leaves everything before block ℓ as in the clean forward, so a patched forward
needs only blocks ℓ … L−1, the final norm and the head at the last position: on average half the blocks, and
never the embedding or the vision tower. `Recording` keeps, during a clean forward, each block's call (its
positional and keyword arguments: masks, rotary embeddings, position ids) and the hidden state entering the blocks
asked for; `Recording.resume(ℓ, h)` re-runs the stack from there.

Exactness is checked, not assumed: `Recording.check(last_logits)` replays the recorded blocks from the clean input and
compares the result with the clean forward's logits; a family whose top level does more than `head(norm(h))`
after the last block (logit soft-capping, scaling) or changes the hidden state between blocks fails the check,
and callers fall back to full forwards.

Memory: the recorded block inputs, `len(layers) × n × T × d` floats of the model's dtype per recording.

>>> with Recording(lm, layers=[3, 7]) as rec:
...     out = lm.model(**inputs, use_cache=False)
>>> logits = rec.resume(7, rec.inputs[7] + delta)        # last-position logits [n, V], as the full forward's
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from vlsafe.probes import models as M
from vlsafe.probes.interventions import edit_first, first_tensor, removing_hooks

__all__ = ["Recording"]

Hook = Callable[[torch.Tensor], torch.Tensor]


def _device_of(module: torch.nn.Module, default: torch.device) -> torch.device:
    p = next(module.parameters(), None)
    return default if p is None else p.device


@dataclass
class Recording:
    """Block calls and block inputs of one clean forward of `lm` (a `LoadedModel` or a transformers model).

    `layers`: the layers whose *input* hidden state is kept (`inputs[ℓ]`, `[n, T, d]`, a copy); calls are kept for
    every block the forward ran from the first of them on (references to the forward's own tensors). A block the
    forward skipped (mllama's cross-attention blocks without an image) is skipped on replay too."""

    lm: Any
    layers: Sequence[int]
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    calls: dict[int, tuple[tuple, dict]] = field(default_factory=dict)
    _stack: contextlib.ExitStack | None = field(default=None, init=False, repr=False)

    def __enter__(self) -> "Recording":
        model = getattr(self.lm, "model", self.lm)
        self._blocks = list(M.decoder_layers(model))
        self._norm, self._head = M.final_norm(model), M.lm_head(model)
        first = min(self.layers) if self.layers else len(self._blocks)
        wanted = set(self.layers)
        self._stack = contextlib.ExitStack()
        for i in range(first, len(self._blocks)):
            def pre(module: Any, args: tuple, kwargs: dict, i: int = i) -> None:
                h = args[0] if args else kwargs["hidden_states"]
                rest = args[1:] if args else ()
                kw = {k: (None if _is_cache(v) else v) for k, v in kwargs.items() if k != "hidden_states"}
                if "use_cache" in kw:
                    kw["use_cache"] = False
                self.calls[i] = (rest, kw)
                if i in wanted:
                    self.inputs[i] = h.detach().clone()
            self._stack.enter_context(removing_hooks([self._blocks[i].register_forward_pre_hook(pre,
                                                                                                with_kwargs=True)]))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            self._stack.close()

    @torch.no_grad()
    def resume(self, layer: int, h: torch.Tensor, *,
               hooks: dict[torch.nn.Module, Hook] | None = None) -> torch.Tensor:
        """Last-position logits `[n, V]` (fp32, CPU) of the stack run from block `layer`'s input `h` `[n, T, d]`.

        `hooks` maps a module (e.g. block `layer`'s attention or MLP) to a function rewriting its output's first
        tensor during the replay."""
        if layer not in self.calls:
            raise KeyError(f"block {layer} was not recorded (recorded from {min(self.calls, default=None)})")
        with contextlib.ExitStack() as stack:
            for mod, fn in (hooks or {}).items():
                post = lambda m, a, out, fn=fn: edit_first(out, fn)  # noqa: E731
                stack.enter_context(removing_hooks([mod.register_forward_hook(post)]))
            for i in sorted(i for i in self.calls if i >= layer):
                rest, kw = self.calls[i]
                blk = self._blocks[i]
                h = first_tensor(blk(h.to(_device_of(blk, h.device)), *rest, **kw))
        last = h[:, -1:, :].to(_device_of(self._norm, h.device))
        logits = self._head(self._norm(last).to(_device_of(self._head, h.device)))
        return logits[:, -1].float().cpu()

    def check(self, last_logits: torch.Tensor, *, atol: float = 1e-4) -> bool:
        """True when replaying the recorded stack from its first recorded layer on the clean input reproduces the
        clean forward's last-position logits, so `resume` is the model's own computation (one extra pass over
        the recorded blocks; catches a family that changes the hidden state between blocks or after the last)."""
        if not self.inputs:
            return False
        first = min(self.inputs)
        got = self.resume(first, self.inputs[first])
        want = last_logits.float().cpu()
        return got.shape == want.shape and bool(torch.allclose(got, want, atol=atol, rtol=1e-4))


def _is_cache(v: Any) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(v, Cache)
