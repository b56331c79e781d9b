"""Batched generation: batched = unbatched greedy, left padding + positions, LVLM images, caching, sampling, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.behavior.generate import generate
from vlsafe.probes.models import load

# Lengths differ a lot so a batch needs padding, and the shortest comes first so sorting reorders them.
PROMPTS = ["Hi", "Write a poem about the sea and the lazy dog, with three tips for studying.",
           "How do I bake bread?", "Describe the shapes: triangle, square, circle."]


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path):
    return load(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def llava(tiny_llava_dir: Path):
    return load(str(tiny_llava_dir))


def _lengths(lm, prompts):
    from vlsafe.probes.templates import encode

    return [int(encode(lm, [p]).attention_mask.sum()) for p in prompts]


def test_batched_equals_unbatched_greedy(llama):
    assert len(set(_lengths(llama, PROMPTS))) == len(PROMPTS)  # every batch row is padded differently
    batched = generate(llama, PROMPTS, max_new_tokens=12, batch_size=4, cache=False, progress=False)
    single = [generate(llama, [p], max_new_tokens=12, batch_size=1, cache=False, progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) > 1 and all(batched)  # distinct, non-empty continuations (a real check, not ''=='')


def test_generate_positions_follow_the_attention_mask(llama):
    """HF generate must derive position ids from the left-padded mask (cumsum - 1), not 0..T-1."""
    seen = []

    def grab(module, args, kwargs):
        if not seen:
            seen.append((kwargs["position_ids"].clone(), kwargs["attention_mask"].clone()))

    handle = llama.model.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        generate(llama, PROMPTS[:2], max_new_tokens=2, cache=False, progress=False)
    finally:
        handle.remove()
    pos, mask = seen[0]
    assert bool((mask == 0).any())  # there was padding
    expected = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    assert torch.equal(pos.masked_fill(mask == 0, 0), expected)


def test_generation_stops_at_eos(llama):
    """Force EOS from the third step on: the output is exactly the first two tokens, nothing after EOS."""
    two = generate(llama, PROMPTS[:2], max_new_tokens=2, cache=False, progress=False)
    eight = generate(llama, PROMPTS[:2], max_new_tokens=8, cache=False, progress=False)
    calls = []

    def force_eos(module, args, out):
        calls.append(1)
        if len(calls) >= 3:
            out[..., llama.tokenizer.eos_token_id] = 1e4
        return out

    handle = llama.model.lm_head.register_forward_hook(force_eos)
    try:
        stopped = generate(llama, PROMPTS[:2], max_new_tokens=8, batch_size=2, cache=False, progress=False)
    finally:
        handle.remove()
    assert stopped == two and stopped != eight


def test_lvlm_blank_image_generation(llava):
    from vlsafe.probes.behavior.datasets import PromptSet, PromptRecord

    ps = PromptSet("t", [PromptRecord(f"r{i}", p, image="blank") for i, p in enumerate(PROMPTS[:3])])
    tower_batches = []
    handle = llava.model.model.vision_tower.register_forward_hook(
        lambda m, a, o: tower_batches.append(int(a[0].shape[0])))
    try:
        batched = generate(llava, ps, max_new_tokens=6, batch_size=3, cache=False, progress=False)
    finally:
        handle.remove()
    assert tower_batches == [3]  # the three blank images went through the vision tower once, batched
    single = [generate(llava, PromptSet("t", [r]), max_new_tokens=6, cache=False, progress=False)[0] for r in ps]
    assert batched == single and len(batched) == 3


def test_text_model_rejects_image_prompts(llama):
    with pytest.raises(VlsafeError, match="text-only"):
        generate(llama, PROMPTS[:2], images="blank", cache=False, progress=False)


@pytest.mark.parametrize("bad", [[], ["ok", "  "]])
def test_empty_prompts_rejected(llama, bad):
    with pytest.raises(VlsafeError, match="empty"):
        generate(llama, bad, cache=False, progress=False)


def test_cache_hit_on_second_run(llama, tmp_path, monkeypatch):
    first = generate(llama, PROMPTS, max_new_tokens=6, cache=tmp_path, progress=False)
    files = list(tmp_path.glob("*.jsonl"))
    assert len(files) == 1
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [r["response"] for r in rows] == first and [r["prompt"] for r in rows] == PROMPTS

    def boom(*a, **k):
        raise AssertionError("model.generate called on a cache hit")

    monkeypatch.setattr(llama.model, "generate", boom)
    assert generate(llama, PROMPTS, max_new_tokens=6, cache=tmp_path, progress=False) == first
    with pytest.raises(AssertionError, match="cache hit"):  # a different config is a miss
        generate(llama, PROMPTS, max_new_tokens=7, cache=tmp_path, progress=False)


def test_cache_misses_after_in_memory_weight_edit(llama, tmp_path, monkeypatch):
    generate(llama, PROMPTS[:2], max_new_tokens=4, cache=tmp_path, progress=False)
    w = llama.model.model.layers[0].mlp.down_proj.weight
    calls = []
    real = llama.model.generate
    monkeypatch.setattr(llama.model, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        w.mul_(0.5)
    try:
        generate(llama, PROMPTS[:2], max_new_tokens=4, cache=tmp_path, progress=False)
    finally:
        with torch.no_grad():
            w.mul_(2.0)
    assert calls and len(list(tmp_path.glob("*.jsonl"))) == 2


def test_sampling_is_reproducible_with_a_seed(llama):
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.0, cache=False, progress=False)
    a = generate(llama, PROMPTS, seed=3, **kw)
    assert a == generate(llama, PROMPTS, seed=3, **kw)
    assert a != generate(llama, PROMPTS, seed=4, **kw)
    assert a != generate(llama, PROMPTS, max_new_tokens=10, cache=False, progress=False)


@pytest.mark.smollm2
def test_smollm2_batched_equals_unbatched(smollm2_dir):
    lm = load(str(smollm2_dir))
    prompts = ["What is 2+2?", "Give me three tips for studying for an exam.", "Name a colour."]
    batched = generate(lm, prompts, max_new_tokens=12, batch_size=3, cache=False, progress=False)
    single = [generate(lm, [p], max_new_tokens=12, cache=False, progress=False)[0] for p in prompts]
    assert batched == single
    assert "4" in batched[0]  # the real model answers; not just equal garbage
