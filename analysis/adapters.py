"""Family adapters: where a loaded model's parts live, read from its family file and nowhere else.

Every piece of vlsafe that touches a model's modules (capture, ablation, orthogonalisation, layer scaling,
device maps, fine-tuning) asks `adapter(model)`. The paths come from the `modules` section of
`analysis/families/<family>.json` (see `vlsafe.analysis.family_schema`); a model of no known family gets
paths from `guess_paths`, the one structural search, which says what it guessed (`Adapter.note`).

>>> ad = adapter(lm)                       # a LoadedModel, or a transformers model (family from its config)
>>> ad.paths.layers, ad.cross_attention_layers()
('model.language_model.layers', [3, 8, 13])
>>> b = ad.block(3); b.cross, b.attn_out   # mllama layer 3: cross_attn and cross_attn.o_proj
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from vlsafe.analysis import names as N
from vlsafe.analysis.checkpoints import LoadedModel
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.family_schema import BlockPaths, ModulePaths

PARTS = ("language", "vision", "projector")


@dataclass(frozen=True)
class Block:
    """One decoder block and its parts (None where the family has no such part)."""

    index: int
    module: nn.Module
    paths: BlockPaths
    cross: bool  # a cross-attention block (mllama): its `attn` attends to the image, not the text
    attn: nn.Module
    attn_out: nn.Module | None
    mlp: nn.Module
    mlp_out: nn.Module | None
    input_norm: nn.Module | None
    post_attn_norm: nn.Module | None


class Adapter:
    """A model seen through its family's module paths. `source` names where the paths came from."""

    def __init__(self, model: nn.Module, paths: ModulePaths, family: str, source: str, note: str = "") -> None:
        self.model, self.paths, self.family, self.source, self.note = model, paths, family, source, note

    def __repr__(self) -> str:
        return f"Adapter({type(self.model).__name__}, family={self.family}, source={self.source})"

    def _get(self, root: nn.Module, path: str | None, what: str) -> nn.Module | None:
        if path is None:
            return None
        try:
            return root.get_submodule(path)
        except AttributeError:
            raise VlsafeError(f"{self.source}: {what} path '{path}' is not a module of "
                              f"{type(root).__name__}") from None

    def module(self, part: str) -> nn.Module | None:
        """A top-level part by its `modules` key (`layers`, `embed`, `final_norm`, `lm_head`, `projector` ...)."""
        return self._get(self.model, getattr(self.paths, part), part)

    def require(self, part: str) -> nn.Module:
        """Like `module`, but a part the family lacks is an error."""
        mod = self.module(part)
        if mod is None:
            raise VlsafeError(f"{self.source}: the {self.family} family has no {part}")
        return mod

    def layers(self) -> nn.ModuleList:
        """The language model's decoder blocks, in order (the shared vlsafe layer axis)."""
        layers = self.require("layers")
        if not isinstance(layers, nn.ModuleList):
            raise VlsafeError(f"{self.source}: layers path '{self.paths.layers}' is a "
                              f"{type(layers).__name__}, not a ModuleList")
        return layers

    def cross_attention_layers(self) -> list[int]:
        """Indices of cross-attention blocks (mllama), read from the config key the family names; else []."""
        cross = self.paths.cross_attention
        if cross is None:
            return []
        cfg = getattr(self.language_model(), "config", None) or getattr(self.model, "config", None)
        return sorted(int(i) for i in (getattr(cfg, cross.layers_key, None) or []))

    def language_model(self) -> nn.Module:
        """The text decoder stack (owner of the layers, the embedding and the final norm)."""
        return self.require("language_model")

    def block_paths(self, index: int) -> tuple[BlockPaths, bool]:
        """(block paths, is a cross-attention block) for decoder block `index`."""
        cross = self.paths.cross_attention
        if cross is not None and index in self.cross_attention_layers():
            return cross.block, True
        return self.paths.block, False

    def block(self, index: int) -> Block:
        """Decoder block `index` and its parts."""
        layers = self.layers()
        if not -len(layers) <= index < len(layers):
            raise VlsafeError(f"layer {index} out of range for a {len(layers)}-layer model")
        index %= len(layers)
        mod = layers[index]
        paths, cross = self.block_paths(index)
        get = lambda key: self._get(mod, getattr(paths, key), f"layer {index} {key}")  # noqa: E731
        return Block(index, mod, paths, cross, get("attn"), get("attn_out"), get("mlp"), get("mlp_out"),
                     get("input_norm"), get("post_attn_norm"))

    def blocks(self) -> list[Block]:
        """Every decoder block with its parts."""
        return [self.block(i) for i in range(len(self.layers()))]

    def part_of(self, name: str) -> str:
        """`vision`, `projector` or `language` for an in-memory parameter or module name (a wrapper's
        prefix such as PEFT's `base_model.model.` is allowed)."""
        dotted = "." + name + "."
        for part, path in (("projector", self.paths.projector), ("vision", self.paths.vision_tower)):
            if path is not None and f".{path}." in dotted:
                return part
        return "language"


