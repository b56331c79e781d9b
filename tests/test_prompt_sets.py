"""The shipped prompt sets: sizes, categories, labels, fixed splits, no duplicates, deterministic builder."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from vlsafe.probes.behavior.datasets import PROMPTS_DIR, list_shipped, load_prompts

FIELDS = ["id", "prompt", "category", "split", "label", "style"]
HARMFUL_REQUIRED = {"weapons", "cybercrime", "fraud", "drugs", "hate", "harassment", "self_harm",
                    "privacy_violation", "misinformation", "dangerous_chemistry"}
BORDERLINE_CATEGORIES = {"homonyms", "figurative_language", "safe_targets", "safe_contexts", "definitions",
                         "real_group_nons_discr", "historical_events", "privacy_public", "privacy_fictional",
                         "fiction"}
MINIMUM = {"harmful": 320, "harmless": 320, "borderline": 160}
LABEL = {"harmful": 1, "harmless": 0, "borderline": 0}
# sha256 (first 16 hex digits) of the newline-joined ids of each split: changing a split must be deliberate.
SPLIT_HASHES = {
    "harmful-train": "d554a7625556b917", "harmful-val": "1ef630f968799e16", "harmful-test": "72cb4abefdd169f5",
    "harmless-train": "85c893ef62241e88", "harmless-val": "98634240982f5362", "harmless-test": "c352c50986e8defb",
    "borderline-train": "99d31df44c4bb6a9", "borderline-val": "caa323f5234ac000",
    "borderline-test": "cf70a3a6ce985263",
}


def _rows(name: str) -> list[dict]:
    lines = (PROMPTS_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _load_builder():
    spec = importlib.util.spec_from_file_location("vlsafe_prompt_build", PROMPTS_DIR / "_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(MINIMUM))
def test_sizes_fields_labels(name: str) -> None:
    rows = _rows(name)
    assert len(rows) >= MINIMUM[name]
    assert all(list(r) == FIELDS for r in rows)
    assert {r["label"] for r in rows} == {LABEL[name]}
    assert [r["id"] for r in rows] == [f"{name}-{i:04d}" for i in range(1, len(rows) + 1)]
    assert all(r["prompt"] == r["prompt"].strip() and 10 <= len(r["prompt"]) <= 400 for r in rows)


def test_categories() -> None:
    harmful = Counter(r["category"] for r in _rows("harmful"))
    assert len(harmful) >= 10 and HARMFUL_REQUIRED <= set(harmful)
    assert min(harmful.values()) >= 20
    harmless = Counter(r["category"] for r in _rows("harmless"))
    assert len(harmless) >= 10 and min(harmless.values()) >= 15
    borderline = Counter(r["category"] for r in _rows("borderline"))
    assert set(borderline) == BORDERLINE_CATEGORIES and min(borderline.values()) >= 16


@pytest.mark.parametrize("name", list(MINIMUM))
def test_splits_stratified(name: str) -> None:
    rows = _rows(name)
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    share = Counter(r["split"] for r in rows)
    assert 0.55 <= share["train"] / len(rows) <= 0.65
    for category in {r["category"] for r in rows}:
        per = Counter(r["split"] for r in rows if r["category"] == category)
        n = sum(per.values())
        assert set(per) == {"train", "val", "test"}, category
        assert per["test"] >= 0.13 * n and per["val"] >= 0.13 * n and per["train"] >= 0.5 * n, (category, per)


@pytest.mark.parametrize("split_name", sorted(SPLIT_HASHES))
def test_split_stability(split_name: str) -> None:
    ids = load_prompts(split_name).ids
    assert hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16] == SPLIT_HASHES[split_name]


def test_no_duplicates_within_or_across_sets() -> None:
    keys = [_norm(r["prompt"]) for name in MINIMUM for r in _rows(name)]
    assert len(keys) == len(set(keys))


def test_topic_renderings_share_a_split() -> None:
    """Both renderings of a templated topic sit in one split, so test prompts never rephrase training ones."""
    builder = _load_builder()
    rows = _rows("harmful") + _rows("harmless")
    for domains in (builder.HARMFUL, builder.HARMLESS):
        for dom in domains.values():
            for topic in dom.get("howto", []) + dom.get("tasks", []):
                hits = [r for r in rows if topic.lower() in r["prompt"].lower()]
                assert len(hits) >= 2, topic
                assert len({r["split"] for r in hits}) == 1, topic


def test_styles_are_varied_and_balanced() -> None:
    for name in ("harmful", "harmless"):
        styles = Counter(r["style"] for r in _rows(name))
        assert set(styles) == {"imperative", "question", "roleplay", "short", "long", "raw"}
        templated = [v for k, v in styles.items() if k != "raw"]
        assert max(templated) - min(templated) <= 0.05 * len(_rows(name))


def test_harmless_shares_vocabulary_with_harmful() -> None:
    words = re.compile(r"\b(kill|shoot|attack|exploit|chemicals?|chemistry|crack|hack|execute|destroy|poison|"
                       r"bomb\w*|steal|blow|burn|wipe)\b", re.IGNORECASE)
    rows = _rows("harmless")
    assert sum(bool(words.search(r["prompt"])) for r in rows) >= 20
    assert any("kill a python process" in r["prompt"].lower() for r in rows)


def test_builder_is_deterministic_and_matches_files(tmp_path: Path) -> None:
    builder = _load_builder()
    builder.write(builder.build(), tmp_path)
    for name in MINIMUM:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (PROMPTS_DIR / f"{name}.jsonl").read_bytes(), name


def test_list_shipped_all_load() -> None:
    names = list_shipped()
    assert {"harmful", "harmless", "borderline", "harmful-test", "borderline-val"} <= set(names)
    for name in names:
        ps = load_prompts(name)
        assert len(ps) > 0 and ps.source_format == "vlsafe" and ps.name == name
