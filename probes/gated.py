"""Gated remedies: an activation-level action applied only to the prompts on which a `Condition` fires.

docs/methods.md, "Gated remedies". Per prompt, the condition (`vlsafe.probes.gate`) is read once, at the prompt's
first forward (prefill), at its layer's input and the last prompt position, on the **unsteered** state; the
decision holds for every later forward that continues the prompt's KV cache (generation steps, opening scores).
Rows of a batch are decided separately.

How the gate composes with any hook-based action (steer, calibrate, project, ablate of
`vlsafe.probes.remedies`, or `vlsafe.probes.interventions`): the action's hooks are registered first, then at its
**sites** — the input of each action block and that block's attention and MLP outputs — the gate saves the value
before the action's hooks run (a hook put first) and, after them (a hook put last), puts the saved value back on
the rows that did not fire. A non-firing row therefore runs exactly the unsteered model and a firing row exactly
the ungated action. When every action block is at or after the condition layer, the decision is made inside the
prefill itself; otherwise a forward that stops after the condition layer runs first (the action held back).
Forwards nested inside a prefill (the text-only pass of `project`, the gate's own pass) run with the action held
back on every row. The action must edit its sites out of place (all vlsafe remedies do).

As a remedy spec (`kind: gated`, read by `RemedySpec.from_yaml` / `RemedySpec.parse`, run by `apply_remedy`, which
then yields the `Gate`; files relative to the YAML's folder):

    kind: gated
    condition: {file: cond.json}        # written by Condition.save; `threshold: X` overrides the file's
    action: {kind: steer, layers: [20], alpha: 1.0, direction: {file: directions.safetensors, key: llm-aligned}}

>>> with apply_remedy(lm, RemedySpec.from_yaml("gated.yaml")) as gate:
...     texts = generate(lm, prompts, cache=False)
...     fired = gate.fired_for(prompts)           # what the gate decided for each prompt
>>> with gated(lm, Condition.load("cond.json"), steer(lm, r, layers=[20]), layers=[20]) as gate: ...
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, ContextManager, Iterator, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes import models as M
from vlsafe.probes import remedy_spec as RS
from vlsafe.probes.backends import first
from vlsafe.probes.gate import Condition
from vlsafe.probes.interventions import edit_first, edit_input, removing_hooks
from vlsafe.probes.remedies import is_prefill
from vlsafe.probes.remedy_spec import RemedySpec

__all__ = ["Gate", "gated", "GatedSpec", "ConditionSource", "apply_gated"]


class _StopPass(Exception):
    """Ends the gate's own forward once the condition layer has been read."""


def _key(ids: torch.Tensor) -> str:
    """The record key of one prompt: a hash of its real (non-pad) token ids."""
    return hashlib.sha256(ids.detach().to("cpu", torch.int64).numpy().tobytes()).hexdigest()


