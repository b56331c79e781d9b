"""vlsafe: how vision-language adaptation changes an LLM's safety — weights, activations, behaviour, remedies.

The packages install under one namespace: `vlsafe.analysis` (weights, checkpoint I/O, merging),
`vlsafe.probes` (activations and behaviour) and `vlsafe.experiments` (studies, CLI, report). The names below are
the small public API; each is imported on first use, so `import vlsafe` stays cheap.

>>> import vlsafe
>>> ckpt = vlsafe.open_checkpoint("default")          # lazy, canonical tensor names
>>> lm = vlsafe.load("default")                       # LoadedModel(model, tokenizer, processor)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name → module that defines it
_EXPORTS: dict[str, str] = {
    "open_checkpoint": "vlsafe.analysis.checkpoints",
    "Checkpoint": "vlsafe.analysis.checkpoints",
    "LoadedModel": "vlsafe.analysis.checkpoints",
    "diff": "vlsafe.analysis.weightshift",
    "task_vectors": "vlsafe.analysis.taskvectors",
    "merge": "vlsafe.analysis.merging",
    "VlsafeError": "vlsafe.analysis.errors",
    "load": "vlsafe.probes.models",
    "load_prompts": "vlsafe.probes.behavior.datasets",
    "capture": "vlsafe.probes.capture",
    "mean_diff": "vlsafe.probes.directions",
    "probe_layers": "vlsafe.probes.linear",
    "generate": "vlsafe.probes.behavior.generate",
    "get_judge": "vlsafe.probes.behavior.judges",
    "evaluate": "vlsafe.probes.behavior.evaluate",
    "RemedySpec": "vlsafe.probes.remedy_spec",
    "apply_remedy": "vlsafe.probes.remedies",
    "Condition": "vlsafe.probes.gate",
    "fit_condition": "vlsafe.probes.gate",
}
# public names that are another name in their module
_ALIASES = {"diff": "diff_checkpoints", "merge": "run_merge"}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from vlsafe.analysis.checkpoints import Checkpoint, LoadedModel, open_checkpoint
    from vlsafe.analysis.errors import VlsafeError
    from vlsafe.analysis.merging import run_merge as merge
    from vlsafe.analysis.taskvectors import task_vectors
    from vlsafe.analysis.weightshift import diff_checkpoints as diff
    from vlsafe.probes.behavior.datasets import load_prompts
    from vlsafe.probes.behavior.evaluate import evaluate
    from vlsafe.probes.behavior.generate import generate
    from vlsafe.probes.behavior.judges import get_judge
    from vlsafe.probes.capture import capture
    from vlsafe.probes.directions import mean_diff
    from vlsafe.probes.gate import Condition, fit_condition
    from vlsafe.probes.linear import probe_layers
    from vlsafe.probes.models import load
    from vlsafe.probes.remedies import apply_remedy
    from vlsafe.probes.remedy_spec import RemedySpec


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlsafe' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
