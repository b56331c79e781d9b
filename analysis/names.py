"""Canonical tensor names: families as data, raw → canonical mapping, and the shared layer axis.

Inside vlsafe a language-model tensor is named as in a text-only Llama-style HF model
(`model.layers.{i}.self_attn.q_proj.weight`, `model.embed_tokens.weight`, `lm_head.weight`); vision tower
tensors live under `vision.*` and projector tensors under `projector.*`. Each family is a JSON file in
`analysis/families/` holding ordered regex rules; the first matching rule wins. When no family matches,
`guess_family` builds rules from the names themselves and says what it guessed — pairing is never positional.
Projector tensors are named by role (`projector.linear_1.*` is the first linear in both LLaVA layouts).
Each file is validated on load by `vlsafe.analysis.family_schema.FamilySpec`; its `modules` section (where the
parts live in the model in memory) is read by `vlsafe.analysis.adapters`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.family_schema import FamilySpec, ModulePaths, load_spec

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+?)(?:\.(weight|bias))?$")
_NAMESPACES = {"model": "language", "lm_head": "language", "vision": "vision", "projector": "projector"}


@dataclass(frozen=True)
class Family:
    """A checkpoint family: how to recognise it and how to rename its tensors."""

    name: str
    kind: str  # "text" or "lvlm"
    rules: tuple[tuple[str, str], ...]
    description: str = ""
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    text_config: str | None = None
    cross_attention_layers: str | None = None
    note: str = ""  # set by the automatic fallback: what was guessed
    spec: FamilySpec | None = field(default=None, compare=False, repr=False)  # the validated family file
    _compiled: tuple[tuple[re.Pattern[str], str], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple((re.compile(p), r) for p, r in self.rules))

    @property
    def is_lvlm(self) -> bool:
        return self.kind == "lvlm"

    def modules(self, model_type: str | None = None) -> ModulePaths | None:
        """Where this family's parts live in the model in memory (`model_type` overrides applied); None when
        the family was guessed from tensor names."""
        return self.spec.modules_for(model_type) if self.spec is not None else None

    def canonical(self, raw: str) -> str | None:
        """The canonical name of raw tensor `raw`, or None when no rule matches."""
        for pattern, repl in self._compiled:
            if pattern.match(raw):
                return pattern.sub(repl, raw)
        return None


@lru_cache(maxsize=1)
def families() -> dict[str, Family]:
    """All families shipped as data in `analysis/families/*.json`, by name."""
    out: dict[str, Family] = {}
    for entry in sorted(resources.files("vlsafe.analysis.families").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        d = load_spec(entry.read_text(), f"analysis/families/{entry.name}")
        cross = d.modules.cross_attention
        out[d.name] = Family(
            name=d.name, kind=d.kind, rules=tuple(tuple(r) for r in d.rules), description=d.description,
            model_types=tuple(d.match.model_type), architectures=tuple(d.match.architectures),
            text_config=d.text_config, cross_attention_layers=cross.layers_key if cross else None, spec=d,
        )
    return out


def match_family(config: dict[str, Any] | None) -> Family | None:
    """The family whose `architectures` (preferred) or `model_type` matches an HF config dict."""
    if not config:
        return None
    archs = set(config.get("architectures") or [])
    for fam in families().values():
        if archs & set(fam.architectures):
            return fam
    model_type = config.get("model_type")
    for fam in families().values():
        if model_type in fam.model_types:
            return fam
    return None


def guess_family(raw_names: Iterable[str], source: str) -> Family:
    """Build rules for an unknown layout from its names, explaining the guess; errors if nothing fits.

    The language model is the prefix `P` that owns `P.layers.{i}.*` with the most tensors; tensors under
    prefixes containing `vision`/`visual` go to `vision.*`, `projector`/`connector`/`mm_projector` to
    `projector.*`; a head is any `*lm_head.*`.
    """
    names = list(raw_names)
    prefixes = Counter(m.group(1) for n in names if (m := re.match(r"^(.*?)\.?layers\.\d+\.", n)))
    if not prefixes:
        raise VlsafeError(f"{source}: unknown checkpoint family and no '<prefix>.layers.N.' tensors to guess from")
    lm_prefix = max(prefixes, key=lambda p: (("vision" not in p and "visual" not in p), prefixes[p]))
    esc = re.escape(lm_prefix) + r"\." if lm_prefix else ""
    rules = [(f"^{esc}(layers\\..+|embed_tokens\\..+|norm\\..+)$", "model.\\1")]
    rules += [(r"^(?:.*\.)?lm_head\.(.+)$", "lm_head.\\1")]
    rules += [(r"^(?:.*?\.)?\w*(?:projector|connector)\w*\.(.+)$", "projector.\\1")]
    rules += [(r"^(?:.*?\.)?\w*(?:vision|visual)\w*\.(.+)$", "vision.\\1")]
    kind = "lvlm" if any(re.search(r"vision|visual|projector|connector", n) for n in names) else "text"
    note = (f"unknown family: guessed the language model is '{lm_prefix or '<root>'}.layers.N' "
            f"({prefixes[lm_prefix]} tensors); vision/projector by name keywords")
    return Family(name="guessed", kind=kind, rules=tuple(rules), note=note)


def canonicalize(raw_names: Iterable[str], family: Family, source: str) -> dict[str, str]:
    """Map raw → canonical for every name; unmatched names keep an `other.` prefix; collisions are errors."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for raw in raw_names:
        canon = family.canonical(raw) or f"other.{raw}"
        if canon in seen:
            raise VlsafeError(f"{source}: tensors '{seen[canon]}' and '{raw}' both map to '{canon}'")
        seen[canon] = raw
        out[raw] = canon
    return out


def namespace(canonical: str) -> str:
    """`language`, `vision`, `projector` or `other` for a canonical name."""
    return _NAMESPACES.get(canonical.split(".", 1)[0], "other")


def layer_module(canonical: str) -> tuple[int | None, str]:
    """The shared layer axis: (layer index or None, module label) of a canonical name.

    Modules: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `mlp.gate_proj`, `mlp.up_proj`, `mlp.down_proj`,
    `input_layernorm`, `post_attention_layernorm`, `cross_attn.*` …; outside layers: `embed`, `norm`,
    `lm_head`, `vision`, `projector`.
    """
    m = _LAYER_RE.match(canonical)
    if m:
        module = m.group(2)
        return int(m.group(1)), module[len("self_attn."):] if module.startswith("self_attn.") else module
    if canonical.startswith("model.embed_tokens."):
        return None, "embed"
    if canonical.startswith("model.norm."):
        return None, "norm"
    if canonical.startswith("lm_head."):
        return None, "lm_head"
    ns = namespace(canonical)
    if ns in ("vision", "projector"):
        return None, ns
    return None, canonical.rsplit(".", 1)[0].removeprefix("model.").removeprefix("other.")


def text_config(config: dict[str, Any], family: Family) -> dict[str, Any]:
    """The language model's config dict (the LVLM's `text_config`, or the config itself)."""
    if family.text_config and isinstance(config.get(family.text_config), dict):
        return config[family.text_config]
    return config


def cross_attention_layers(config: dict[str, Any], family: Family) -> list[int]:
    """Layer indices that are cross-attention layers (mllama), else []."""
    if not family.cross_attention_layers:
        return []
    return list(text_config(config, family).get(family.cross_attention_layers) or [])
