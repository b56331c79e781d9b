"""Merge plans: mergekit-compatible YAML (pydantic models) plus vlsafe's layer-targeting extensions.

mergekit keys: `merge_method`, `base_model`, `models[].model`, `models[].parameters`, global `parameters`,
`dtype` (compute), `out_dtype`, `tokenizer_source`, `chat_template`. A parameter value is

- a scalar;
- a **gradient** (a list): numeric lists interpolate over layer depth t = layer/(L−1) (u = t(n−1), linear
  between entries ⌊u⌋ and ⌊u⌋+1), non-numeric lists step; non-layer tensors (embeddings, final norm,
  `lm_head`) use t = 0; a one-layer model uses t = 1 for its layer (as mergekit does);
- a **filter list** `[{filter, value}, …]`: the first entry whose filter is a substring of the tensor name
  wins; no filter or `"*"` matches everything (put the fallback last); no match falls through to the next
  scope.

Precedence: `layer_coefficients` > per-model `parameters` > global `parameters` (shared parameters such as
`lambda`, `normalize`, `t` only come from the global scope, as in mergekit).

**Names.** Filters are evaluated on vlsafe's *canonical* names (`model.layers.3.self_attn.q_proj.weight`,
`lm_head.weight`, `vision.*`, `projector.*`). For text Llama-style checkpoints these equal mergekit's names,
so plans give identical results in both tools; on an LVLM, write filters against the canonical names.

vlsafe extensions (exported to plain mergekit YAML by `vlsafe.analysis.merging.export`):
- a per-layer coefficient map as a parameter value: `weight: {layers: {12: 0.8, 13: 0.8}, default: 0.0}`
  (layers not listed, and non-layer tensors, take `default`, or fall through when it is absent);
- `layer_coefficients: {12: 0.8}` on a model entry: shorthand for a per-layer `weight` map that wins over
  the model's other `weight` settings;
- `layers: [10, 11, 12]`: merge only these language-model layers, copy every other tensor from the base;
- `modules: [q_proj, mlp]`: merge only these modules (labels of `vlsafe.analysis.names.layer_module`; `mlp` matches
  `mlp.*`, `self_attn` matches q/k/v/o_proj, `embed`, `norm`, `lm_head`, `vision`, `projector` work too);
- `seed`: seeds DARE's masks (per tensor, independent of execution order).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, field_validator

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.merging.methods import REQUIRED, MethodSpec, method_spec
from vlsafe.analysis.yamlfile import parse_yaml

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class Conditional(BaseModel):
    """One entry of a filter list: `value` applies to tensors whose name contains `filter`."""

    model_config = ConfigDict(extra="forbid")
    value: ScalarOrGradient
    filter: str | None = None


class LayerMap(BaseModel):
    """vlsafe: explicit per-layer values; other tensors take `default` (or fall through when None)."""

    model_config = ConfigDict(extra="forbid")
    layers: dict[int, float]
    default: ScalarOrGradient | None = None


Setting = Union[LayerMap, Conditional, list[Conditional], Scalar, list[Scalar]]


class ModelEntry(BaseModel):
    """One input model: a checkpoint spec, its parameters and (vlsafe) per-layer weights."""

    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Setting] | None = None
    layer_coefficients: dict[int, float] | None = None


_UNSUPPORTED = {"slices": "'slices' (layer stacking) is not supported yet; use 'models' (and vlsafe 'layers')",
                "tokenizer": "'tokenizer' (vocabulary merging) is not supported yet; use 'tokenizer_source'"}


class MergePlan(BaseModel):
    """A validated merge configuration (mergekit YAML + vlsafe extensions)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry]
    parameters: dict[str, Setting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    layers: list[int] | None = None
    modules: list[str] | None = None
    seed: int | None = None

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        method_spec(v)
        return v

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "MergePlan":
        """Validate a parsed YAML mapping; every problem is a one-line `VlsafeError` naming the key."""
        if not isinstance(d, dict):
            raise VlsafeError(f"{source}: a merge config must be a YAML mapping")
        for key, why in _UNSUPPORTED.items():
            if d.get(key) is not None:
                raise VlsafeError(f"{source}: {why}")
        if isinstance(d.get("modules"), dict):
            raise VlsafeError(f"{source}: mergekit's per-module 'modules:' mapping is not supported yet "
                              "(vlsafe's 'modules:' is a list of module labels to merge)")
        known = set(cls.model_fields)
        for key in d:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise VlsafeError(f"{source}: unknown key '{key}'{hint}; valid: {', '.join(sorted(known))}")
        try:
            plan = cls.model_validate(d)
        except VlsafeError as e:
            raise VlsafeError(f"{source}: {e}") from None
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("function-", "union[")))
            raise VlsafeError(f"{source}: {loc}: {err['msg']}") from None
        plan.validate_structure(source)
        return plan

    @classmethod
    def from_yaml(cls, text: str, source: str = "config", base_dir: str | os.PathLike | None = None) -> "MergePlan":
        """Parse YAML text; relative model paths that exist under `base_dir` (not the cwd) are made absolute."""
        plan = cls.from_dict(parse_yaml(text, source), source)
        return plan.with_paths_from(Path(base_dir)) if base_dir is not None else plan

    def with_paths_from(self, base_dir: Path) -> "MergePlan":
        """A copy whose relative model paths are resolved against `base_dir` when they only exist there."""
        def fix(spec: str | None) -> str | None:
            if spec is None or Path(spec).expanduser().exists() or Path(spec).is_absolute():
                return spec
            cand = base_dir / spec
            return str(cand.resolve()) if cand.exists() else spec
        models = [m.model_copy(update={"model": fix(m.model)}) for m in self.models]
        return self.model_copy(update={"base_model": fix(self.base_model), "models": models,
                                       "tokenizer_source": fix(self.tokenizer_source)})

    # ---- structure ---------------------------------------------------------------------------------------
    @property
    def spec(self) -> MethodSpec:
        return method_spec(self.merge_method)

    def inputs(self) -> list[str]:
        """Input model specs in mergekit's order: `models`, then the base when it is not among them."""
        specs = [m.model for m in self.models]
        if self.base_model is not None and self.base_model not in specs:
            specs.append(self.base_model)
        return specs

    def layout_model(self) -> str:
        """The model whose names, layout, config and tokenizer the output keeps: base, else the first."""
        return self.base_model or self.models[0].model

    def contributors(self) -> list[str]:
        """Inputs that carry per-model parameters: all for `linear`, the non-base ones otherwise."""
        return [s for s in self.inputs() if self.spec.base_has_params or s != self.base_model]

    def validate_structure(self, source: str = "config") -> None:
        """Checks that need no checkpoint: base, input counts, parameter names and values."""
        spec = self.spec
        if not self.models:
            raise VlsafeError(f"{source}: 'models' is empty")
        specs = [m.model for m in self.models]
        dup = next((s for s in specs if specs.count(s) > 1), None)
        if dup:
            raise VlsafeError(f"{source}: model '{dup}' is listed twice")
        if spec.needs_base and self.base_model is None:
            raise VlsafeError(f"{source}: merge_method '{spec.name}' needs a base_model")
        if spec.exact_inputs and len(self.inputs()) != spec.exact_inputs:
            raise VlsafeError(f"{source}: '{spec.name}' takes exactly {spec.exact_inputs} models (the base and one "
                              f"other), got {len(self.inputs())}")
        if (self.layers is not None or self.modules is not None) and self.base_model is None:
            raise VlsafeError(f"{source}: 'layers'/'modules' selections copy the rest from base_model; set one")
        if self.layers is not None and (len(set(self.layers)) != len(self.layers) or min(self.layers, default=0) < 0):
            raise VlsafeError(f"{source}: layers {self.layers} must be distinct non-negative layer indices")
        self._check_names(self.parameters, set(spec.parameters), "parameters", source)
        for i, m in enumerate(self.models):
            where = f"models[{i}] ({m.model})"
            self._check_names(m.parameters, set(spec.per_model), f"{where}.parameters", source, shared=spec.shared)
            if m.layer_coefficients is not None and "weight" not in spec.per_model:
                raise VlsafeError(f"{source}: {where}.layer_coefficients: '{spec.name}' has no per-model weight "
                                  "(for slerp use parameters: {t: {layers: {...}}})")
        if self.chat_template is not None and "{" not in self.chat_template:
            raise VlsafeError(f"{source}: chat_template '{self.chat_template}': named templates are not supported "
                              "yet; give the Jinja text")
        for dt in (self.dtype, self.out_dtype):
            if dt is not None:
                from vlsafe.analysis.loading import as_dtype
                as_dtype(dt)

    @staticmethod
    def _check_names(params: dict[str, Any] | None, valid: set[str], where: str, source: str,
                     shared: dict[str, Any] | None = None) -> None:
        for name in params or {}:
            if shared and name in shared:
                raise VlsafeError(f"{source}: {where}: '{name}' is a global parameter; set it under top-level "
                                  "'parameters'")
            if name not in valid:
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise VlsafeError(f"{source}: {where}: unknown parameter '{name}'{hint}; valid: "
                                  f"{', '.join(sorted(valid))}")

    def check_layers(self, num_layers: int, source: str = "config") -> None:
        """Every layer index named by the plan must exist in a model with `num_layers` layers."""
        def bad(layers: Any, where: str) -> None:
            out = [i for i in layers if not 0 <= i < num_layers]
            if out:
                raise VlsafeError(f"{source}: {where}: layer {out[0]} out of range (the base has {num_layers} "
                                  f"layers, 0..{num_layers - 1})")
        if self.layers is not None:
            bad(self.layers, "layers")
        scopes = [("parameters", self.parameters)] + [(f"models[{i}].parameters", m.parameters)
                                                     for i, m in enumerate(self.models)]
        for where, params in scopes:
            for name, setting in (params or {}).items():
                if isinstance(setting, LayerMap):
                    bad(setting.layers, f"{where}.{name}")
        for i, m in enumerate(self.models):
            bad(m.layer_coefficients or {}, f"models[{i}].layer_coefficients")

    def has_extensions(self) -> bool:
        """True when the plan uses vlsafe-only features (per-layer maps, selections)."""
        maps = any(isinstance(s, LayerMap) for p in [self.parameters, *(m.parameters for m in self.models)]
                   for s in (p or {}).values())
        return maps or any(m.layer_coefficients for m in self.models) or self.layers is not None \
            or self.modules is not None

    def to_mergekit_yaml(self, names: Any = None, num_layers: int | None = None,
                         rename: dict[str, str] | None = None) -> str:
        """Plain mergekit YAML for this plan (see `vlsafe.analysis.merging.export`)."""
        from vlsafe.analysis.merging.export import to_mergekit_yaml

        return to_mergekit_yaml(self, names, num_layers, rename)

    # ---- per-tensor resolution ---------------------------------------------------------------------------
    def selects(self, layer: int | None, module: str) -> bool:
        """Whether a tensor at (`layer`, `module`) is merged (else it is copied from the base)."""
        if self.layers is not None and layer not in self.layers:
            return False
        return self.modules is None or any(module_matches(module, m) for m in self.modules)

    def resolve(self, name: str, layer: int | None, num_layers: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(shared parameters, per-model parameters aligned with `contributors()`) for one tensor."""
        spec = self.spec
        t = depth(layer, num_layers)
        shared = {p: _resolve(p, d, [self.parameters], name, t, layer, spec) for p, d in spec.shared.items()}
        by_spec = {m.model: m for m in self.models}
        per_model = []
        for s in self.contributors():
            entry = by_spec.get(s)
            scopes: list[dict[str, Any] | None] = []
            if entry is not None:
                if entry.layer_coefficients:
                    scopes.append({"weight": LayerMap(layers=entry.layer_coefficients)})
                scopes.append(entry.parameters)
            scopes.append(self.parameters)
            values = {p: _resolve(p, d, scopes, name, t, layer, spec, model=s) for p, d in spec.per_model.items()}
            if "density" in values and not 0.0 < values["density"] <= 1.0:
                raise VlsafeError(f"density {values['density']} for model {s}, tensor {name} is outside (0, 1]")
            if "gamma" in values and not 0.0 <= values["gamma"] < 1.0:
                raise VlsafeError(f"gamma {values['gamma']} for model {s}, tensor {name} is outside [0, 1)")
            per_model.append(values)
        return shared, per_model


def module_matches(module: str, wanted: str) -> bool:
    """`module` (a `layer_module` label) is `wanted` or inside it (`mlp` ⊇ `mlp.down_proj`)."""
    if wanted in ("self_attn", "attn"):
        return module in ("q_proj", "k_proj", "v_proj", "o_proj") or module.startswith("self_attn.")
    return module == wanted or module.startswith(wanted + ".")


def depth(layer: int | None, num_layers: int) -> float:
    """Gradient position t: layer/(L−1) for layer tensors (1 when L = 1), 0 for non-layer tensors."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


_ADAPTERS = {float: TypeAdapter(float), bool: TypeAdapter(bool), str: TypeAdapter(str)}


def evaluate_setting(name: str, setting: Any, t: float, layer: int | None, validate: Any) -> Any:
    """mergekit's evaluation of one setting for tensor `name` at depth `t` (None when nothing applies)."""
    if isinstance(setting, LayerMap):
        if layer is not None and layer in setting.layers:
            return validate(setting.layers[layer])
        return None if setting.default is None else evaluate_setting(name, setting.default, t, layer, validate)
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return validate(setting)
    if not isinstance(setting, list) or not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [validate(e) for e in setting]
        if any(isinstance(v, str) for v in values):
            raise VlsafeError(f"tensor {name}: a gradient (list of values) needs numbers, got {setting!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        u = t * (len(values) - 1)
        i0 = int(u)
        i1 = min(len(values) - 1, i0 + 1)
        frac = u - i0
        return validate((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        if cond.filter is None or cond.filter == "*" or (name and cond.filter in name):
            return evaluate_setting(name, cond.value, t, layer, validate)
    return None


def _resolve(param: str, default: Any, scopes: list[dict[str, Any] | None], name: str, t: float,
             layer: int | None, spec: MethodSpec, model: str | None = None) -> Any:
    adapter = _ADAPTERS[spec.types[param]]

    def validate(v: Any) -> Any:
        try:
            return adapter.validate_python(v)
        except ValidationError:
            raise VlsafeError(f"parameter '{param}' for {name}: {v!r} is not a {spec.types[param].__name__}") from None
    for scope in scopes:
        if scope and param in scope:
            value = evaluate_setting(name, scope[param], t, layer, validate)
            if value is not None:
                return value
    if default is REQUIRED:
        where = f"model {model}, " if model else ""
        raise VlsafeError(f"missing required parameter '{param}' ({where}tensor {name})")
    return default


def load_plan(path: str | os.PathLike) -> MergePlan:
    """Read a merge YAML file; relative model paths resolve against the cwd, then the file's folder."""
    p = Path(path)
    if not p.is_file():
        raise VlsafeError(f"{p}: no such merge config")
    return MergePlan.from_yaml(p.read_text(), source=str(p), base_dir=p.parent)
