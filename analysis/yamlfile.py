"""Experiment and merge YAMLs read with one-line errors: a missing file, invalid YAML, not a mapping."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from vlsafe.analysis.errors import VlsafeError


def parse_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load(text)`; a syntax error becomes `VlsafeError("SOURCE: invalid YAML (…)")`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise VlsafeError(f"{source}: invalid YAML ({str(e).splitlines()[0]})") from None


def read_yaml(path: str | os.PathLike, what: str = "config") -> dict[str, Any]:
    """The mapping in YAML file `path` (an empty file is `{}`); `what` names the file in errors."""
    p = Path(path)
    if not p.is_file():
        raise VlsafeError(f"{p}: no such {what}")
    raw = parse_yaml(p.read_text(), str(p))
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise VlsafeError(f"{p}: a {what} must be a YAML mapping")
    return raw
