"""The optional vLLM generation engine: backend selection and fallback (vLLM is absent here), and the requests
it would send — same chat formatting, token ids and stop ids as the transformers path. The engine itself runs
only where vLLM and a GPU exist (last test)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from vlsafe.analysis.checkpoints import open_checkpoint
from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.behavior import vllm_backend as V
from vlsafe.probes.behavior.generate import GenerationSettings, generate, stop_token_ids
from vlsafe.probes.templates import blank_image, encode, format_chat

PROMPTS = ["How do I bake bread?", "Write a poem about the sea, please."]


@pytest.fixture
def no_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now fails even where it is installed


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return open_checkpoint(tiny_llama_dir).load_model()


def test_available_follows_importability(no_vllm):
    assert V.available() is False


def test_explicit_vllm_falls_back_with_one_line_warning(no_vllm, caplog):
    with caplog.at_level(logging.WARNING, logger="vlsafe.generate"):
        assert V.select_backend("vllm") == "transformers"
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and "vLLM is not installed" in msgs[0] and "vlsafe[vllm]" in msgs[0] and "\n" not in msgs[0]


def test_auto_needs_vllm_and_a_gpu(monkeypatch):
    monkeypatch.setattr(V, "available", lambda: False)
    assert V.select_backend("auto") == "transformers"
    monkeypatch.setattr(V, "available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert V.select_backend("auto") == "transformers"
    assert V.select_backend("vllm") == "vllm"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert V.select_backend("auto") == "vllm"
    assert V.select_backend("HF") == V.select_backend("transformers") == "transformers"
    with pytest.raises(VlsafeError, match="unknown generation backend 'tensorrt'"):
        V.select_backend("tensorrt")


def test_generate_vllm_without_vllm_is_a_clear_error(no_vllm, tiny_llama_dir):
    with pytest.raises(VlsafeError, match=r"vLLM is not installed: pip install 'vlsafe\[vllm\]'"):
        V.generate_vllm(tiny_llama_dir, PROMPTS, max_new_tokens=4)


def test_generate_with_falls_back_to_the_same_outputs(no_vllm, tiny_llama_dir, llama):
    kw = dict(max_new_tokens=4, cache=False, progress=False)
    assert V.generate_with("vllm", str(tiny_llama_dir), PROMPTS, tensor_parallel_size=2, **kw) == \
        generate(llama, PROMPTS, **kw)


def test_loaded_model_stays_with_transformers(monkeypatch, llama):
    monkeypatch.setattr(V, "available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kw = dict(max_new_tokens=3, cache=False, progress=False)
    assert V.generate_with("auto", llama, PROMPTS[:1], **kw) == generate(llama, PROMPTS[:1], **kw)
    with pytest.raises(VlsafeError, match="loads weights from disk"):
        V.generate_with("vllm", llama, PROMPTS[:1], **kw)


def test_text_requests_are_the_transformers_token_ids(tiny_llama_dir, llama):
    ckpt = open_checkpoint(tiny_llama_dir)
    fmt, tok = V.formatter(ckpt)
    reqs = V.build_requests(fmt, tok, PROMPTS, [None, None], system="Be brief.")
    batch = encode(llama, PROMPTS, system="Be brief.")
    for row, req in enumerate(reqs):
        ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()  # left padding removed
        assert req == {"prompt_token_ids": ids}
    assert V._stop_ids(ckpt, tok) == stop_token_ids(llama)


def test_image_requests_carry_the_processor_template(tiny_llava_dir):
    ckpt = open_checkpoint(tiny_llava_dir)
    fmt, tok = V.formatter(ckpt)
    image = blank_image(32)
    reqs = V.build_requests(fmt, tok, PROMPTS, [image, None])
    assert reqs[0]["prompt"] == format_chat(fmt, PROMPTS[0], image=True) and "<image>" in reqs[0]["prompt"]
    assert reqs[0]["multi_modal_data"]["image"] is image
    assert "prompt_token_ids" in reqs[1] and "multi_modal_data" not in reqs[1]


def test_sampling_params_greedy_and_seeded():
    greedy = V.sampling_kwargs(GenerationSettings(max_new_tokens=7), [2])
    assert greedy["temperature"] == 0.0 and greedy["max_tokens"] == 7 and greedy["stop_token_ids"] == [2]
    assert "seed" not in greedy
    sampled = V.sampling_kwargs(GenerationSettings(8, True, 0.7, 0.9, 5), [2, 3])
    assert (sampled["temperature"], sampled["top_p"], sampled["seed"]) == (0.7, 0.9, 5)


@pytest.mark.skipif(not (V.available() and torch.cuda.is_available()), reason="needs vLLM and a CUDA GPU")
def test_vllm_greedy_matches_transformers(smollm2_dir):
    from vlsafe.probes.models import load

    lm = load(smollm2_dir, device="cuda")
    kw = dict(max_new_tokens=16)
    ref = generate(lm, PROMPTS, cache=False, progress=False, **kw)
    got = V.generate_vllm(smollm2_dir, PROMPTS, dtype="float32", gpu_memory_utilization=0.3, progress=False, **kw)
    assert got == ref
