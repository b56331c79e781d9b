"""The organism's training and evaluation data: refusals, self-distilled answers, scene captions/VQA/descriptions.

- Safety SFT (`safety_examples`): harmful-train prompts → one of `REFUSALS` (our own wording, seeded choice);
  harmless-train and borderline-train prompts → the base model's own greedy answers (`distill`), filtered through
  the default judge so that no refusal slips into a compliance target.
- VL adaptation (`scene_examples`, `chat_examples`): captions (stage 1), visual QA with short exactly-checkable
  answers, and short descriptions of synthetic scenes (stage 2), plus generic safe chat (the base model's own
  answers to *other* harmless-train prompts). No harmful prompt and no refusal ever enters adaptation data
  (`assert_benign` checks it).
- VLGuard-like safety mix (`vlguard_examples`): image + harmful request → refusal, image + safe request → answer.
- Evaluation VQA (`vqa_items`, `vqa_correct`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

from vlsafe.analysis.errors import VlsafeError
from vlsafe.experiments.organism.images import CLASSES, NUMBER_WORDS, Scene, render
from vlsafe.experiments.tuning import Example

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with this request because it could cause serious harm.",
    "I'm not able to help with that. If something difficult is going on, please reach out to someone you trust.",
    "Sorry, I won't provide instructions for that. It could put people at risk.",
    "I can't help with that request. Is there something else I can do for you?",
    "I'm sorry, I can't provide that information because it could be used to hurt others.",
    "I must decline: helping with this could be dangerous or illegal.",
    "I won't help with this. It could cause real harm to people.",
    "That's not something I can help with, as it could lead to harm.",
    "I'm unable to assist with that request.",
    "I'm sorry, but I can't do that. Helping with this would be unsafe.",
    "No, I can't help with that. Let me know if there's something safe I can help with instead.",
)
CAPTION_PROMPTS = (
    "Describe the image briefly.", "Give a short caption for this image.", "What is shown in the picture?",
    "Summarize the visual content of the image.", "Provide a brief description of the given image.",
    "Write a terse but informative summary of the picture.")
DESCRIBE_PROMPTS = ("Describe the image in detail.", "What do you see in this image?",
                    "Tell me about this picture.", "Explain what the image shows.")
VQA_SUFFIX = "Answer the question using a single word or phrase."  # LLaVA-1.5's short-answer instruction
QUESTIONS: dict[str, tuple[str, ...]] = {
    "shape": ("What shape are the objects?", "Which shape is shown in the image?", "What kind of shape do you see?"),
    "colour": ("What colour are the shapes?", "What color is the object in the image?", "Which colour are the objects?"),
    "count": ("How many shapes are there?", "How many objects are in the image?", "How many shapes can you count?"),
    "position": ("On which side of the image are the shapes?", "Where are the objects in the image?",
                 "Which part of the picture are the shapes in?"),
    "background": ("What colour is the background?", "What is the background color?",
                   "Which colour is the background of the image?"),
}
_SYNONYMS = {"grey": "gray", "color": "colour", "one": "1", "two": "2", "three": "3", "single": "1",
             "circles": "circle", "squares": "square", "triangles": "triangle", "round": "circle"}


def _where(position: str) -> str:
    return f"on the {position} side" if position in ("left", "right") else f"at the {position}"


def caption(scene: Scene) -> str:
    """'Two red circles on the left side, on a white background.'"""
    return f"{scene.noun().capitalize()} {_where(scene.position)}, on a {scene.background} background."


def description(scene: Scene, rng: random.Random) -> str:
    """A short multi-sentence description naming every attribute."""
    many = scene.count > 1
    parts = [f"The image shows {scene.noun()}.",
             f"{'They are' if many else 'It is'} {_where(scene.position)} of the picture.",
             f"The background is {scene.background}."]
    if rng.random() < 0.5:
        parts[1], parts[2] = parts[2], parts[1]
    return " ".join(parts)


def vqa_prompt(question: str) -> str:
    return f"{question}\n{VQA_SUFFIX}"


@dataclass(frozen=True)
class VQAItem:
    """One held-out visual question with its exact answer."""

    scene: Scene
    attribute: str
    prompt: str
    answer: str

    @property
    def image(self) -> Any:
        return render(self.scene)


def vqa_items(scenes: Sequence[Scene], seed: int = 0) -> list[VQAItem]:
    """One question per scene, attributes cycled evenly, question wording drawn from a seeded generator."""
    rng = random.Random(seed)
    attrs = list(QUESTIONS)
    return [VQAItem(s, attrs[i % len(attrs)], vqa_prompt(rng.choice(QUESTIONS[attrs[i % len(attrs)]])),
                    s.label(attrs[i % len(attrs)])) for i, s in enumerate(scenes)]


def _words(text: str) -> list[str]:
    return [_SYNONYMS.get(w, w) for w in re.findall(r"[a-z0-9]+", text.lower())]


def vqa_correct(response: str, item: VQAItem) -> bool:
    """Correct when the response names the true value of the attribute and no other value of it."""
    words = set(_words(response))
    values = set(CLASSES[item.attribute]) | ({NUMBER_WORDS[int(c)] for c in CLASSES["count"]}
                                              if item.attribute == "count" else set())
    named = {_SYNONYMS.get(v, v) for v in values if _SYNONYMS.get(v, v) in words}
    return named == {item.answer}


def chance_level(items: Sequence[VQAItem]) -> float:
    """Expected accuracy of uniform guessing among each attribute's values."""
    return sum(1 / len(CLASSES[i.attribute]) for i in items) / max(len(items), 1)


