"""Shared fixtures: tiny real-format checkpoints built in-process, and the embedded SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_dir: Path) -> Path:
    """A 2-layer random LlamaForCausalLM (hidden 64) with a ChatML tokenizer, saved in HF format."""
    from vlsafe.analysis.tiny import tiny_llama

    return tiny_llama(tiny_dir / "llama")


@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_dir: Path) -> Path:
    """A random LlavaForConditionalGeneration (CLIP tower, 2-layer Llama LM) with its processor."""
    from vlsafe.analysis.tiny import tiny_llava

    return tiny_llava(tiny_dir / "llava", vision="clip")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once to the vlsafe safetensors cache."""
    from vlsafe.analysis.resolve import resolve

    return resolve("default")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny models (threads only add overhead and contend on shared cores);
    use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
