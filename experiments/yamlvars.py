"""`${name}` variables in experiment YAMLs (`vars:` in the file, `--var KEY=VALUE` on the command line).

A string that is exactly `${name}` takes the variable's value with its type (a float stays a float); inside a
longer string the value is formatted in. Unknown names are one-line errors listing the defined ones.
"""

from __future__ import annotations

import re
from typing import Any

from vlsafe.analysis.errors import VlsafeError

_VAR = re.compile(r"\$\{([A-Za-z_][\w-]*)\}")


def substitute(obj: Any, env: dict[str, Any], where: str = "config") -> Any:
    """Replace `${name}` in every string of `obj` (dicts and lists recursively)."""
    if isinstance(obj, dict):
        return {k: substitute(v, env, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, env, where) for v in obj]
    if not isinstance(obj, str):
        return obj

    def get(name: str) -> Any:
        if name not in env:
            raise VlsafeError(f"{where}: unknown variable '${{{name}}}'; defined: {', '.join(sorted(env)) or 'none'}")
        return env[name]
    whole = _VAR.fullmatch(obj)
    if whole:
        return get(whole.group(1))
    return _VAR.sub(lambda m: str(get(m.group(1))), obj)


def parse_vars(items: list[str] | None) -> dict[str, str]:
    """`KEY=VALUE` strings → a dict (one-line error on a malformed item)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise VlsafeError(f"--var {item!r}: expected KEY=VALUE, e.g. --var organism=runs/organism")
        out[key.strip()] = value
    return out


def referenced(obj: Any) -> set[str]:
    """Every `${name}` used in the strings of `obj` (dicts and lists recursively)."""
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list):
        return set().union(*map(referenced, obj))
    return set(_VAR.findall(obj)) if isinstance(obj, str) else set()


def check_overrides(d: Any, overrides: dict[str, str] | None, where: str) -> None:
    """A `--var NAME=…` whose NAME the config neither defines under `vars:` nor uses as `${NAME}` is a typo (it
    would silently leave the default in place): a one-line error with the closest names."""
    import difflib

    if not overrides or not isinstance(d, dict):
        return
    known = set(d.get("vars") or {}) | referenced({k: v for k, v in d.items() if k != "vars"})
    for name in overrides:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = (f"did you mean {', '.join(close)}?" if close
                    else f"its variables: {', '.join(sorted(known)) or 'none'}")
            raise VlsafeError(f"--var {name}: {where} has no variable '{name}' ({hint})")


def with_vars(d: Any, overrides: dict[str, str] | None, where: str) -> Any:
    """A parsed YAML mapping with its own `vars:` (updated by `overrides`) substituted and removed."""
    if not isinstance(d, dict):
        return d
    env = d.get("vars") or {}
    if not isinstance(env, dict):
        raise VlsafeError(f"{where}: 'vars' must be a mapping of names to values")
    check_overrides(d, overrides, where)
    env = {**env, **(overrides or {})}
    return substitute({k: v for k, v in d.items() if k != "vars"}, env, where)
