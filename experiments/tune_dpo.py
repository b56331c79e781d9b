"""DPO for `vlsafe tune` through trl's `DPOTrainer` (trl 1.x API), CPU, fp32, no reporting.

Examples are conversational preference pairs (`prompt` as a user turn, `chosen`/`rejected` as assistant turns),
so trl applies the model's own chat template. Full fine-tuning respects the caller's frozen parameters (the
Trainer's optimizer only sees `requires_grad` ones); a LoRA model (a peft model built by the caller) gets trl's
frozen "ref" adapter copy as reference, a full model the `ref_model` passed in (a second copy of the starting
checkpoint). Text-only: image preference pairs are refused with a clear error.
"""

from __future__ import annotations

import tempfile
from typing import Any, Callable

import pandas as pd

from vlsafe.analysis.errors import VlsafeError


def _dataset(examples: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    if any(e.get("image") for e in examples):
        raise VlsafeError("DPO with images is not supported yet (text-only preference pairs); drop 'image' from the "
                          "DPO data or use method sft/lora for image examples")
    return Dataset.from_list([{"prompt": [{"role": "user", "content": e["prompt"]}],
                               "chosen": [{"role": "assistant", "content": e["chosen"]}],
                               "rejected": [{"role": "assistant", "content": e["rejected"]}]} for e in examples])


def _log(history: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [{"step": h["step"], **{k: v for k, v in h.items() if k != "step"}} for h in history if "loss" in h]
    return pd.DataFrame(rows)


def train_dpo(model: Any, tokenizer: Any, examples: list[dict[str, Any]], hp: Any, *, ref_model: Any = None,
              progress: bool = True, callback: Callable[[dict[str, Any]], None] | None = None) -> tuple[Any, pd.DataFrame]:
    """Run DPO on `model` in place; returns (trained model, per-step log with `step, loss, rewards/margins, …`).

    `hp` carries `steps, lr, batch_size, grad_accum, warmup_ratio, max_length, seed, weight_decay` and
    `dpo.beta`, `dpo.loss_type`.
    """
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class _Relay(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if callback is not None and logs and "loss" in logs:
                callback({"step": state.global_step, **logs})

    model.train()
    with tempfile.TemporaryDirectory(prefix="vlsafe-dpo-") as scratch:
        args = DPOConfig(
            output_dir=scratch, max_steps=hp.steps, learning_rate=hp.lr, per_device_train_batch_size=hp.batch_size,
            gradient_accumulation_steps=hp.grad_accum, warmup_steps=float(hp.warmup_ratio), lr_scheduler_type="linear",
            weight_decay=hp.weight_decay, max_length=hp.max_length, beta=hp.dpo.beta, loss_type=[hp.dpo.loss_type],
            seed=hp.seed, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, bf16=False, fp16=False,
            gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=not progress)
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=_dataset(examples),
                             processing_class=tokenizer, callbacks=[_Relay()])
        trainer.train()
        log = _log(trainer.state.log_history)
    return trainer.model.eval(), log
