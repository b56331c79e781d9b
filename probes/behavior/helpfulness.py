"""Helpfulness: compliance on harmless prompts, an answer-quality proxy, and a task-accuracy hook.

- :func:`judged_compliance`: 1 − refusal rate of a judge on responses to harmless prompts, with a Wilson 95 % CI.
- :func:`answer_loglik`: mean per-token log-likelihood of reference answers (e.g. the base model's own greedy
  answers, :func:`reference_answers`) under a checkpoint; batched with left padding, loss only on answer tokens,
  reduced in fp64. A checkpoint that lost capability assigns its former answers lower likelihood.
- :func:`task_accuracy`: fraction of responses a user callable marks correct (e.g. the organism's visual QA).

>>> base, tuned = load("default"), load("runs/organism/vl")
>>> refs = reference_answers(base, load_prompts("harmless-test", limit=32))
>>> answer_loglik(tuned, load_prompts("harmless-test", limit=32), refs).mean()
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import numpy as np
import torch

from vlsafe.analysis.errors import VlsafeError


def reference_answers(lm: Any, prompts: Any, *, max_new_tokens: int = 64, **generate_kw: Any) -> list[str]:
    """Greedy answers of `lm` to `prompts` (a list or a `PromptSet`), to score other checkpoints against."""
    from vlsafe.probes.behavior.generate import generate

    return generate(lm, prompts, max_new_tokens=max_new_tokens, **generate_kw)


def judged_compliance(responses: Sequence[str], judge: Any = "default",
                    prompts: Sequence[str] | None = None) -> dict[str, Any]:
    """`{n, complied, compliance_rate, ci_low, ci_high, judge}` for responses to harmless prompts.

    `judge` is a registered judge name or a `Judge` object; a refusal (partial ones included) is non-compliance.
    """
    from vlsafe.probes.behavior.judges import get_judge
    from vlsafe.probes.behavior.metrics import wilson_interval

    responses = list(responses)
    if not responses:
        raise VlsafeError("judged_compliance: no responses")
    j = get_judge(judge) if isinstance(judge, str) else judge
    refused = [r.refused for r in j.judge(responses, None if prompts is None else list(prompts))]
    complied = len(refused) - sum(bool(x) for x in refused)
    lo, hi = wilson_interval(complied, len(refused))
    return {"n": len(refused), "complied": complied, "compliance_rate": complied / len(refused),
            "ci_low": lo, "ci_high": hi, "judge": getattr(j, "name", str(judge))}


def task_accuracy(records: Sequence[Any], responses: Sequence[str],
                  scorer: Callable[[Any, str], bool]) -> dict[str, Any]:
    """`{n, correct, accuracy, ci_low, ci_high}` with `scorer(record, response) -> bool` per prompt record."""
    from vlsafe.probes.behavior.metrics import wilson_interval

    records, responses = list(getattr(records, "records", records)), list(responses)
    if len(records) != len(responses):
        raise VlsafeError(f"task_accuracy: {len(records)} records but {len(responses)} responses")
    if not records:
        raise VlsafeError("task_accuracy: no records")
    correct = sum(bool(scorer(rec, resp)) for rec, resp in zip(records, responses))
    lo, hi = wilson_interval(correct, len(records))
    return {"n": len(records), "correct": correct, "accuracy": correct / len(records), "ci_low": lo, "ci_high": hi}


# ----------------------------------------------------------------------------------------------------- log-likelihood

def answer_loglik(lm: Any, prompts: Any, answers: Sequence[str], *, images: Any = None, system: str | None = None,
                  batch_size: int = 8, progress: bool = False) -> np.ndarray:
    """Mean log-probability per answer token of each `answers[i]` after the chat-formatted `prompts[i]` (fp64).

    The answer is tokenized on its own and appended to the prompt's ids (no end-of-turn token), so the scored
    tokens are exactly the answer's. `prompts` may be a `PromptSet` (its records' images are used for an LVLM).
    """
    from tqdm.auto import tqdm

    from vlsafe.probes.behavior.generate import GenerationSettings, check_inputs, prompt_texts_and_images

    texts, specs = prompt_texts_and_images(prompts, images)
    check_inputs(lm, texts, specs, GenerationSettings(), batch_size)
    answers = list(answers)
    if len(answers) != len(texts):
        raise VlsafeError(f"answer_loglik: {len(answers)} answers for {len(texts)} prompts")
    rows = [_row(lm, t, im, a, system, i) for i, (t, im, a) in enumerate(zip(texts, specs, answers))]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["ids"]))
    out = np.zeros(len(rows), dtype=np.float64)
    chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for idx in tqdm(chunks, desc="answer log-likelihood", disable=not progress, leave=False):
        out[idx] = _batch_loglik(lm, [rows[i] for i in idx])
    return out


def _row(lm: Any, prompt: str, image: Any, answer: str, system: str | None, i: int) -> dict[str, Any]:
    from vlsafe.probes.behavior.generate import load_image
    from vlsafe.probes.templates import encode

    if not isinstance(answer, str) or not answer.strip():
        raise VlsafeError(f"answer_loglik: answer {i} is empty")
    enc = encode(lm, [prompt], None if image is None else [load_image(image)], system=system)
    ans = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not ans:
        raise VlsafeError(f"answer_loglik: answer {i} has no tokens")
    return {"ids": enc.input_ids[0].tolist() + list(ans), "n_answer": len(ans), "pixel_values": enc.pixel_values}


def _batch_loglik(lm: Any, rows: list[dict[str, Any]]) -> np.ndarray:
    from vlsafe.analysis.placement import input_device

    device = input_device(lm.model)
    width = max(len(r["ids"]) for r in rows)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r["ids"]):] = torch.tensor(r["ids"])
        mask[b, width - len(r["ids"]):] = 1
    inputs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                              "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(device)}
    pixels = [r["pixel_values"] for r in rows if r["pixel_values"] is not None]
    if pixels:
        inputs["pixel_values"] = torch.cat(pixels).to(device)
    keep = max(r["n_answer"] for r in rows) + 1  # logits at the last `keep` positions predict every answer token
    if "logits_to_keep" in inspect.signature(lm.model.forward).parameters:
        inputs["logits_to_keep"] = keep
    with torch.inference_mode():
        logits = lm.model(**inputs).logits[:, -keep:]
    logp = torch.log_softmax(logits.to(torch.float64), -1)[:, :-1]  # position j predicts token j + 1
    target = ids[:, width - keep + 1:].to(logp.device)
    tok_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return np.array([tok_logp[b, keep - 1 - r["n_answer"]:].mean().item() for b, r in enumerate(rows)])
