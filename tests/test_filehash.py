"""Checkpoint content hashes see every byte; file digests are memoised per file version."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlsafe.analysis import filehash
from vlsafe.analysis.checkpoints import open_checkpoint
from vlsafe.analysis.tiny import tiny_llama

MIDDLE = "model.layers.1.self_attn.o_proj.weight"


def _edit_middle(ckpt_dir: Path) -> None:
    """Add 1e-3 to one middle tensor (what a LoRA merged into one layer does), rewriting the file in place."""
    f = ckpt_dir / "model.safetensors"
    tensors = load_file(f)
    tensors[MIDDLE] = tensors[MIDDLE] + 1e-3
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two 4-layer Llamas (hidden 256, > 2 MiB) equal but for one tensor in the middle of the file."""
    a = tiny_llama(tmp_path / "a", layers=4, hidden=256, seed=1)
    b = tiny_llama(tmp_path / "b", layers=4, hidden=256, seed=1)
    _edit_middle(b)
    return a, b


def test_middle_edit_changes_the_hash(pair: tuple[Path, Path]) -> None:
    a, b = (open_checkpoint(p) for p in pair)
    assert (pair[0] / "model.safetensors").stat().st_size > 3 << 20
    # the planted edit is invisible to the old first/last-MiB fingerprint (the defect this fixes) ...
    assert filehash.legacy_hash(a.source.files) == filehash.legacy_hash(b.source.files)
    # ... and visible to the content hash
    assert a.content_hash() != b.content_hash()
    whole = hashlib.sha256((pair[0] / "model.safetensors").read_bytes()).hexdigest()
    assert filehash.file_sha256(pair[0] / "model.safetensors") == whole


def test_digest_memoised_per_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLSAFE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(filehash, "PERSIST_MIN", 1 << 20)  # the tiny file counts as large
    d = tiny_llama(tmp_path / "m", layers=4, hidden=256, seed=2)
    f = d / "model.safetensors"
    first = filehash.file_sha256(f)
    reads = []
    real_digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda fh, algo: reads.append(1) or real_digest(fh, algo))
    assert filehash.file_sha256(f) == first and not reads  # in-process memo
    filehash._MEMO.clear()
    assert filehash.file_sha256(f) == first and not reads  # on-disk memo
    st = f.stat()
    _edit_middle(d)  # same size; restore the modification time: the inode's ctime still moves
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size
    second = filehash.file_sha256(f)
    assert reads and second != first and second == hashlib.sha256(f.read_bytes()).hexdigest()
    (memo,) = (tmp_path / "cache" / "file-hashes").iterdir()  # one memo per file, rewritten
    for junk in ("[1, 2]", "{not json", '{"path": "x", "version": [], "sha256": "z"}'):
        memo.write_text(junk)  # a damaged memo is a miss: the file is read again
        filehash._MEMO.clear()
        assert filehash.file_sha256(f) == second


def test_small_files_leave_no_memo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLSAFE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "small.bin"
    f.write_bytes(b"x" * 4096)
    assert filehash.file_sha256(f) == hashlib.sha256(b"x" * 4096).hexdigest()
    assert not (tmp_path / "cache").exists()


def test_unwritable_cache_still_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("VLSAFE_CACHE", str(blocker))
    monkeypatch.setattr(filehash, "PERSIST_MIN", 0)  # try to write the memo, and fail
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    assert filehash.file_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_hub_blob_named_by_its_digest(tmp_path: Path) -> None:
    name = "ab" * 32
    blob = tmp_path / "blobs" / name
    blob.parent.mkdir()
    blob.write_bytes(b"not what the name says")  # not read: the hub names LFS blobs by their sha256
    link = tmp_path / "snapshots" / "model.safetensors"
    link.parent.mkdir()
    link.symlink_to(blob)
    assert filehash.file_sha256(link) == name


def test_matches_hash_accepts_current_and_legacy(pair: tuple[Path, Path]) -> None:
    a, b = (open_checkpoint(p) for p in pair)
    assert a.matches_hash(a.content_hash()) and a.matches_hash(filehash.legacy_hash(a.source.files))
    assert not a.matches_hash(b.content_hash()) and not a.matches_hash("0" * 64)


def test_directions_check_model_sees_middle_edits(pair: tuple[Path, Path]) -> None:
    from vlsafe.analysis.errors import VlsafeError
    from vlsafe.probes.directions import DirectionSet

    a, b = (open_checkpoint(p) for p in pair)
    hidden = a.hidden_size
    ds = DirectionSet(raw=torch.zeros(a.num_layers, 1, hidden), layers=list(range(a.num_layers)), positions=[-1],
                      hidden_size=hidden, num_layers=a.num_layers, model_hash=a.content_hash(), model_spec="a")
    ds.check_model(a)
    with pytest.raises(VlsafeError, match="computed on a"):
        ds.check_model(b)
    legacy = DirectionSet(**{**ds.__dict__, "model_hash": filehash.legacy_hash(a.source.files)})
    legacy.check_model(a)  # files written before the fix still match their model


def test_sweep_point_key_sees_middle_edits(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """A rebuilt input that differs only mid-file (a LoRA merged into one layer) must not reuse a cached point."""
    import yaml

    from vlsafe.experiments.sweep import load_sweep, point_key
    from vlsafe.experiments.sweep_config import expand

    model = tmp_path / "model"
    os.rename(pair[0], model)
    cfg_file = tmp_path / "s.yaml"
    cfg_file.write_text(yaml.safe_dump({"eval": {"harmful": "harmful-val", "harmless": "harmless-val", "limit": 2},
                                        "grid": [{"name": "ref", "method": "checkpoint", "config": str(model)}]}))
    cfg, base = load_sweep(cfg_file)
    before = point_key(expand(cfg, {}, base)[0], base)
    os.rename(model, tmp_path / "old")
    os.rename(pair[1], model)
    assert point_key(expand(cfg, {}, base)[0], base) != before
