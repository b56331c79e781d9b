"""The sweep's `remedy` method: a base checkpoint evaluated under an activation-level remedy (nothing is built).

```yaml
- name: steer
  method: remedy
  config:                                  # `model` + the fields of a `vlsafe.probes.remedy_spec.RemedySpec`
    model: ${organism}/lvlm
    kind: steer
    alpha: ${alpha}
    direction: {file: "${locate}/shift_vectors.safetensors", unit: false}
  vary:
    alpha: [0.5, 1.0]
    layers: [[20], {top_k: 3, from: "${locate}/signals.csv", score: patching_resid_scene}]
```

`layers` (varied or in the template) are the remedy's layers; `all` or none means every layer. A relative vector
path is taken from the working folder when it exists there, else next to the sweep config (as checkpoints are). A point's hash includes the content of the vectors it reads
(`RemedySpec.key`), so a new `vlsafe locate` run is a new point. A gated remedy (`kind: gated`, a pre-fitted
`condition: {file: cond.json}` and an `action:`) takes the varied `layers` as its action's layers; its points
gain `fired_<set>` (the share of each set's prompts on which the condition fired).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from vlsafe.analysis.errors import VlsafeError

__all__ = ["remedy_spec", "remedy_model", "preflight_remedy", "remedy_under"]


def remedy_model(config: Any, label: str) -> str:
    """The base checkpoint of a remedy point's config (one-line error when absent)."""
    if not isinstance(config, dict) or not config.get("model"):
        raise VlsafeError(f"{label}: a remedy point needs 'model: CHECKPOINT' next to the remedy's fields")
    return str(config["model"])


def remedy_spec(config: Any, label: str, base_dir: Path, num_layers: int) -> Any:
    """The point's validated `RemedySpec` (`layers` absent or None = all `num_layers` layers)."""
    from vlsafe.probes.remedy_spec import RemedySpec

    remedy_model(config, label)
    raw = _found_files({k: v for k, v in config.items() if k != "model"})
    inner = raw
    if raw.get("kind") == "gated":  # the layers are the action's
        inner = raw["action"] = dict(raw.get("action") or {})
        if "layers" in raw:
            inner["layers"] = raw.pop("layers")
    if inner.get("layers") in (None, "all"):
        inner["layers"] = list(range(num_layers))
    return RemedySpec.parse(raw, source=label, base_dir=base_dir)


def _found_files(d: Any) -> Any:
    """`d` with every `file:` that exists from the working folder made absolute (as checkpoint paths are:
    `sweep.local`); other relative files resolve next to the sweep config."""
    if isinstance(d, dict):
        return {k: (str(Path(v).resolve()) if k == "file" and isinstance(v, str) and Path(v).exists()
                    else _found_files(v)) for k, v in d.items()}
    return d


def _checkpoint(spec: str) -> Any:
    from vlsafe.analysis.checkpoints import open_checkpoint

    return open_checkpoint(spec)


def preflight_remedy(config: Any, label: str, base_dir: Path, model: str) -> Any:
    """Check a remedy point against its checkpoint without loading it: keys, α, layers in range, images on a
    text-only model, the vectors' width; returns the spec."""
    from vlsafe.probes.remedy_spec import vector_width

    ck = _checkpoint(model)
    spec = remedy_spec(config, label, base_dir, ck.num_layers)
    if spec.kind == "gated":
        _check_condition(spec, label, model, ck)
    act = spec.action if spec.kind == "gated" else spec
    bad = [i for i in act.layers if not 0 <= i < ck.num_layers]
    if bad:
        raise VlsafeError(f"{label}: layers: {bad[0]} out of range for {model} ({ck.num_layers} layers)")
    if act.needs_images and not any(c.startswith("vision.") for c in ck.raw_to_canonical.values()):
        raise VlsafeError(f"{label}: kind {act.kind!r} acts on image inputs but {model} takes no images")
    width = vector_width(act)
    if width != ck.hidden_size:
        raise VlsafeError(f"{label}: the remedy's vectors have width {width}, {model} has hidden size {ck.hidden_size}")
    return spec


def _check_condition(spec: Any, label: str, model: str, ck: Any) -> None:
    """A gated point's condition file fits the checkpoint (its layer and width)."""
    from vlsafe.probes.gate import Condition

    cond = Condition.load(spec.condition.file)
    if not 0 <= cond.layer < ck.num_layers:
        raise VlsafeError(f"{label}: condition layer {cond.layer} out of range for {model} ({ck.num_layers} layers)")
    if cond.hidden_size != ck.hidden_size:
        raise VlsafeError(f"{label}: condition {spec.condition.file} has width {cond.hidden_size}, {model} has "
                          f"hidden size {ck.hidden_size}")


def remedy_under(config: Any, label: str, base_dir: Path) -> Callable[[Any], Any]:
    """`under(lm)` for `evaluate_point`: the remedy's context manager on the loaded model."""
    from vlsafe.probes import models as M
    from vlsafe.probes.remedies import apply_remedy

    return lambda lm: apply_remedy(lm, remedy_spec(config, label, base_dir, M.num_layers(lm.model)))
