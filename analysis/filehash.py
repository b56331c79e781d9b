"""Content digests of weight files: the whole file, read once per version of it.

`file_sha256(path)` is the sha256 of every byte of a file. Reading a 540 MB checkpoint costs ~0.5 s warm (a 7B one
~12 s), so digests are memoised per file version — `(device, inode, size, mtime, ctime)` — in the process and, for files
of 64 MiB or more, in `<cache_dir>/file-hashes/` (one small JSON per file; smaller files take < 60 ms to read and
leave nothing behind; an unwritable cache only costs the memo). A file written in
place, replaced by a rename, hard-linked or touched has a new version and is read again. Files in the Hugging Face
hub cache whose blob name is a sha256 (LFS objects) are not read at all: the name is their digest.

`legacy_hash` is the checkpoint fingerprint vlsafe used before 2026-12-06 (each file's name, size and first and
last MiB). It missed changes in the middle of a file — a LoRA merged into middle layers left it unchanged — and
is kept only so that files that stored it (directions, activations) can still be matched to their model.

>>> from vlsafe.analysis.filehash import file_sha256
>>> file_sha256("runs/organism/lvlm/model.safetensors")  # doctest: +SKIP
'5038549d…'
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

_MEMO: dict[tuple[str, tuple[int, ...]], str] = {}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MIB = 1 << 20
PERSIST_MIN = 64 * _MIB  # smaller files are hashed again in each process rather than memoised on disk


def file_version(path: str | os.PathLike) -> tuple[int, ...]:
    """What changes whenever a file's content may have: (device, inode, size, mtime, ctime) — a cache key for
    anything read from the file."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _memo_file(real: Path) -> Path:
    from vlsafe.analysis.resolve import cache_dir

    return cache_dir() / "file-hashes" / f"{hashlib.sha256(str(real).encode()).hexdigest()[:32]}.json"


def _read_memo(real: Path, version: tuple[int, ...]) -> str | None:
    try:
        rec = json.loads(_memo_file(real).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict):
        return None
    digest = str(rec.get("sha256"))
    ok = rec.get("path") == str(real) and rec.get("version") == list(version) and _HEX64.fullmatch(digest)
    return digest if ok else None


def _write_memo(real: Path, version: tuple[int, ...], digest: str) -> None:
    from vlsafe.analysis.runinfo import write_json

    try:
        write_json(_memo_file(real), {"path": str(real), "version": list(version), "sha256": digest})
    except OSError:
        pass  # a read-only cache only loses the memo


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of every byte of `path`, memoised per file version (see the module docstring)."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and _HEX64.fullmatch(real.name):
        return real.name  # a hub LFS blob is named by its sha256
    version = file_version(real)
    key = (str(real), version)
    if key in _MEMO:
        return _MEMO[key]
    persist = version[2] >= PERSIST_MIN
    digest = _read_memo(real, version) if persist else None
    if digest is None:
        with real.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        if file_version(real) != version:  # changed while we read it: do not remember a torn digest
            return digest
        if persist:
            _write_memo(real, version, digest)
    _MEMO[key] = digest
    return digest


def legacy_hash(files: list[Path]) -> str:
    """The pre-2026-12-06 fingerprint: sha256 over each file's name, size and first and last MiB."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        with f.open("rb") as fh:
            h.update(fh.read(_MIB))
            fh.seek(max(0, size - _MIB))
            h.update(fh.read(_MIB))
    return h.hexdigest()
