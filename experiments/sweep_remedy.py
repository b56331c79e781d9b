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

`layers` (varied or in the template) are the remedy's layers; `all` or none means every layer. Relative vector
paths resolve next to the sweep config. A point's hash includes the content of the vectors it reads
(`RemedySpec.key`), so a new `vlsafe locate` run is a new point.
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
    raw = {k: v for k, v in config.items() if k != "model"}
    if raw.get("layers") in (None, "all"):
        raw["layers"] = list(range(num_layers))
    return RemedySpec.parse(raw, source=label, base_dir=base_dir)


def _checkpoint(spec: str) -> Any:
    from vlsafe.analysis.checkpoints import open_checkpoint

    return open_checkpoint(spec)


def preflight_remedy(config: Any, label: str, base_dir: Path, model: str) -> Any:
    """Check a remedy point against its checkpoint without loading it: keys, α, layers in range, images on a
    text-only model, the vectors' width; returns the spec."""
    from vlsafe.probes.remedy_spec import vector_width

    ck = _checkpoint(model)
    spec = remedy_spec(config, label, base_dir, ck.num_layers)
    bad = [i for i in spec.layers if not 0 <= i < ck.num_layers]
    if bad:
        raise VlsafeError(f"{label}: layers: {bad[0]} out of range for {model} ({ck.num_layers} layers)")
    if spec.needs_images and not any(c.startswith("vision.") for c in ck.raw_to_canonical.values()):
        raise VlsafeError(f"{label}: kind {spec.kind!r} acts on image inputs but {model} takes no images")
    width = vector_width(spec)
    if width != ck.hidden_size:
        raise VlsafeError(f"{label}: the remedy's vectors have width {width}, {model} has hidden size {ck.hidden_size}")
    return spec


def remedy_under(config: Any, label: str, base_dir: Path) -> Callable[[Any], Any]:
    """`under(lm)` for `evaluate_point`: the remedy's context manager on the loaded model."""
    from vlsafe.probes import models as M
    from vlsafe.probes.remedies import apply_remedy

    return lambda lm: apply_remedy(lm, remedy_spec(config, label, base_dir, M.num_layers(lm.model)))
