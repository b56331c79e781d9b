"""Behaviour: shipped prompt sets and benchmark loaders, generation, refusal judges, rates with CIs.

Kept light: the prompt-set API is imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "PromptRecord": "probes.behavior.datasets",
    "PromptSet": "probes.behavior.datasets",
    "load_prompts": "probes.behavior.datasets",
    "with_images": "probes.behavior.datasets",
    "list_shipped": "probes.behavior.datasets",
    "make_image": "probes.behavior.images",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'probes.behavior' has no attribute {name!r}")