def _config_of(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return {"architectures": getattr(cfg, "architectures", None), "model_type": getattr(cfg, "model_type", None)}


def _base(model: Any) -> nn.Module:
    """The transformers model inside a `LoadedModel` or a PEFT wrapper."""
    model = model.model if isinstance(model, LoadedModel) else model
    if not isinstance(model, nn.Module):
        raise VlsafeError(f"expected a torch model or LoadedModel, got {type(model).__name__}")
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__name__.startswith("Peft"):
        model = get_base()
    return model


def adapter(model: Any) -> Adapter:
    """The adapter of a `LoadedModel` (its checkpoint's family) or a transformers model (family from
    `config.architectures` / `model_type`); a model of no known family gets `guess_paths`."""
    fam = getattr(getattr(model, "checkpoint", None), "family", None)
    base = _base(model)
    fam = fam if fam is not None and fam.spec is not None else N.match_family(_config_of(base))
    if fam is None or fam.spec is None:
        paths, note = guess_paths(base)
        return Adapter(base, paths, "guessed", f"guessed layout of {type(base).__name__}", note)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    return Adapter(base, fam.modules(model_type), fam.name, f"analysis/families/{fam.name}.json")


# ---- the one structural fallback ------------------------------------------------------------------------------
_ATTN = ("self_attn", "attention", "attn", "self_attention")
_MLP = ("mlp", "feed_forward", "ffn")
_ATTN_OUT = ("o_proj", "out_proj", "dense", "c_proj")
_MLP_OUT = ("down_proj", "fc2", "w2", "c_proj", "dense_4h_to_h")


def _first(mod: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(mod, n, None), nn.Module)), None)


def guess_paths(model: nn.Module) -> tuple[ModulePaths, str]:
    """Module paths for a model of no known family, by structure, and a note saying what was guessed.

    The layers are the largest `ModuleList` outside any vision tower whose items have an attention and an MLP
    child; their owner is the language model; embedding, final norm and head by common names.
    """
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if "vision" in name or "visual" in name or not isinstance(mod, nn.ModuleList) or len(mod) <= best_n:
            continue
        if all(_first(b, _ATTN) and _first(b, _MLP) for b in mod):
            best, best_n = name, len(mod)
    if best is None:
        raise VlsafeError(f"{type(model).__name__}: no known family and no list of decoder blocks (items with an "
                          f"attention and an MLP child) to guess from")
    owner = best.rpartition(".")[0]
    lm = model.get_submodule(owner)
    pre = owner + "." if owner else ""
    first = model.get_submodule(best)[0]
    attn, mlp = _first(first, _ATTN), _first(first, _MLP)
    attn_out = _first(getattr(first, attn), _ATTN_OUT)
    mlp_out = _first(getattr(first, mlp), _MLP_OUT)
    emb = next((n for n in ("embed_tokens", "wte", "embed_in", "word_embeddings") if hasattr(lm, n)), None)
    norm = _first(lm, ("norm", "final_layernorm", "ln_f", "final_norm"))
    head = next((n for n in ("lm_head", "embed_out") if isinstance(getattr(model, n, None), nn.Module)), None)
    if emb is None:
        raise VlsafeError(f"{type(model).__name__}: no known family and no token embedding beside '{best}'")
    paths = ModulePaths(
        language_model=owner, layers=best, embed=pre + emb,
        final_norm=pre + norm if norm else None, lm_head=head,
        block=BlockPaths(attn=attn, attn_out=f"{attn}.{attn_out}" if attn_out else None, mlp=mlp,
                         mlp_out=f"{mlp}.{mlp_out}" if mlp_out else None,
                         input_norm=_first(first, ("input_layernorm", "ln_1")),
                         post_attn_norm=_first(first, ("post_attention_layernorm", "ln_2"))))
    note = (f"no family file matches {type(model).__name__}: guessed layers '{best}' ({best_n} blocks), "
            f"attention '{attn}', MLP '{mlp}', embedding '{paths.embed}'")
    return paths, note
