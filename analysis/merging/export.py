"""Export any vlsafe merge plan as plain mergekit YAML that resolves to the same coefficients.

- Per-layer maps (`{layers: {12: 0.8}, default: …}`, `layer_coefficients`) become filter lists
  `[{filter: "model.layers.12.", value: 0.8}, …, {value: default}]`. The trailing dot keeps `layers.1.` from
  matching `layers.12.`, and the `model.` prefix keeps it off vision-tower layers (`encoder.layers.N.`).
- Layer/module selections need the tensor names: every parameter is resolved per tensor, the "copy the
  base" tensors get the method's neutral value (`lambda: 0` for the task-arithmetic family, `t: 0` for
  slerp, base weight 1 / others 0 for linear), and the values are compressed into per-layer or per-tensor
  filter lists with the most common value as the fallback.
- Whenever names are given, the export is checked by resolving both plans on every tensor; a per-layer
  filter that would catch a wrong tensor falls back to exact per-tensor filters.

mergekit applies filters to its own tensor names; for text Llama checkpoints those equal vlsafe's canonical
names. DARE masks are not reproducible across tools (mergekit draws from the global torch RNG).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping

import yaml

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.merging.config import Conditional, LayerMap, MergePlan
from vlsafe.analysis.merging.methods import REQUIRED
from vlsafe.analysis.names import layer_module


def _entries(setting: Any) -> list[dict[str, Any]]:
    """A setting as a list of mergekit filter entries (for concatenation)."""
    if isinstance(setting, LayerMap):
        out = [{"filter": f"model.layers.{i}.", "value": v} for i, v in sorted(setting.layers.items())]
        return out + ([] if setting.default is None else [{"value": setting.default}])
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, list) and setting and isinstance(setting[0], Conditional):
        return [c.model_dump(exclude_none=True) for c in setting]
    return [{"value": setting}]


def _simplify(entries: list[dict[str, Any]]) -> Any:
    if len(entries) == 1 and "filter" not in entries[0]:
        return entries[0]["value"]
    return entries


def _params(params: Mapping[str, Any] | None, layer_coefficients: Mapping[int, float] | None = None) -> dict:
    out = {name: _simplify(_entries(s)) for name, s in (params or {}).items()}
    if layer_coefficients:
        lc = _entries(LayerMap(layers=dict(layer_coefficients)))
        out["weight"] = _simplify(lc + (_entries(params["weight"]) if params and "weight" in params else []))
    return out


def _header(plan: MergePlan, rename: Mapping[str, str]) -> dict[str, Any]:
    d: dict[str, Any] = {"merge_method": plan.merge_method}
    if plan.base_model:
        d["base_model"] = rename.get(plan.base_model, plan.base_model)
    return d


def _tail(plan: MergePlan, d: dict[str, Any], rename: Mapping[str, str]) -> dict[str, Any]:
    for key in ("dtype", "out_dtype", "chat_template"):
        if getattr(plan, key) is not None:
            d[key] = getattr(plan, key)
    if plan.tokenizer_source is not None:
        d["tokenizer_source"] = rename.get(plan.tokenizer_source, plan.tokenizer_source)
    return d


def _compact(plan: MergePlan, rename: Mapping[str, str]) -> dict[str, Any]:
    d = _header(plan, rename)
    d["models"] = []
    for m in plan.models:
        entry: dict[str, Any] = {"model": rename.get(m.model, m.model)}
        params = _params(m.parameters, m.layer_coefficients)
        if params:
            entry["parameters"] = params
        d["models"].append(entry)
    if plan.parameters:
        d["parameters"] = _params(plan.parameters)
    return _tail(plan, d, rename)


def _compress(values: dict[str, Any], by_layer: bool) -> Any:
    """Filter list reproducing `values` (name → value, None = don't care); most common value last."""
    concrete = [v for v in values.values() if v is not None]
    if not concrete:
        return None
    fallback = Counter(concrete).most_common(1)[0][0]
    entries: list[dict[str, Any]] = []
    exact = list(values)
    if by_layer:
        layers: dict[int, list[str]] = {}
        for n in values:
            layer = layer_module(n)[0]
            if layer is not None:
                layers.setdefault(layer, []).append(n)
        exact = [n for n in values if layer_module(n)[0] is None]
        for layer in sorted(layers):
            vs = {values[n] for n in layers[layer] if values[n] is not None}
            if len(vs) > 1:
                exact += layers[layer]
            elif vs and (v := vs.pop()) != fallback:
                entries.append({"filter": f"model.layers.{layer}.", "value": v})
    entries += [{"filter": n, "value": values[n]} for n in exact if values[n] is not None and values[n] != fallback]
    return fallback if not entries else entries + [{"value": fallback}]


def _is_default(value: Any, default: Any) -> bool:
    return default is not REQUIRED and not isinstance(value, list) and value == default


def _expanded(plan: MergePlan, names: list[str], num_layers: int, rename: Mapping[str, str],
              by_layer: bool) -> dict[str, Any]:
    spec = plan.spec
    contributors = plan.contributors()
    shared: dict[str, dict[str, Any]] = {p: {} for p in spec.shared}
    per: list[dict[str, dict[str, Any]]] = [{p: {} for p in spec.per_model} for _ in contributors]
    for n in names:
        layer, module = layer_module(n)
        if plan.selects(layer, module):
            s, pm = plan.resolve(n, layer, num_layers)
        else:  # copy the base: the gate parameter takes its neutral value, the rest do not matter
            s = {p: None for p in spec.shared}
            pm = [{p: None for p in spec.per_model} for _ in contributors]
            if spec.gate == "weight":
                for c, values in zip(contributors, pm):
                    values["weight"] = 1.0 if c == plan.base_model else 0.0
            else:
                s[spec.gate] = 0.0
        for p in spec.shared:
            shared[p][n] = s[p]
        for i, values in enumerate(pm):
            for p in spec.per_model:
                per[i][p][n] = values[p]
    d = _header(plan, rename)
    d["models"] = []
    for c, values in zip(contributors, per):
        params = {p: v for p, vals in values.items() if (v := _compress(vals, by_layer)) is not None
                  and not _is_default(v, spec.per_model[p])}
        d["models"].append({"model": rename.get(c, c), **({"parameters": params} if params else {})})
    glob = {p: v for p, vals in shared.items() if (v := _compress(vals, by_layer)) is not None
            and not _is_default(v, spec.shared[p])}
    if glob:
        d["parameters"] = glob
    return _tail(plan, d, rename)


def _agrees(plan: MergePlan, exported: dict[str, Any], names: list[str], num_layers: int) -> bool:
    """Both plans resolve to the same coefficients on every tensor the original merges."""
    other = MergePlan.from_dict(exported, "exported plan")
    spec = plan.spec
    for n in names:
        layer, module = layer_module(n)
        s2, pm2 = other.resolve(n, layer, num_layers)
        if plan.selects(layer, module):
            if (s2, pm2) != plan.resolve(n, layer, num_layers):
                return False
        elif spec.gate == "weight":
            gate = [p["weight"] for p in pm2]
            if gate != [1.0 if c == other.base_model else 0.0 for c in other.contributors()]:
                return False
        elif s2[spec.gate] != 0.0:
            return False
    return True


def to_mergekit_dict(plan: MergePlan, names: Iterable[str] | None = None, num_layers: int | None = None,
                     rename: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The plan as a mergekit config mapping. `names`/`num_layers` (the base's canonical tensor names and
    layer count) are needed for layer/module selections and enable the equivalence check; `rename` maps
    model specs to what mergekit should read (e.g. `default` → its converted directory)."""
    rename = dict(rename or {})
    names = list(names) if names is not None else None
    selection = plan.layers is not None or plan.modules is not None
    if not selection:
        d = _compact(plan, rename)
        if names is None or num_layers is None or _agrees(plan, d, names, num_layers):
            return d
    elif names is None or num_layers is None:
        raise VlsafeError("exporting a plan with 'layers'/'modules' needs the base's tensor names and layer count")
    for by_layer in (True, False):
        d = _expanded(plan, names, num_layers, rename, by_layer)
        if _agrees(plan, d, names, num_layers):
            return d
    raise VlsafeError("cannot express this plan as mergekit filters (a tensor name contains another's)")


def to_mergekit_yaml(plan: MergePlan, names: Iterable[str] | None = None, num_layers: int | None = None,
                     rename: Mapping[str, str] | None = None) -> str:
    """`to_mergekit_dict` as YAML text (with a comment when the plan uses vlsafe-only options)."""
    d = to_mergekit_dict(plan, names, num_layers, rename)
    notes = []
    if plan.has_extensions():
        notes.append("# exported by vlsafe: per-layer maps / selections expanded into mergekit filters")
    if "tie_break" in yaml.safe_dump(d.get("parameters") or {}):
        notes.append("# tie_break is vlsafe-only: mergekit ignores it and breaks trim ties by its full sort")
    if plan.spec.sparsify == "random":
        notes.append(f"# vlsafe seeds DARE masks per tensor (seed {plan.seed}); mergekit's masks will differ")
    body = yaml.safe_dump(d, sort_keys=False, default_flow_style=None)
    return "\n".join(notes + [body])
