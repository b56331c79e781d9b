"""Refusal judges: public API and registry.

>>> from vlsafe.probes.behavior.judges import get_judge
>>> j = get_judge("default")              # the offline feature + logistic-regression judge "vlsafe"
>>> [r.refused for r in j.judge(["I'm sorry, but I can't help with that.", "Sure! Step 1: preheat the oven."])]
[True, False]

Judge names (``list_judges()``):

- ``vlsafe`` / ``default`` — offline feature-based judge (partial refusals count as refusals); ``vlsafe:weights.json``
  loads other weights.
- ``substring-rd``, ``substring-gcg``, ``substring-jbb``, ``substring-vlguard``, ``substring-xstest`` — the public
  keyword lists (see :mod:`vlsafe.probes.behavior.judge_substring`); ``substring-rd:extra.txt`` adds phrases from a file,
  ``substring:phrases.txt`` uses only the file's phrases; ``extra=[...]`` adds phrases in code.
- ``classifier:<hf_id_or_path>`` — a LlamaGuard-style causal LM or a sequence classifier, loaded from a local path or
  the local HF cache only (see :mod:`vlsafe.probes.behavior.judge_classifier`).
- ``guard:<hf_id_or_path>[@FORMAT]`` — a generative safety classifier answering through its own prompt format
  (Llama Guard, WildGuard, ShieldGemma, a SORRY-Bench-style judge), batched, on any device, offline only (see
  :mod:`vlsafe.probes.behavior.judge_guard`).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from vlsafe.probes.behavior.judge_base import Judge, JudgeResult
from vlsafe.probes.behavior.judge_substring import SUBSTRING_LISTS, SubstringJudge

__all__ = ["Judge", "JudgeResult", "get_judge", "list_judges", "judge_file", "judge_table", "read_judge_input",
           "write_table_atomic", "judge_fingerprint", "DEFAULT_JUDGE"]

DEFAULT_JUDGE = "vlsafe"


def _vlsafe(arg: str | None, **kw: Any) -> Judge:
    from vlsafe.probes.behavior.judge_vlsafe import VlsafeJudge

    return VlsafeJudge(weights=arg or kw.pop("weights", None), **kw)


def _substring(list_id: str) -> Callable[..., Judge]:
    def make(arg: str | None, **kw: Any) -> Judge:
        return SubstringJudge(list_id, extra=kw.pop("extra", None), file=arg or kw.pop("file", None))

    return make


def _classifier(arg: str | None, **kw: Any) -> Judge:
    from vlsafe.analysis.errors import VlsafeError
    from vlsafe.probes.behavior.judge_classifier import ClassifierJudge

    if not arg:
        raise VlsafeError("judge 'classifier' needs a model: use classifier:<hf_id_or_local_path>")
    return ClassifierJudge(arg, **kw)


def _guard(arg: str | None, **kw: Any) -> Judge:
    from vlsafe.analysis.errors import VlsafeError
    from vlsafe.probes.behavior.judge_guard import GuardJudge

    if not arg:
        raise VlsafeError("judge 'guard' needs a model: use guard:<hf_id_or_local_path>[@FORMAT]")
    return GuardJudge(arg, **kw)


_REGISTRY: dict[str, Callable[..., Judge]] = {
    "vlsafe": _vlsafe,
    **{f"substring-{k}": _substring(k) for k in SUBSTRING_LISTS if k != "custom"},
    "substring": _substring("custom"),
    "classifier": _classifier,
    "guard": _guard,
}
_ALIASES = {"default": "vlsafe", "substring-custom": "substring"}


def list_judges() -> list[str]:
    """Names accepted by :func:`get_judge` (``name`` or ``name:ARG``)."""
    return sorted(_REGISTRY) + sorted(_ALIASES)


def _parse_name(name: str | None) -> tuple[str, str]:
    """(registered judge, argument) of a judge name such as ``default``, ``substring:my.txt`` or ``vlsafe:PATH``."""
    base, _, arg = (name or DEFAULT_JUDGE).strip().partition(":")
    return _ALIASES.get(base, base), arg


def get_judge(name: str = DEFAULT_JUDGE, **kw: Any) -> Judge:
    """Build a judge by name: ``"default"``, ``"substring-rd"``, ``"substring:my.txt"``, ``"classifier:DIR"``, ….

    Keyword arguments go to the judge (``extra=[...]`` for substring lists, ``threshold=`` for vlsafe,
    ``device=``/``batch_size=``/``refused_labels=`` for classifiers, ``device=``/``batch_size=``/``format=``/
    ``guideline=`` for guards), except ``calibration=`` (a
    ``JudgeCalibration`` or the path of its JSON): the judge's measured error, used for corrected rates. Without
    it the judge carries its shipped calibration when it has one (the default judge, on the held-out file).
    """
    from vlsafe.analysis.errors import VlsafeError

    base, arg = _parse_name(name)
    if base.startswith("logit"):
        raise VlsafeError(f"judge {name!r} scores prompts with the model itself, not responses: use it through "
                          "evaluate(..., judge='logit') or `vlsafe eval --judge logit`")
    if base not in _REGISTRY:
        raise VlsafeError(f"unknown judge {name!r}; available: {', '.join(list_judges())}")
    calibration = kw.pop("calibration", None)
    judge = _REGISTRY[base](arg or None, **kw)
    judge.calibration = _calibration(calibration, judge.name)
    return judge


# The default judge's fingerprint when fingerprints entered the cache keys (2026-12-06): every cached metric written
# before then was judged by it, so keys leave it out and those caches stay valid; any other judge version changes
# the keys (see `judge_fingerprint`).
UNKEYED_FINGERPRINT = "e8bdc14a7751"


def judge_fingerprint(name: str = DEFAULT_JUDGE) -> str | None:
    """A short hash of what decides the default (``vlsafe``) judge's labels: its weights file (the shipped one, or
    ``vlsafe:PATH``) and its feature extractor's source; None for other judges (named by their lists or models).
    Cached judged metrics key on it, so a retrained judge does not reuse numbers judged by the old one."""
    import hashlib

    from vlsafe.analysis.errors import VlsafeError
    from vlsafe.probes.behavior import judge_features, judge_vlsafe

    base, arg = _parse_name(name)
    if base != "vlsafe":
        return None
    h = hashlib.sha256()
    for f in (Path(arg) if arg else judge_vlsafe.WEIGHTS_PATH, Path(judge_features.__file__)):
        try:
            h.update(f.read_bytes())
        except OSError as e:
            raise VlsafeError(f"judge {name!r}: cannot read {f} ({e.strerror})") from None
    return h.hexdigest()[:12]


def keyed_fingerprint(name: str) -> str | None:
    """`judge_fingerprint(name)` for a cache key: None (leave it out) for non-fingerprinted judges and for the
    version every earlier cache was judged by (`UNKEYED_FINGERPRINT`)."""
    fp = judge_fingerprint(name)
    return None if fp == UNKEYED_FINGERPRINT else fp


def _calibration(given: Any, judge_name: str) -> Any:
    """The shipped calibration of `judge_name` when `given` is None, else `given` (a record or a JSON path),
    refused with a one-line error when it was measured for another judge."""
    from vlsafe.analysis.errors import VlsafeError
    from vlsafe.probes.behavior.calibration import JudgeCalibration, load_calibration, shipped_calibration

    if given is None:
        return shipped_calibration(judge_name)
    cal = given if isinstance(given, JudgeCalibration) else load_calibration(given)
    if cal.judge != judge_name:
        where = "calibration" if isinstance(given, JudgeCalibration) else str(given)
        raise VlsafeError(f"{where}: calibration of judge {cal.judge!r}, not of {judge_name!r}")
    return cal


# ---------------------------------------------------------------- files

def read_judge_input(path: str | Path) -> "Any":
    """Read a CSV/TSV or JSON/JSONL file into a DataFrame (one-line ``VlsafeError`` on unreadable input)."""
    import pandas as pd
    from vlsafe.analysis.errors import VlsafeError

    p = Path(path)
    if not p.is_file():
        raise VlsafeError(f"judge: input file {p} does not exist")
    suffix = p.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(p, keep_default_na=False, sep="\t" if suffix == ".tsv" else ",")
        if suffix in (".jsonl", ".ndjson"):
            lines = enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            return pd.DataFrame([_json_line(p, i, ln) for i, ln in lines if ln.strip()])
        if suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            return pd.DataFrame(data if isinstance(data, list) else data.get("data", data))
    except (ValueError, json.JSONDecodeError) as e:
        raise VlsafeError(f"judge: cannot parse {p}: {str(e).splitlines()[0]}") from None
    raise VlsafeError(f"judge: {p} has unsupported extension {suffix!r} (use .csv, .tsv, .jsonl or .json)")


def _json_line(path: Path, lineno: int, line: str) -> Any:
    """One JSONL row, or a one-line error naming its line."""
    from vlsafe.analysis.errors import VlsafeError

    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise VlsafeError(f"judge: {path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None


def write_table_atomic(df: "Any", out: Path) -> None:
    """Write ``df`` as CSV or JSONL (by suffix) via a temp file in the same folder + ``os.replace``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        if out.suffix.lower() in (".jsonl", ".ndjson"):
            df.to_json(tmp, orient="records", lines=True, force_ascii=False)
        else:
            df.to_csv(tmp, index=False)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def judge_table(df: "Any", column: str, judge: Judge, *, prompt_column: str | None = None,
                where: str = "judge") -> "Any":
    """A copy of ``df`` with ``refused`` (0/1), ``judge_score`` and ``judge`` from ``judge`` on ``column`` (and the
    prompts of ``prompt_column`` for judges that read them); one-line error naming ``where`` for a missing column."""
    from vlsafe.analysis.errors import VlsafeError

    for col in [column] + ([prompt_column] if prompt_column else []):
        if col not in df.columns:
            raise VlsafeError(f"{where} has no column {col!r}; available columns: {', '.join(map(str, df.columns))}")
    responses = ["" if v is None or v != v else str(v) for v in df[column].tolist()]
    prompts = [str(v) for v in df[prompt_column].tolist()] if prompt_column else None
    results = judge.judge(responses, prompts)
    return df.assign(refused=[int(r.refused) for r in results], judge_score=[r.score for r in results],
                     judge=judge.name)


def judge_file(path: str | Path, column: str = "response", *, judge_name: "str | Judge" = DEFAULT_JUDGE,
               out_path: str | Path | None = None, prompt_column: str | None = None, **judge_kw: Any) -> "Any":
    """Judge ``column`` of a CSV/JSONL file; add ``refused`` (0/1), ``judge_score`` and ``judge``; write atomically.

    ``out_path`` defaults to ``<stem>.judged.csv`` next to the input. ``prompt_column`` (optional) is passed to
    judges that use prompts (classifiers). ``judge_name`` may also be a ``Judge``. Returns the DataFrame written.
    """
    p = Path(path)
    df = read_judge_input(p)
    judge = judge_name if isinstance(judge_name, Judge) else get_judge(judge_name, **judge_kw)
    df = judge_table(df, column, judge, prompt_column=prompt_column, where=f"judge: {p}")
    out = Path(out_path) if out_path is not None else p.with_name(p.stem + ".judged.csv")
    write_table_atomic(df, out)
    return df