class Gate:
    """The hooks and decisions of one gated context (see the module docstring).

    `fired` / `scores`: the current prompt batch's decisions (bool `[B]`) and condition scores (fp64 `[B]`);
    `fired_for(prompts)` looks up what was decided for given prompts.
    """

    def __init__(self, lm: Any, condition: Condition, layers: Sequence[int]) -> None:
        condition.check_model(lm)
        n = M.num_layers(lm.model)
        sites = sorted({int(ℓ) for ℓ in layers})
        if not sites or any(not 0 <= ℓ < n for ℓ in sites):
            raise VlsafeError(f"gated: action layers {list(layers)} must be a non-empty subset of 0..{n - 1}")
        self.lm, self.condition, self.layers = lm, condition, sites
        self.inline = sites[0] >= condition.layer      # decide inside the prefill (no extra pass)
        self.fired: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self._depth, self._own_pass, self._pending = 0, False, None
        self._saved: dict[tuple[str, int], torch.Tensor] = {}
        self._records: dict[str, tuple[bool, float]] = {}

    # ---- top level: a new prompt batch, a continuation, or a nested forward? -----------------------------
    def _enter(self, _m: Any, args: tuple, kwargs: dict) -> None:
        self._depth += 1
        if self._depth > 1:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not is_prefill(kwargs):
            if self.fired is None or (ids is not None and ids.shape[0] != self.fired.shape[0]):
                raise VlsafeError("gated: a cached continuation without its prompt's forward")
            return None
        if ids is None:
            raise VlsafeError("gated: needs input_ids to record its decisions (got inputs_embeds)")
        mask = kwargs.get("attention_mask")
        self.fired, self.scores = None, None
        self._pending = (ids, torch.ones_like(ids) if mask is None else mask)
        if not self.inline:
            self._own_forward(args, kwargs)
        return None

    def _leave(self, *_: Any) -> None:
        self._depth -= 1

    def _own_forward(self, args: tuple, kwargs: dict) -> None:
        """Read the condition with a forward that stops after its layer (the action held back everywhere)."""
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")}
        self._own_pass = True
        try:
            M.unwrap(self.lm.model)(*args, **{**kw, "use_cache": False})
        except _StopPass:
            pass
        finally:
            self._own_pass = False
        if self.fired is None:
            raise VlsafeError(f"gated: the forward never reached the condition layer {self.condition.layer}")

    # ---- the condition layer -----------------------------------------------------------------------------
    def _read(self, _m: Any, args: tuple, kwargs: dict) -> None:
        # the prefill itself (inline), or the gate's own pass (depth 2) — never a forward nested deeper
        reading = (self._own_pass and self._depth == 2) if not self.inline else (self._depth == 1 and self.fired is None)
        if not reading or self._pending is None:
            return None
        h = args[0] if args else kwargs["hidden_states"]
        scores = self.condition.score(h[:, self.condition.position].detach().float()).cpu()
        self.scores, self.fired = scores, self.condition.fires(scores)
        ids, mask = self._pending
        for r in range(ids.shape[0]):
            self._records[_key(ids[r][mask[r].bool()])] = (bool(self.fired[r]), float(scores[r]))
        if self._own_pass:
            raise _StopPass
        return None

    # ---- sites: save before the action, restore the rows that did not fire after it ---------------------
    def _keep(self, n: int, device: torch.device) -> torch.Tensor | None:
        """Rows whose edits stand: None = all of them; an all-False mask in nested forwards."""
        if self._depth > 1 or self.fired is None:
            return torch.zeros(n, dtype=torch.bool, device=device)
        if self.fired.shape[0] != n:
            raise VlsafeError(f"gated: a forward of {n} rows after a prompt batch of {self.fired.shape[0]}")
        return None if bool(self.fired.all()) else self.fired.to(device)

    def _merge(self, site: tuple[str, int], edited: torch.Tensor) -> torch.Tensor:
        original = self._saved.pop(site)
        if edited is original:
            return edited
        keep = self._keep(edited.shape[0], edited.device)
        if keep is None:
            return edited
        return torch.where(keep.view(-1, *([1] * (edited.dim() - 1))), edited, original)

    def _save_input(self, layer: int) -> Any:
        def hook(_m: Any, args: tuple, kwargs: dict) -> None:
            self._saved[("in", layer)] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _restore_input(self, layer: int) -> Any:
        def hook(_m: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return edit_input(args, kwargs, lambda h: self._merge(("in", layer), h))
        return hook

    def _save_output(self, site: tuple[str, int]) -> Any:
        def hook(_m: Any, _a: Any, output: Any) -> None:
            self._saved[site] = first(output)
        return hook

    def _restore_output(self, site: tuple[str, int]) -> Any:
        def hook(_m: Any, _a: Any, output: Any) -> Any:
            return edit_first(output, lambda o: self._merge(site, o))
        return hook

    @contextlib.contextmanager
    def hooks(self) -> Iterator["Gate"]:
        """Register the gate's hooks (after the action's); removed on exit, even on error."""
        model = M.unwrap(self.lm.model)
        handles = [model.register_forward_pre_hook(self._enter, with_kwargs=True, prepend=True),
                   model.register_forward_hook(self._leave, with_kwargs=True, always_call=True)]
        try:
            for ℓ in self.layers:
                b = M.block(model, ℓ)
                handles.append(b.module.register_forward_pre_hook(self._save_input(ℓ), with_kwargs=True, prepend=True))
                handles.append(b.module.register_forward_pre_hook(self._restore_input(ℓ), with_kwargs=True))
                for name, sub in (("attn", b.attn), ("mlp", b.mlp)):
                    handles.append(sub.register_forward_hook(self._save_output((name, ℓ)), prepend=True))
                    handles.append(sub.register_forward_hook(self._restore_output((name, ℓ))))
            cond = M.block(model, self.condition.layer).module
            handles.append(cond.register_forward_pre_hook(self._read, with_kwargs=True, prepend=True))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        with removing_hooks(handles):
            yield self

    # ---- records -----------------------------------------------------------------------------------------
    def fired_for(self, prompts: Sequence[str] | Any, *, images: Any = None, system: str | None = None,
                  chat: bool = True) -> list[bool]:
        """Whether the gate fired on each prompt (strings or a `PromptSet`; `images` as in `generate`), as last
        decided under this gate. Prompts are matched by their token ids, so call it after each set's forwards
        when two sets share texts with different images. A prompt never seen → one-line error."""
        return [f for f, _ in self._lookup(prompts, images, system, chat)]

    def scores_for(self, prompts: Sequence[str] | Any, *, images: Any = None, system: str | None = None,
                   chat: bool = True) -> list[float]:
        """The condition's score for each prompt, as recorded with `fired_for`'s decisions."""
        return [s for _, s in self._lookup(prompts, images, system, chat)]

    def _lookup(self, prompts: Any, images: Any, system: str | None, chat: bool) -> list[tuple[bool, float]]:
        from vlsafe.probes.behavior.generate import load_image, prompt_texts_and_images
        from vlsafe.probes.templates import encode

        texts, specs = prompt_texts_and_images(prompts, images)
        out = []
        for i, (t, im) in enumerate(zip(texts, specs)):
            enc = encode(self.lm, [t], None if im is None else [load_image(im)], chat=chat, system=system)
            rec = self._records.get(_key(enc.input_ids[0][enc.attention_mask[0].bool()]))
            if rec is None:
                raise VlsafeError(f"gated: prompt {i} ({t[:40]!r}) was never run under this gate")
            out.append(rec)
        return out


@contextlib.contextmanager
def gated(lm: Any, condition: Condition, action: ContextManager[Any], *, layers: Sequence[int]) -> Iterator[Gate]:
    """Run `action` (an un-entered hook context, e.g. `apply_remedy(lm, spec)`) only on the prompts where
    `condition` fires; `layers` are the action's blocks (its sites). Yields the `Gate`."""
    gate = Gate(lm, condition, layers)
    with action, gate.hooks():
        yield gate


# ---- the remedy spec: kind gated ---------------------------------------------------------------------------------

class ConditionSource(BaseModel):
    """The gate's condition: a file written by `Condition.save`; `threshold` (optional) overrides the file's."""

    model_config = ConfigDict(extra="forbid")
    file: str
    threshold: float | None = None

    @field_validator("threshold", mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                raise ValueError(f"must be a number, got {v!r}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise ValueError(f"must be a number, got {v!r}")
        return v


class GatedSpec(BaseModel):
    """`kind: gated`: `action` (a steer, calibrate, project or ablate spec) applied where `condition` fires.

        kind: gated
        condition: {file: runs/gate/cond.json}          # Condition.save output; threshold: X overrides
        action: {kind: steer, layers: [20], alpha: 1.0, direction: {file: runs/probe/directions.safetensors}}
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["gated"]
    condition: ConditionSource
    action: RemedySpec
    checkpoint: str | None = None
    _source: str = PrivateAttr(default="remedy spec")

    @classmethod
    def parse(cls, raw: Any, source: str = "remedy spec", base_dir: str | os.PathLike | None = None) -> "GatedSpec":
        """Validate a mapping; the condition and the action's vector files are relative to `base_dir`."""
        if not isinstance(raw, dict):
            raise VlsafeError(f"{source}: a remedy spec must be a mapping, got {type(raw).__name__}")
        raw = dict(raw)
        if base_dir is not None:
            if isinstance(raw.get("condition"), dict) and isinstance(raw["condition"].get("file"), str):
                raw["condition"] = {**raw["condition"], "file": str(Path(base_dir) / raw["condition"]["file"])}
            if isinstance(raw.get("action"), dict):
                raw["action"] = RS._rebase(raw["action"], base_dir)
        spec = RS.validated(cls, raw, source)
        spec._source = source
        spec.action._source = f"{source} (action)"
        return spec

    @property
    def source(self) -> str:
        """Where the spec came from, for error messages."""
        return self._source

    @property
    def layers(self) -> list[int]:
        """The action's layers."""
        return self.action.layers

    @property
    def alpha(self) -> float:
        """The action's strength."""
        return self.action.alpha

    @property
    def positions(self) -> str:
        """The action's positions (`all` or `last`)."""
        return self.action.positions

    @property
    def needs_images(self) -> bool:
        """As the action."""
        return self.action.needs_images

    def load_condition(self) -> Condition:
        """The condition file, validated (errors name it), with the threshold override applied."""
        cond = Condition.load(self.condition.file)
        return cond if self.condition.threshold is None else cond.with_threshold(self.condition.threshold)

    def key(self) -> str:
        """A content hash of the condition (its files and threshold override) and of the action's key."""
        p = Path(self.condition.file)
        if not p.is_file():
            raise VlsafeError(f"{self.source}: condition file {p} does not exist")
        w = p.parent / str(json.loads(p.read_text()).get("weights") or p.with_suffix(".safetensors").name)
        parts = [RS._file_hash(p, self.source), RS._file_hash(w, self.source), str(self.condition.threshold),
                 self.action.key()]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@contextlib.contextmanager
def apply_gated(lm: Any, spec: GatedSpec) -> Iterator[Gate]:
    """`apply_remedy` for a `GatedSpec`: condition and action checked against `lm` before any hook; yields the Gate."""
    from vlsafe.probes.remedies import apply_remedy

    cond = spec.load_condition()
    RS.check_model(spec.action, lm)
    with gated(lm, cond, apply_remedy(lm, spec.action), layers=spec.action.layers) as gate:
        yield gate
