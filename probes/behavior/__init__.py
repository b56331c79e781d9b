"""Behaviour: shipped prompt sets and benchmark loaders, generation, refusal judges, rates with CIs.

Kept light: the prompt-set API is imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "PromptRecord": "vlsafe.probes.behavior.datasets",
    "PromptSet": "vlsafe.probes.behavior.datasets",
    "load_prompts": "vlsafe.probes.behavior.datasets",
    "with_images": "vlsafe.probes.behavior.datasets",
    "list_shipped": "vlsafe.probes.behavior.datasets",
    "make_image": "vlsafe.probes.behavior.images",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlsafe.probes.behavior' has no attribute {name!r}")
