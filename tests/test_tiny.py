"""`vlsafe.analysis.tiny.tiny_llava_from` and the notebooks' `vlsafe.experiments.notebook.setup`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vlsafe.analysis.tiny import tiny_llama, tiny_llava_from


def test_tiny_llava_from_carries_the_llm_text_only(tmp_path: Path) -> None:
    llm_dir = tiny_llama(tmp_path / "llm", layers=3, seed=1)
    lvlm, processor, llm = tiny_llava_from(llm_dir, tmp_path / "init", seed=2)
    assert type(lvlm).__name__ == "LlavaForConditionalGeneration"
    ids = processor.tokenizer(["a tiny prompt", "another"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = llm(**ids).logits
        b = lvlm(**ids).logits
    assert torch.equal(a, b[..., : a.shape[-1]])
    tower = lvlm.model.vision_tower.state_dict()
    other = tiny_llava_from(llm_dir, tmp_path / "init3", seed=3)[0].model.vision_tower.state_dict()
    assert any(not torch.equal(tower[k], other[k]) for k in tower)  # the tower is random, seeded, not the LLM's


def test_notebook_setup(tmp_path: Path, monkeypatch) -> None:
    from vlsafe.experiments.notebook import setup

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    setup(7, tmp_path / "out", precision=3)
    import pandas as pd

    first = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(first, torch.rand(3))
    assert (tmp_path / "out").is_dir() and os.environ["HF_HUB_OFFLINE"] == "1"
    assert pd.get_option("display.precision") == 3
    pd.reset_option("display.precision")