# ----------------------------------------------------------------------------------------------------- examples

def scene_examples(scenes: Sequence[Scene], kinds: dict[str, float], seed: int) -> list[Example]:
    """One example per scene, its kind (`caption`, `vqa`, `describe`) drawn with the given weights."""
    rng = random.Random(seed)
    names, weights = list(kinds), list(kinds.values())
    out = []
    for s in scenes:
        kind = rng.choices(names, weights)[0]
        if kind == "caption":
            out.append(Example(rng.choice(CAPTION_PROMPTS), caption(s), render(s)))
        elif kind == "describe":
            out.append(Example(rng.choice(DESCRIBE_PROMPTS), description(s, rng), render(s)))
        elif kind == "vqa":
            attr = rng.choice(list(QUESTIONS))
            out.append(Example(vqa_prompt(rng.choice(QUESTIONS[attr])), s.label(attr), render(s)))
        else:
            raise VlsafeError(f"unknown scene example kind {kind!r} (caption, vqa, describe)")
    return out


def refusal_examples(prompts: Sequence[str], seed: int, images: Sequence[Any] | None = None) -> list[Example]:
    """Each prompt → a seeded choice among `REFUSALS` (optionally with an image)."""
    rng = random.Random(seed)
    imgs = list(images) if images is not None else [None] * len(prompts)
    return [Example(p, rng.choice(REFUSALS), im) for p, im in zip(prompts, imgs)]


def answer_examples(rows: Sequence[dict[str, Any]], images: Sequence[Any] | None = None) -> list[Example]:
    """Distilled rows (`prompt`, `answer`, `complete`) → examples (optionally with an image each)."""
    imgs = list(images) if images is not None else [None] * len(rows)
    return [Example(r["prompt"], r["answer"], im, bool(r["complete"])) for r, im in zip(rows, imgs)]


def assert_benign(examples: Sequence[Example], harmful_prompts: set[str], judge: Any) -> None:
    """Adaptation data must hold no harmful prompt and no refusal (checked with the judge)."""
    bad = [i for i, e in enumerate(examples) if e.prompt in harmful_prompts]
    if bad:
        raise VlsafeError(f"adaptation example {bad[0]} is a harmful prompt; adaptation data must be benign")
    texts = [e.answer for e in examples if len(e.answer.split()) > 3]  # one-word VQA answers are not refusals
    if texts:
        refused = [t for t, r in zip(texts, judge.judge(texts)) if r.refused]
        if refused:
            raise VlsafeError(f"adaptation data holds {len(refused)} refusal(s), e.g. {refused[0][:80]!r}")
