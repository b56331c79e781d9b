"""The SFT objective: summed next-token cross-entropy over answer tokens only.

`head_loss` runs the LM head on the answer positions alone. On SmolLM2 the 49,152 × 576 head is about a fifth of
a token's forward work, and answers are a third or less of an SFT example, so this saves ~15 % of a training
step. It relies on the last hidden state being exactly what the head consumes, which holds for plain heads (Llama,
LLaVA) but not for soft-capped or scaled logits; `pick_loss` therefore checks it once on a real batch against the
model's own logits and falls back to `full_loss` whenever the two disagree (or the model lacks `logits_to_keep`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from vlsafe.analysis.placement import compute_precision

IGNORE = -100
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor, str], torch.Tensor]


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over answer positions and their count."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    n = int((shift_labels != IGNORE).sum())
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, n


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def full_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
              precision: str) -> torch.Tensor:
    """`answer_loss` on the model's full logits (every position × the whole vocabulary)."""
    with compute_precision(precision, _device(model)):
        logits = model(**inputs, use_cache=False).logits
    return answer_loss(logits, labels)[0]


def head_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
              precision: str) -> torch.Tensor:
    """The same loss with the LM head applied to answer positions only (see the module docstring)."""
    with compute_precision(precision, _device(model)):
        out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        target = labels[:, 1:]
        keep = target != IGNORE
        logits = model.get_output_embeddings()(out.hidden_states[-1][:, :-1][keep])
    return F.cross_entropy(logits.float(), target[keep], reduction="sum")


def pick_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossFn:
    """`head_loss` when it reproduces `full_loss` on `batch` (fp32, rtol 1e-4), else `full_loss`."""
    inputs: dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
    try:
        with torch.no_grad():
            a = full_loss(model, inputs, batch["labels"], "fp32")
            b = head_loss(model, inputs, batch["labels"], "fp32")
        same = bool(torch.isclose(a, b, rtol=1e-4, atol=1e-4))
    except (TypeError, AttributeError, IndexError, RuntimeError):
        same = False
    return head_loss if same else full_loss
