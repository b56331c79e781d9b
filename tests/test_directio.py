"""`analysis.directio` windows and `analysis.pagecache`: planned windows never split a read, serve the file's
bytes with read-ahead, keep views valid for as long as promised; cold checkpoints are read with O_DIRECT."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from analysis.checkpoints import open_checkpoint
from analysis.directio import ALIGN, Windows, plan_windows
from analysis.pagecache import cached_fraction, resident_pages
from analysis.streaming import TensorReader, direct_flags, stream_rows
from analysis.weightshift import _jobs
from analysis.pairing import pair_checkpoints

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


@pytest.fixture()
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    data = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "blob.bin"
    path.write_bytes(data.numpy().tobytes())
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    return path, path.read_bytes()


def test_plan_windows_never_splits_a_read() -> None:
    p, q = Path("a"), Path("b")
    ranges = [(p, 10, 100), (p, 110, 5000), (p, 9000, 70_000), (p, 200, 10), (q, 0, 300_000), (q, 300_000, 5)]
    wins, index = plan_windows(ranges, window=64 << 10)
    for (path, pos, n), w in zip(ranges, index):
        wpath, first, size = wins[w]
        assert wpath == path and first <= pos and pos + n <= first + size and first % ALIGN == 0
    assert index == [0, 0, 1, 2, 3, 4]  # over the window, backwards, new file, a range larger than the window


def _random_ranges(path: Path, size: int) -> list[tuple[Path, int, int]]:
    g = torch.Generator().manual_seed(1)
    ranges, pos = [], 5
    while pos < size - 70_000:
        n = int(torch.randint(1, 60_000, (1,), generator=g))
        ranges.append((path, pos, n))
        pos += n + int(torch.randint(0, 3, (1,), generator=g)) * 1000
    return ranges


@pytest.mark.parametrize("ahead", (1, 3))
@pytest.mark.parametrize("uniform", (False, True))
def test_windows_serve_the_file_and_keep_views_valid(blob: tuple[Path, bytes], uniform: bool, ahead: int) -> None:
    """Random ranges, and page-aligned ones whose windows all have one size (so buffers are reused, never
    regrown): every view still alive by the rotation's promise holds the file's bytes after the read-ahead."""
    path, data = blob
    step = 8 * ALIGN
    ranges = [(path, p, step) for p in range(0, len(data), step)] if uniform else _random_ranges(path, len(data))
    count = ahead + 2  # one chunk group read ahead
    win = Windows(ranges, count=count, window=128 << 10, ahead=ahead)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        live: list[tuple[torch.Tensor, int, int, int]] = []
        for _, pos, n in ranges:
            live.append((win.get(fd, path, pos, n), pos, n, win._win))
            for _, fut, _ in win._pending:
                fut.result()  # let the reads ahead land before looking
            live = [v for v in live if win._win - v[3] <= count - ahead - 1]  # what the rotation promises
            for view, p, m, _ in live:
                assert bytes(view.numpy()) == data[p:p + m], (p, m)
        assert bytes(win.get(fd, path, 7, 11).numpy()) == data[7:18]  # outside the plan: read on its own
    finally:
        win.close()
        os.close(fd)


def test_streamed_chunks_equal_fresh_reads_for_every_prefetch_depth(tiny_llama_dir: Path, monkeypatch) -> None:
    ck = open_checkpoint(tiny_llama_dir)
    jobs = _jobs(ck, [pair_checkpoints(ck, ck)], False)
    for flag in ("0", "1"):
        monkeypatch.setenv("VLSAFE_DIRECT_IO", flag)
        for depth in (0, 1, 3):
            readers = [TensorReader(ck, direct=flag == "1"), TensorReader(ck, direct=flag == "1")]
            fresh = TensorReader(ck)
            for name, a, b, (x, y), _ in stream_rows(readers, jobs, chunk_elems=3000, prefetch=depth, reuse=True):
                want = fresh.read(name, a, b) if x.ndim else fresh.read(name)
                assert torch.equal(x, want) and torch.equal(y, want), (flag, depth, name, a)


def test_cold_checkpoints_are_read_with_o_direct(tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil

    cold = tmp_path / "cold"
    shutil.copytree(tiny_llama_dir, cold)
    files = sorted(cold.glob("*.safetensors"))
    assert cached_fraction(files) == pytest.approx(1.0)  # just written
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    if cached_fraction(files) > 0.5:
        pytest.skip("this file system keeps the pages (tmpfs?)")
    monkeypatch.delenv("VLSAFE_DIRECT_IO", raising=False)
    for f in tiny_llama_dir.glob("*.safetensors"):
        f.read_bytes()  # the warm one: in the page cache
    assert direct_flags([open_checkpoint(tiny_llama_dir), open_checkpoint(cold)]) == [False, True]
    have, pages = resident_pages(files[0])
    assert have < pages
