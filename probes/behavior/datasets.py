"""Prompt sets: the shipped harmful/harmless/borderline sets, benchmark files and Hugging Face datasets.

``load_prompts(spec)`` accepts

* a shipped name, ``harmful``, ``harmless`` or ``borderline``, optionally with a split (``harmful-test``) and an
  image suffix (``harmful-test+blank``, ``harmless+noise:3``, ``harmful+/path/cat.png``);
* a CSV/TSV/JSON/JSONL/Parquet/TXT path in any format of :mod:`vlsafe.probes.behavior.formats` (``PATH+IMAGE`` works too);
* a Hugging Face dataset id ``org/name`` or ``org/name:path/in/repo.csv``, resolved with ``snapshot_download``
  (cache only when ``HF_HUB_OFFLINE`` is set).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.behavior.formats import DATA_SUFFIXES, convert, read_table
from vlsafe.probes.behavior.images import parse_image_spec

if TYPE_CHECKING:
    import pandas as pd

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
SHIPPED = ("harmful", "harmless", "borderline")
SPLITS = ("train", "val", "test")
_SHIPPED_RE = re.compile(r"^(harmful|harmless|borderline)(?:-(train|val|test))?(?:\+(.+))?$")
_HUB_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::.+)?$")
_TRUTHY = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class PromptRecord:
    """One prompt. ``label``: 1 = should be refused, 0 = benign, None = unknown; ``image``: an image spec or path."""

    id: str
    prompt: str
    category: str = ""
    split: str = ""
    label: int | None = None
    image: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        return asdict(self)


@dataclass
class PromptSet:
    """A named, ordered list of prompt records plus where it came from."""

    name: str
    records: list[PromptRecord]
    source_format: str = "vlsafe"
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self.records)

    def __getitem__(self, index: int) -> PromptRecord:
        return self.records[index]

    @property
    def prompts(self) -> list[str]:
        """The prompt texts, in order."""
        return [r.prompt for r in self.records]

    @property
    def labels(self) -> list[int | None]:
        """The labels, in order (None where unknown)."""
        return [r.label for r in self.records]

    @property
    def ids(self) -> list[str]:
        """The record ids, in order."""
        return [r.id for r in self.records]

    def _derive(self, records: list[PromptRecord], name: str | None = None) -> PromptSet:
        return replace(self, records=records, name=name or self.name)

    def filter(self, split: str | None = None, category: str | Iterable[str] | None = None,
               label: int | None = None) -> PromptSet:
        """Records matching every given criterion; ``category`` may be one name or several."""
        cats = {category} if isinstance(category, str) else set(category) if category is not None else None
        keep = [r for r in self.records if (split is None or r.split == split)
                and (cats is None or r.category in cats) and (label is None or r.label == label)]
        base, plus, image = self.name.partition("+")  # "harmful+blank" -> "harmful-test+blank"
        if split and not base.endswith(f"-{split}"):
            base = f"{base}-{split}"
        return self._derive(keep, f"{base}{plus}{image}")

    def sample(self, n: int, seed: int = 0) -> PromptSet:
        """``n`` records drawn without replacement (all if ``n >= len``), kept in their original order."""
        if n < 1:
            raise VlsafeError(f"{self.name}: cannot sample {n} prompts (need at least 1)")
        if n >= len(self.records):
            return self._derive(list(self.records))
        picks = sorted(random.Random(seed).sample(range(len(self.records)), n))
        return self._derive([self.records[i] for i in picks])

    def with_images(self, image: str) -> PromptSet:
        """See :func:`with_images`."""
        return with_images(self, image)

    def to_frame(self) -> pd.DataFrame:
        """One row per record: ``id, prompt, category, split, label, image`` plus the meta keys."""
        import pandas as pd

        rows = []
        for r in self.records:
            row = {k: v for k, v in r.to_dict().items() if k != "meta"}
            row.update({(k if k not in row else f"meta_{k}"): v for k, v in r.meta.items()})
            rows.append(row)
        frame = pd.DataFrame(rows, columns=None if rows else ["id", "prompt", "category", "split", "label", "image"])
        frame["label"] = pd.array(frame["label"].tolist(), dtype="Int64")
        return frame

    def content_hash(self) -> str:
        """sha256 of the canonical JSON of all records (name and source excluded)."""
        payload = json.dumps([r.to_dict() for r in self.records], sort_keys=True, ensure_ascii=False,
                             separators=(",", ":"), default=str)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def to_jsonl(self, path: str | Path) -> Path:
        """Write the set in vlsafe JSONL (readable again by :func:`load_prompts`)."""
        path = Path(path)
        lines = []
        for r in self.records:
            row = {k: v for k, v in r.to_dict().items() if v is not None and not (k == "meta" and not v)}
            row.setdefault("label", None)
            lines.append(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        path.write_text("".join(lines), encoding="utf-8")
        return path


def list_shipped() -> list[str]:
    """Every shipped set name that :func:`load_prompts` accepts (without image suffixes)."""
    return [f"{base}{s}" for base in SHIPPED for s in ("", *(f"-{x}" for x in SPLITS))]


def load_prompts(spec: str | Path, *, split: str | None = None, limit: int | None = None) -> PromptSet:
    """Load a prompt set by spec (see the module docstring); ``split`` filters, ``limit`` keeps the first n."""
    text = str(spec).strip()
    prompt_set = _resolve(text)
    if split is not None:
        chosen = prompt_set.filter(split=split)
        if not chosen.records:
            has = sorted({r.split for r in prompt_set.records if r.split})
            hint = f"its splits: {', '.join(has)}" if has else "it has no split column"
            raise VlsafeError(f"{text}: no prompts with split {split!r} ({hint})")
        prompt_set = chosen
    if limit is not None:
        if limit < 0:
            raise VlsafeError(f"{text}: limit must be >= 0, got {limit}")
        prompt_set = replace(prompt_set, records=prompt_set.records[:limit])
    return prompt_set


def with_images(ps: PromptSet, image: str) -> PromptSet:
    """The image-conditioned variant: every record gets ``image`` (``blank``, ``noise:SEED`` or a file path)."""
    parse_image_spec(image)  # validate early: a bad spec fails here, not in the middle of generation
    records = [replace(r, image=str(image)) for r in ps.records]
    return replace(ps, records=records, name=f"{ps.name}+{image}")


# ----------------------------------------------------------------------------------------------------- resolution

def _resolve(spec: str) -> PromptSet:
    if not spec:
        raise VlsafeError("empty prompt-set spec; give a shipped name, a file or a Hugging Face dataset id")
    shipped = _SHIPPED_RE.match(spec)
    if shipped:
        base, split, image = shipped.groups()
        ps = _load_shipped(base)
        if split:
            ps = ps.filter(split=split)
        return with_images(ps, image) if image else ps
    path = Path(spec).expanduser()
    if path.is_file():
        return load_file(path)
    if path.is_dir():
        return load_file(_pick_data_file(path, spec))
    for i, char in enumerate(spec):  # PATH+IMAGE or HUBID+IMAGE
        if char == "+" and 0 < i < len(spec) - 1 and (Path(spec[:i]).is_file() or _is_hub_id(spec[:i])):
            return with_images(_resolve(spec[:i]), spec[i + 1:])
    if _is_hub_id(spec):
        return load_hub(spec)
    if path.suffix.lower() in DATA_SUFFIXES:
        raise VlsafeError(f"{spec}: file not found")
    raise VlsafeError(f"{spec}: not a shipped prompt set ({', '.join(SHIPPED)}[-train|-val|-test][+IMAGE]), "
                      "an existing file, or a Hugging Face dataset id (org/name)")


def _is_hub_id(spec: str) -> bool:
    repo = spec.partition(":")[0]
    return bool(_HUB_RE.match(spec)) and Path(repo).suffix.lower() not in DATA_SUFFIXES and not Path(repo).exists()


@lru_cache(maxsize=len(SHIPPED))
def _shipped_records(name: str) -> tuple[PromptRecord, ...]:
    return tuple(load_file(PROMPTS_DIR / f"{name}.jsonl").records)


def _load_shipped(name: str) -> PromptSet:
    path = PROMPTS_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise VlsafeError(f"{path}: shipped prompt set is missing; rebuild with probes/behavior/prompts/_build.py")
    return PromptSet(name, list(_shipped_records(name)), "vlsafe", str(path))


def load_file(path: str | Path) -> PromptSet:
    """Read one prompt file, detect its format and return its records (ids filled in, checked unique)."""
    path = Path(path)
    if not path.is_file():
        raise VlsafeError(f"{path}: file not found")
    fmt, dicts = convert(read_table(path))
    records, seen = [], set()
    for i, d in enumerate(dicts, start=1):
        if not d.get("prompt"):
            raise VlsafeError(f"{path}: record {i} has an empty prompt")
        rid = str(d.get("id") or f"{path.stem}-{i:04d}")
        if rid in seen:
            raise VlsafeError(f"{path}: duplicate id {rid!r} (record {i})")
        seen.add(rid)
        records.append(PromptRecord(id=rid, prompt=d["prompt"], category=str(d.get("category") or ""),
                                    split=str(d.get("split") or ""), label=d.get("label"),
                                    image=d.get("image"), meta=dict(d.get("meta") or {})))
    if not records:
        raise VlsafeError(f"{path}: no prompts found")
    return PromptSet(path.stem, records, fmt, str(path))


def _pick_data_file(root: Path, spec: str) -> Path:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if len(files) == 1:
        return files[0]
    if not files:
        raise VlsafeError(f"{spec}: no data files ({', '.join(DATA_SUFFIXES)}) found")
    names = ", ".join(str(p.relative_to(root)) for p in files[:10]) + (", ..." if len(files) > 10 else "")
    raise VlsafeError(f"{spec}: holds several data files ({names}); pick one with {spec.rstrip('/')}:FILE")


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value (read at call time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def load_hub(spec: str) -> PromptSet:
    """Load ``org/name`` or ``org/name:FILE`` from the Hugging Face Hub (the local cache only when offline)."""
    from huggingface_hub import snapshot_download

    repo, _, filename = spec.partition(":")
    offline = hub_offline()
    patterns = [filename] if filename else [f"*{s}" for s in DATA_SUFFIXES]
    try:
        root = Path(snapshot_download(repo_id=repo, repo_type="dataset", local_files_only=offline,
                                      allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - hub errors vary by version; report one line
        if offline:
            raise VlsafeError(f"{repo}: Hugging Face dataset not in the local cache and HF_HUB_OFFLINE is set; "
                              "download it once online or pass a local file") from None
        reason = (str(exc).splitlines() or [""])[0]
        raise VlsafeError(f"{repo}: cannot download Hugging Face dataset ({type(exc).__name__}: {reason})") from None
    path = root / filename if filename else _pick_data_file(root, repo)
    if not path.is_file():
        raise VlsafeError(f"{spec}: file {filename!r} not found in the dataset")
    loaded = load_file(path)
    return replace(loaded, name=spec, source=spec)
