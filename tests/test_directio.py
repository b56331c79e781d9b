"""`vlsafe.analysis.directio` windows and `vlsafe.analysis.pagecache`: planned windows never split a read; the window ring
serves the file's bytes to several readers with read-ahead and keeps views valid for as long as promised;
cold checkpoints are read with O_DIRECT."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlsafe.analysis.checkpoints import open_checkpoint
from vlsafe.analysis.directio import ALIGN, WindowRing, plan_windows
from vlsafe.analysis.pagecache import cached_fraction, resident_pages
from vlsafe.analysis.streaming import TensorReader, direct_flags, stream_rows
from vlsafe.analysis.weightshift import _jobs
from vlsafe.analysis.pairing import pair_checkpoints

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


def _interleaved(path: Path, size: int, readers: int) -> list[tuple[int, Path, int, int]]:
    """Reads by `readers` readers in turn (some skip a turn), each walking the file in random steps."""
    g = torch.Generator().manual_seed(readers)
    out: list[tuple[int, Path, int, int]] = []
    pos = [5 * (i + 1) for i in range(readers)]
    while min(pos) < size - 70_000:
        for i in range(readers):
            if pos[i] < size - 70_000 and int(torch.randint(0, 5, (1,), generator=g)):
                n = int(torch.randint(1, 60_000, (1,), generator=g))
                out.append((i, path, pos[i], n))
                pos[i] += n + int(torch.randint(0, 3, (1,), generator=g)) * 1000
            else:
                pos[i] += 4096
    return out


@pytest.mark.parametrize("ahead", (0, 1, 3))
@pytest.mark.parametrize("readers", (1, 2, 3))
def test_window_ring_serves_the_file_and_keeps_views_valid(blob: tuple[Path, bytes], readers: int, ahead: int) -> None:
    """Several readers' interleaved reads (random sizes, both sides of window edges): every view holds the
    file's bytes until that reader's next read, while the ring reads ahead into the slots others released."""
    path, data = blob
    reqs = _interleaved(path, len(data), readers)
    ring = WindowRing(reqs, [True, False, True][:readers], ahead=ahead, window=128 << 10)
    try:
        live: dict[int, tuple[torch.Tensor, int, int]] = {}
        for i, p, pos, n in reqs:
            live[i] = (ring.get(i, p, pos, n), pos, n)
            for view, q, m in live.values():  # what the ring promises: each reader's latest view
                assert bytes(view.numpy()) == data[q:q + m], (i, q, m)
        assert ring.get(0, path, 7, 11) is None  # not planned: the caller reads it on its own
    finally:
        ring.close()
    assert len(ring._wins) > 2 * readers  # the reads really spanned many windows


def test_window_ring_reports_a_short_file_and_errors(blob: tuple[Path, bytes], tmp_path: Path) -> None:
    path, data = blob
    ring = WindowRing([(0, path, len(data) - 100, 300)], [True])
    try:
        assert ring.get(0, path, len(data) - 100, 300).numel() == 100  # the file ends first: a shorter view
    finally:
        ring.close()
    missing = tmp_path / "gone.bin"
    ring = WindowRing([(0, missing, 0, 10)], [False])
    try:
        with pytest.raises(FileNotFoundError):
            ring.get(0, missing, 0, 10)
    finally:
        ring.close()


def test_window_ring_close_mid_stream_stops_the_thread(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    reqs = [(0, path, p, 4096) for p in range(0, len(data) - 4096, 4096)]
    ring = WindowRing(reqs, [True], ahead=1, window=8192)
    ring.get(0, *reqs[0][1:])
    closing = threading.Thread(target=ring.close)
    closing.start()
    closing.join(timeout=20)
    assert not closing.is_alive() and not any(t.is_alive() for t in ring._threads)  # close returned, threads ended
    assert ring._claimed < len(ring._wins)  # it stopped mid-stream rather than reading everything
    with pytest.raises(ValueError, match="threads >= 1"):
        WindowRing(reqs, [True], threads=0)  # nothing would ever read: refused instead of hanging


def test_streamed_chunks_equal_the_safetensors_library_for_every_prefetch_depth(tiny_llama_dir: Path) -> None:
    ck = open_checkpoint(tiny_llama_dir)
    jobs = _jobs(ck, [pair_checkpoints(ck, ck)], False)
    truth = {k: v for f in sorted(tiny_llama_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    seen: set[str] = set()
    for direct in (False, True):
        for depth in (0, 1, 3):
            readers = [TensorReader(ck, direct=direct), TensorReader(ck, direct=direct)]
            for name, a, b, (x, y), _ in stream_rows(readers, jobs, chunk_elems=3000, prefetch=depth):
                t = truth[ck.raw_name(name)]
                want = t[a:b] if x.ndim else t
                assert torch.equal(x, want) and torch.equal(y, want), (direct, depth, name, a)
                seen.add(name)
    assert seen == {j.name for j in jobs}


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


def test_resident_pages_of_a_large_file_are_sampled_evenly(tmp_path: Path) -> None:
    f = tmp_path / "big.bin"
    f.write_bytes(os.urandom(40 << 20))  # 10240 pages: over 256 runs x 16 pages, so sampled
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)
        while os.read(fd, 1 << 24):
            pass
        os.posix_fadvise(fd, (40 << 20) // 3, 0, os.POSIX_FADV_DONTNEED)  # keep only the first third
        have, pages = resident_pages(f)
        exact, _ = resident_pages(f, spans=10**9)
    finally:
        os.close(fd)
    if exact == pages:
        pytest.skip("this file system keeps the pages (tmpfs?)")
    assert pages == 10240 and 0.3 < exact / pages < 0.45  # a third, rounded up to whole folios
    assert have == pytest.approx(exact, rel=0.03)  # sampling only the file's start would say 100 %
