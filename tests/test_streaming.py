"""`vlsafe.analysis.streaming` readers: O_DIRECT and buffered reads equal the safetensors library's at unaligned
offsets, row ranges and EOF;
when direct I/O is chosen; and the buffered fallback where the file system refuses O_DIRECT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlsafe.analysis.checkpoints import open_checkpoint
from vlsafe.analysis.streaming import TensorReader, wants_direct_io
from vlsafe.analysis.weightshift import diff_checkpoints

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tensors ≥ 1 MB (the direct path) at offsets that are not page-aligned; the last (the fp16 one, 1.1 MB)
    ends the file, so its aligned read runs past EOF."""
    d = tmp_path_factory.mktemp("odd")
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(1001, 300, generator=g),
               "model.layers.0.input_layernorm.weight": torch.randn(3, generator=g),
               "model.layers.0.mlp.down_proj.weight": torch.randn(1111, 513, generator=g).half(),
               "model.norm.weight": torch.randn(300, generator=g),
               "lm_head.weight": torch.randn(1001, 300, generator=g)}
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                               "num_hidden_layers": 1, "hidden_size": 300}))
    try:
        os.close(os.open(d / "model.safetensors", os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip(f"the file system of {d} refuses O_DIRECT")
    return d


def _ranges(rows: int) -> list[tuple[int, int]]:
    return [(0, rows), (1, rows), (rows // 3, rows // 2), (rows - 1, rows), (5, 6)]


def test_direct_reads_equal_buffered_reads(odd_checkpoint: Path) -> None:
    ck = open_checkpoint(odd_checkpoint)
    direct, buffered = TensorReader(ck, direct=True), TensorReader(ck)
    truth = load_file(str(odd_checkpoint / "model.safetensors"))  # the safetensors library's own reader
    assert direct.direct and not buffered.direct
    for name, info in ck.infos.items():
        for a, b in _ranges(info.shape[0]) if len(info.shape) > 1 else [(0, info.shape[0])]:
            want = truth[ck.raw_name(name)][a:b]
            for got in (direct.read(name, a, b), buffered.read(name, a, b)):
                assert got.dtype == want.dtype and torch.equal(got, want), (name, a, b)
    assert direct._dfd is not None  # the ≥ 1 MB chunks really went through O_DIRECT
    direct.close()
    assert direct._dfd is None


def test_falls_back_to_buffered_reads_where_o_direct_is_refused(odd_checkpoint: Path, monkeypatch) -> None:
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *a)
    monkeypatch.setattr(os, "open", no_direct)
    ck = open_checkpoint(odd_checkpoint)
    r = TensorReader(ck, direct=True)
    name = "model.embed_tokens.weight"
    assert torch.equal(r.read(name), TensorReader(ck).read(name)) and not r.direct


def test_direct_io_is_chosen_by_size_and_by_flag(odd_checkpoint: Path, monkeypatch) -> None:
    import vlsafe.analysis.streaming as S

    ck = open_checkpoint(odd_checkpoint)
    size = (odd_checkpoint / "model.safetensors").stat().st_size
    monkeypatch.delenv("VLSAFE_DIRECT_IO", raising=False)
    monkeypatch.setattr(S, "_mem_available", lambda: 2 * size)
    assert not wants_direct_io([ck]) and wants_direct_io([ck, ck, ck]) is False  # the same file counts once
    monkeypatch.setattr(S, "_mem_available", lambda: size - 1)
    assert wants_direct_io([ck])
    for flag, want in (("0", False), ("1", True)):
        monkeypatch.setenv("VLSAFE_DIRECT_IO", flag)
        assert wants_direct_io([ck]) is want


def test_diff_is_identical_with_direct_io(odd_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import load_file

    post = tmp_path / "post"
    post.mkdir()
    t = load_file(str(odd_checkpoint / "model.safetensors"))
    t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"] * 1.01
    save_file(t, str(post / "model.safetensors"), metadata={"format": "pt"})
    (post / "config.json").write_text((odd_checkpoint / "config.json").read_text())
    frames = []
    for flag in ("0", "1"):
        monkeypatch.setenv("VLSAFE_DIRECT_IO", flag)
        frames.append(diff_checkpoints(odd_checkpoint, post, progress=False, chunk_elems=50_000))
    a, b = frames
    assert a.equals(b)
    row = a.set_index("tensor").loc["model.layers.0.mlp.down_proj.weight"]
    assert row["rel_frobenius"] == pytest.approx(0.01, rel=2e-3)
