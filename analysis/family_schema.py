"""The schema of a family file (`analysis/families/<name>.json`), validated on load.

A family file says how to recognise a checkpoint (`match`), how to rename its saved tensors to canonical names
(`rules`), and where its parts live in the loaded `transformers` model (`modules`): dotted paths relative to the
top-level model in memory (`LlavaForConditionalGeneration`, `LlamaForCausalLM`, ...), and per-block paths
relative to one decoder block. `cross_attention` (mllama) names the config key that lists the cross-attention
layer indices and those blocks' own sub-module paths. `overrides` patches `modules` for one `model_type`
(e.g. Starcoder2's MLP writes through `mlp.c_proj`). A null path means the family has no such part.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vlsafe.analysis.errors import VlsafeError

_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def _check_path(v: str | None) -> str | None:
    if v is not None and not _PATH.match(v):
        raise ValueError(f"{v!r} is not a dotted module path")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BlockPaths(_Strict):
    """Paths relative to one decoder block. `attn`/`mlp` are the sub-modules whose outputs are added to the
    residual stream; `attn_out`/`mlp_out` the linears that write them (o_proj, down_proj)."""

    attn: str
    attn_out: str | None = None
    mlp: str
    mlp_out: str | None = None
    input_norm: str | None = None
    post_attn_norm: str | None = None

    @field_validator("*")
    @classmethod
    def _dotted(cls, v: str | None) -> str | None:
        return _check_path(v)


class CrossAttention(_Strict):
    """Cross-attention blocks interleaved with the self-attention ones (mllama): which layer indices they are
    (read from the language model's config under `layers_key`) and their own block paths."""

    layers_key: str
    block: BlockPaths


class ModulePaths(_Strict):
    """Paths relative to the top-level model in memory (`language_model` may be "": the model itself)."""

    language_model: str
    layers: str
    embed: str
    final_norm: str | None = None
    lm_head: str | None = None
    vision_tower: str | None = None
    projector: str | None = None
    projector_out: str | None = None  # the projector's last linear, when it writes image tokens into the stream
    block: BlockPaths
    cross_attention: CrossAttention | None = None

    @field_validator("language_model")
    @classmethod
    def _root_ok(cls, v: str) -> str:
        return v if v == "" else _check_path(v)  # "" = the top-level model itself

    @field_validator("layers", "embed", "final_norm", "lm_head", "vision_tower", "projector", "projector_out")
    @classmethod
    def _dotted(cls, v: str | None) -> str | None:
        return _check_path(v)


class Match(_Strict):
    model_type: list[str] = Field(default_factory=list)
    architectures: list[str] = Field(default_factory=list)


class FamilySpec(_Strict):
    """One family file."""

    name: str
    description: str = ""
    kind: Literal["text", "lvlm"]
    match: Match
    text_config: str | None = None
    rules: list[tuple[str, str]]
    modules: ModulePaths
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("rules")
    @classmethod
    def _compile(cls, rules: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for pattern, _ in rules:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"rule {pattern!r}: {e}") from None
        return rules

    def modules_for(self, model_type: str | None) -> ModulePaths:
        """`modules` with this `model_type`'s override applied (block keys merge into `block`)."""
        patch = self.overrides.get(model_type or "")
        if not patch:
            return self.modules
        base = self.modules.model_dump()
        block = {**base["block"], **patch.get("block", {})}
        return ModulePaths.model_validate({**base, **{k: v for k, v in patch.items() if k != "block"},
                                           "block": block})


def load_spec(text: str, source: str) -> FamilySpec:
    """Parse and validate one family file; any problem is a one-line `VlsafeError` naming `source`."""
    where = ""
    try:
        spec = FamilySpec.model_validate_json(text)
        for model_type in spec.overrides:
            where = f"overrides.{model_type}."
            spec.modules_for(model_type)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        raise VlsafeError(f"{source}: {where}{loc}: {err['msg']}") from None
    return spec
