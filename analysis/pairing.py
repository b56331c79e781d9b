"""Pair the tensors of two checkpoints strictly by canonical name, and decide what can be compared.

A text LLM and the language model inside a LLaVA pair up because both canonicalise to the same names.
Tensors on one side only (vision tower, projector, an untied head) are listed, not fatal. Embedding and
head matrices whose vocabulary grew (an added `<image>` / `<pad>` row) are compared on their shared
leading rows, with a note. Any other shape difference is an error naming the tensor (or, when allowed, a
reported row). Checkpoints that share (almost) no language-model names are refused with examples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from vlsafe.analysis.checkpoints import Checkpoint
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.streaming import leading_rows

VOCAB_MODULES = ("embed", "lm_head")
MIN_SHARED = 0.5  # fraction of the larger side's language-model names that must pair


@dataclass
class Pairing:
    """How checkpoint A's tensors pair with B's: rows to compare per paired name, notes, leftovers."""

    label_a: str
    label_b: str
    rows: dict[str, int] = field(default_factory=dict)  # paired name -> leading rows compared
    notes: dict[str, str] = field(default_factory=dict)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    mismatched: dict[str, str] = field(default_factory=dict)  # name -> shape note (only with allow_mismatch)


def checkpoint_label(spec: str) -> str:
    """A short label for a checkpoint spec: the directory or file stem (`default` stays `default`)."""
    p = Path(str(spec).rstrip("/"))
    name = p.name or str(spec)
    return re.sub(r"\.(safetensors|gguf|json)$", "", name)


def checkpoint_labels(specs: Iterable[str]) -> list[str]:
    """Unique short labels for specs, suffixed `#2`, `#3` … when two specs would share a label."""
    out: list[str] = []
    for spec in specs:
        base, label, k = checkpoint_label(spec), checkpoint_label(spec), 1
        while label in out:
            k += 1
            label = f"{base}#{k}"
        out.append(label)
    return out


def _check_related(a: Checkpoint, b: Checkpoint, min_shared: float) -> None:
    lang_a, lang_b = a.names("language"), b.names("language")
    set_b = set(lang_b)
    shared = [n for n in lang_a if n in set_b]
    need = min_shared * max(len(lang_a), len(lang_b))
    if lang_a and lang_b and len(shared) >= need:
        return
    only_a = [n for n in lang_a if n not in set_b][:2]
    only_b = [n for n in lang_b if n not in set(lang_a)][:2]
    raise VlsafeError(
        f"{a.spec} ({a.family.name}) and {b.spec} ({b.family.name}) share only {len(shared)} of "
        f"{len(lang_a)}/{len(lang_b)} language-model tensor names — unrelated architectures? "
        f"e.g. only in A: {only_a or '-'}; only in B: {only_b or '-'}")


def pair_checkpoints(a: Checkpoint, b: Checkpoint, *, label_a: str | None = None, label_b: str | None = None,
                     allow_mismatch: bool = False, namespaces: Sequence[str] | None = None,
                     min_shared: float = MIN_SHARED) -> Pairing:
    """Pair A's tensors (in A's storage order) with B's by canonical name.

    `namespaces` restricts pairing (e.g. `("language",)` for task vectors); unpaired names outside it are
    not listed. Raises `VlsafeError` for unrelated checkpoints or, unless `allow_mismatch`, a shape mismatch.
    """
    _check_related(a, b, min_shared)
    keep = (lambda n, c: c.infos[n].namespace in namespaces) if namespaces else (lambda n, c: True)
    p = Pairing(label_a or checkpoint_label(a.spec), label_b or checkpoint_label(b.spec))
    for name in a.names():
        if not keep(name, a):
            continue
        if name not in b.infos:
            p.only_a.append(name)
            continue
        sa, sb = tuple(a.infos[name].shape), tuple(b.infos[name].shape)
        if sa == sb:
            p.rows[name] = leading_rows(sa)
        elif a.infos[name].module in VOCAB_MODULES and len(sa) == 2 and sa[1:] == sb[1:]:
            p.rows[name] = min(sa[0], sb[0])
            p.notes[name] = f"vocabulary {sa[0]}->{sb[0]} rows: compared the {min(sa[0], sb[0])} shared rows"
        elif allow_mismatch:
            p.mismatched[name] = f"shape mismatch {list(sa)} vs {list(sb)}"
        else:
            raise VlsafeError(f"tensor '{name}': shape {list(sa)} in {a.spec} vs {list(sb)} in {b.spec} "
                              "(pass --allow-mismatch to report it as a row instead)")
    p.only_b = [n for n in b.names() if n not in a.infos and keep(n, b)]
    return p
