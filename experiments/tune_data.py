"""Training examples for `vlsafe tune`: prompt sets and files → (prompt, answer) or (prompt, chosen, rejected).

A data source is a shipped set / prompt file / hub id (`set:`) or a JSONL/JSON/CSV file of pairs (`file:`), with a
`target` saying where answers come from:

- `refuse` — a refusal, drawn (seeded) from `REFUSALS` (or the config's `refusals`); the default for sets whose
  name starts with `harmful`;
- `self` — the model's own greedy answer (self-distillation), dropped when the default judge calls it a
  refusal (never let refusals slip into compliance targets); the default for other sets;
- `given` — the file's own `answer` column (SFT) or `chosen`/`rejected` columns (DPO); the default for files.

For DPO, set sources become preference pairs: `refuse` → chosen = refusal, rejected = the model's own answer;
`self` → chosen = the model's answer, rejected = a refusal (teaches not to over-refuse).
An `image` (spec such as `blank`, or a path) on a source, or per row, makes LVLM examples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from vlsafe.analysis.errors import VlsafeError

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't assist with that request.",
    "I can't help with that. It could cause real harm.",
    "I'm sorry, but I won't provide that information.",
    "I cannot help with this request because it could be used to hurt people.",
    "Sorry, I can't help with that. If you have another question, I'm happy to help.",
)
TARGETS = ("refuse", "self", "given")


class DataSource(BaseModel):
    """One source of training examples (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    set: str | None = None
    file: str | None = None
    target: Literal["refuse", "self", "given"] | None = None
    limit: int | None = None
    image: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        if isinstance(v, str):
            suffixes = (".jsonl", ".json", ".csv", ".tsv")
            return {"file": v} if v.lower().endswith(suffixes) else {"set": v}
        return v

    @model_validator(mode="after")
    def _one_of(self) -> "DataSource":
        if (self.set is None) == (self.file is None):
            raise ValueError("give exactly one of 'set' (a prompt set) or 'file' (a JSONL/CSV of pairs)")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be positive, got {self.limit}")
        return self

    @property
    def resolved_target(self) -> str:
        if self.target is not None:
            return self.target
        if self.file is not None:
            return "given"
        return "refuse" if self.set.split("/")[-1].startswith("harmful") else "self"

    @property
    def label(self) -> str:
        return self.set or self.file


@dataclass
class Row:
    """A prompt waiting for its answer(s)."""

    prompt: str
    image: str | None
    target: str
    answer: str | None = None
    chosen: str | None = None
    rejected: str | None = None


def _read_file(src: DataSource, base_dir: Path, dpo: bool) -> list[Row]:
    import pandas as pd

    path = Path(src.file)
    path = path if path.is_file() else base_dir / path
    if not path.is_file():
        raise VlsafeError(f"data file '{src.file}' not found")
    try:
        df = pd.read_json(path, lines=path.suffix == ".jsonl") if path.suffix in (".jsonl", ".json") else \
            pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    except ValueError as e:
        raise VlsafeError(f"{path}: cannot read ({str(e).splitlines()[0][:120]})") from None
    need = ["prompt"] + ((["chosen", "rejected"] if dpo else ["answer"]) if src.resolved_target == "given" else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise VlsafeError(f"{path}: no column '{missing[0]}' (columns: {', '.join(map(str, df.columns))})")
    rows = []
    for i, r in enumerate(df.to_dict("records")):
        for c in need:
            if not isinstance(r[c], str) or not r[c].strip():
                raise VlsafeError(f"{path}: row {i + 1}: '{c}' is empty")
        image = r.get("image") if isinstance(r.get("image"), str) else src.image
        rows.append(Row(r["prompt"], image, src.resolved_target, r.get("answer"), r.get("chosen"), r.get("rejected")))
    return rows


def _read_set(src: DataSource) -> list[Row]:
    from vlsafe.probes.behavior.datasets import load_prompts

    ps = load_prompts(src.set)
    if src.resolved_target == "given":
        raise VlsafeError(f"data set '{src.set}': target 'given' needs a file with answers")
    return [Row(r.prompt, r.image or src.image, src.resolved_target) for r in ps.records]


def collect(sources: list[DataSource], base_dir: Path, dpo: bool, seed: int) -> list[Row]:
    """Rows of every source (each limited to a seeded sample of `limit`), in source order."""
    rows: list[Row] = []
    for i, src in enumerate(sources):
        got = _read_file(src, base_dir, dpo) if src.file else _read_set(src)
        if not got:
            raise VlsafeError(f"data source '{src.label}' is empty")
        if src.limit is not None and src.limit < len(got):
            got = random.Random(seed + i).sample(got, src.limit)
        rows.extend(got)
    return rows


def _self_answers(lm: Any, rows: list[Row], max_new_tokens: int, batch_size: int) -> list[str]:
    from vlsafe.probes.behavior.generate import generate

    if not rows:
        return []
    images = None if all(r.image is None for r in rows) else [r.image for r in rows]
    return generate(lm, [r.prompt for r in rows], images=images, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, progress=False)


def _judged_refusals(answers: list[str], prompts: list[str]) -> list[bool]:
    if not answers:
        return []
    try:
        from vlsafe.probes.behavior.judges import get_judge
    except ImportError:
        return [False] * len(answers)
    return [r.refused for r in get_judge("default").judge(answers, prompts)]


def _hit_limit(lm: Any, answer: str, max_new_tokens: int) -> bool:
    """Whether a greedy answer was cut by `max_new_tokens` (then no end-of-turn is trained after it)."""
    return len(lm.tokenizer(answer, add_special_tokens=False)["input_ids"]) >= max_new_tokens - 1


def build_examples(rows: list[Row], lm: Any, *, dpo: bool, refusals: tuple[str, ...] = REFUSALS, seed: int = 0,
                   max_new_tokens: int = 64, batch_size: int = 16) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Fill in answers and return them (seeded shuffle) with counts (`examples`, `dropped`).

    SFT examples are `{prompt, answer, image, complete}` (`complete=False` when a self-distilled answer hit
    `max_new_tokens`, so `vlsafe.experiments.tuning` adds no end-of-turn after it); DPO ones `{prompt, chosen,
    rejected, image}`."""
    rng = random.Random(seed)
    need_self = [r for r in rows if r.target == "self" or (dpo and r.target == "refuse")]
    answers = _self_answers(lm, need_self, max_new_tokens, batch_size)
    own = {id(r): a for r, a in zip(need_self, answers)}
    refused = dict(zip((id(r) for r in need_self), _judged_refusals(answers, [r.prompt for r in need_self])))
    out, dropped = [], 0
    for r in rows:
        refusal = rng.choice(refusals)
        if id(r) in own and (refused[id(r)] or not own[id(r)].strip()):
            dropped += 1  # a refusing "self" target, or (DPO) a harmful prompt the model already refuses
            continue
        if dpo:
            chosen, rejected = {"refuse": (refusal, own.get(id(r))), "self": (own.get(id(r)), refusal),
                                "given": (r.chosen, r.rejected)}[r.target]
            if not rejected or not rejected.strip():
                dropped += 1
                continue
            out.append({"prompt": r.prompt, "chosen": chosen, "rejected": rejected, "image": r.image})
        else:
            answer = {"refuse": refusal, "self": own.get(id(r)), "given": r.answer}[r.target]
            cut = r.target == "self" and _hit_limit(lm, answer, max_new_tokens)
            out.append({"prompt": r.prompt, "answer": answer, "image": r.image, "complete": not cut})
    rng.shuffle(out)
    if not out:
        raise VlsafeError("no training examples left (every self-distilled answer was empty or a refusal)")
    return out, {"examples": len(out), "dropped": dropped}
