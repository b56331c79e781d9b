"""Calls leave process-wide state as they found it: environment variables (capture backends) and torch's
thread count (`serial_torch`, the statistics kernels, small SVDs)."""

from __future__ import annotations

import os

import pytest
import torch

from vlsafe.analysis.threads import serial_torch
from vlsafe.probes.capture import capture
from vlsafe.probes.models import load


@pytest.fixture
def threads():
    """torch's thread count set to a value no default has (3), restored after the test."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


@pytest.mark.parametrize("backend", ["hooks", "transformer_lens", "nnsight"])
def test_capture_backends_leave_the_environment_alone(tiny_llama_dir, monkeypatch, backend):
    import nnsight  # noqa: F401  (libraries' own import-time settings are not what this test checks)
    import transformer_lens.model_bridge.sources._bridge_builder  # noqa: F401

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    lm = load(tiny_llama_dir)
    before = dict(os.environ)
    acts = capture(lm, ["Hi", "Write a poem"], backend=backend, layers=[0, 1], progress=False)
    assert acts.stack("resid_pre").shape == (2, 2, 1, 64)
    assert dict(os.environ) == before


def test_serial_torch_restores_the_thread_count(threads):
    with serial_torch():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads
    with pytest.raises(RuntimeError), serial_torch():
        raise RuntimeError("boom")
    assert torch.get_num_threads() == threads
    with serial_torch(False):
        assert torch.get_num_threads() == threads


def test_kernels_and_spectra_restore_the_thread_count(threads):
    from vlsafe.analysis.kernels import pair_sums, piece_sums
    from vlsafe.analysis.spectral import left_singular

    seen = []

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return pair_sums(a, b, 0.0, 0.0)

    a = torch.randn(1000, dtype=torch.float32)
    sums, left_out = piece_sums(kernel, a, a + 1)
    assert left_out == 0 and float(sums[0, 2]) == pytest.approx(1000.0)        # ‖b − a‖² = 1000 · 1²
    assert seen == [1] and torch.get_num_threads() == threads
    s, _, method, _ = left_singular(torch.eye(8, dtype=torch.float64) * 2, 2)
    assert method == "exact" and torch.allclose(s, torch.full((8,), 2.0, dtype=torch.float64))
    assert torch.get_num_threads() == threads
