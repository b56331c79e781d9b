"""A small supervised fine-tuning (SFT) core for text LLMs and LLaVA-style LVLMs (reused by `vlsafe tune`).

Examples are chat-formatted (prompt, answer) pairs, optionally with an image (through the model's processor).
The prompt goes through the model's own chat template (`vlsafe.probes.templates.format_chat`, the same formatting that
evaluation uses); the loss is computed on answer tokens only (plus the end-of-turn token when the answer is
complete). Full fine-tuning or LoRA (peft, merged back with `merge_and_unload` before saving); which parts train
(`language`, `projector`, `vision`) and which decoder layers (`trainable_layers` / `frozen_layers`, e.g. SPPFT)
is configurable. AdamW, linear warmup then linear decay, gradient accumulation, gradient clipping, a fixed seed,
a tqdm bar with the loss, a per-step log, and atomic saving (temp dir, then rename).

>>> from vlsafe.experiments.tuning import SFTConfig, sft
>>> sft("default", [{"prompt": "Hi", "answer": "Hello!"}], SFTConfig(steps=2, batch_size=1), "runs/sft")
PosixPath('runs/sft')
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlsafe.analysis.adapters import adapter
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.runinfo import atomic_path
from vlsafe.experiments.sft_loss import IGNORE, LossFn, answer_loss, pick_loss  # noqa: F401 (answer_loss: public here)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Part = Literal["language", "projector", "vision"]
Callback = Callable[[int, torch.nn.Module, dict[str, Any]], None]


class SFTConfig(BaseModel):
    """Hyper-parameters of one SFT run (validated; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["full", "lora"] = "full"
    steps: int = Field(60, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="fraction of steps with linear warmup")
    max_length: int = Field(128, ge=8, description="tokens per example (answers are cut to fit)")
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    train: list[Part] = Field(default_factory=lambda: ["language", "projector"],
                              description="parts that train (a text LLM has only 'language')")
    trainable_layers: list[int] | None = Field(None, description="only these decoder layers train (no embeddings)")
    frozen_layers: list[int] | None = Field(None, description="these decoder layers stay frozen, all else trains")
    lora_r: int = Field(16, ge=1)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    threads: int | None = Field(None, ge=1, description="torch.set_num_threads during training")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="bf16: autocast forward (fp32 weights, optimizer and loss; ~1.8x faster per step on "
                            "AVX512-BF16 CPUs); auto: bf16 where the CPU has it natively, else fp32")
    progress: bool = True

    @model_validator(mode="after")
    def _layers(self) -> "SFTConfig":
        if self.trainable_layers is not None and self.frozen_layers is not None:
            raise ValueError("give trainable_layers or frozen_layers, not both")
        if not self.train:
            raise ValueError("train: name at least one part (language, projector, vision)")
        return self


@dataclass(frozen=True)
class Example:
    """One training pair. `image`: PIL image, image spec (`blank`, a path) or None; `complete=False` marks an
    answer that was cut short (no end-of-turn token is appended, so the model is not taught to stop there)."""

    prompt: str
    answer: str
    image: Any = None
    complete: bool = True


def as_example(obj: Example | dict[str, Any], index: int = 0) -> Example:
    """An `Example` from itself or a dict with `prompt`, `answer` (and optional `image`, `complete`)."""
    if isinstance(obj, Example):
        ex = obj
    elif isinstance(obj, dict):
        missing = [k for k in ("prompt", "answer") if not isinstance(obj.get(k), str)]
        if missing:
            raise VlsafeError(f"example {index}: missing or non-string '{missing[0]}'")
        ex = Example(obj["prompt"], obj["answer"], obj.get("image"), bool(obj.get("complete", True)))
    else:
        raise VlsafeError(f"example {index}: expected a dict or Example, got {type(obj).__name__}")
    if not ex.prompt.strip() or not ex.answer.strip():
        raise VlsafeError(f"example {index}: empty prompt or answer")
    return ex


# ----------------------------------------------------------------------------------------------------- encoding

def _formatter(lm: Any) -> Any:
    return lm.processor if getattr(lm, "processor", None) is not None else lm.tokenizer


def encode_example(lm: Any, example: Example | dict[str, Any], max_length: int, index: int = 0) -> dict[str, Any]:
    """Token ids and labels of one example; labels are `IGNORE` (-100) on every prompt/template/image token.

    The prompt is formatted by the chat template and tokenized on its own, the answer (plus eos when complete)
    separately, then concatenated, so the mask boundary is exact. Answers are cut to fit `max_length`.
    """
    from vlsafe.probes.behavior.generate import load_image
    from vlsafe.probes.templates import format_chat

    ex = as_example(example, index)
    fmt, tok = _formatter(lm), lm.tokenizer
    text = format_chat(fmt, ex.prompt, image=ex.image is not None)
    pixel_values = None
    if ex.image is not None:
        if getattr(lm, "processor", None) is None:
            raise VlsafeError(f"example {index}: has an image but the model is text-only")
        enc = lm.processor(text=[text], images=[load_image(ex.image)], return_tensors="pt", add_special_tokens=False)
        prompt_ids, pixel_values = enc["input_ids"][0].tolist(), enc["pixel_values"][0]
    else:
        prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    answer_ids = tok(ex.answer, add_special_tokens=False)["input_ids"]
    if ex.complete:
        answer_ids = answer_ids + [tok.eos_token_id]
    room = max_length - len(prompt_ids)
    if room < 1:
        raise VlsafeError(f"example {index}: prompt is {len(prompt_ids)} tokens, max_length {max_length} leaves "
                          "no room for the answer (raise max_length)")
    answer_ids = answer_ids[:room]
    out: dict[str, Any] = {"input_ids": torch.tensor(prompt_ids + answer_ids),
                           "labels": torch.tensor([IGNORE] * len(prompt_ids) + answer_ids)}
    if pixel_values is not None:
        out["pixel_values"] = pixel_values
    return out


def collate(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into a batch (padding: attention 0, label -100)."""
    n = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.full((len(items), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, it in enumerate(items):
        k = len(it["input_ids"])
        ids[i, :k], labels[i, :k], mask[i, :k] = it["input_ids"], it["labels"], 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    pix = [it["pixel_values"] for it in items if "pixel_values" in it]
    if pix:  # LLaVA scatters image features into the rows' image tokens in order, so rows may mix
        batch["pixel_values"] = torch.stack(pix)
    return batch


# ----------------------------------------------------------------------------------------------------- parameters

def layer_index(model: torch.nn.Module) -> dict[str, int]:
    """In-memory parameter/module name prefix → decoder layer index (the shared vlsafe layer axis)."""
    layers = adapter(model).layers()
    ids = {id(block): i for i, block in enumerate(layers)}
    return {name: ids[id(mod)] for name, mod in model.named_modules() if id(mod) in ids}


def _layer_of(name: str, prefixes: dict[str, int]) -> int | None:
    for prefix, i in prefixes.items():
        if name.startswith(prefix + "."):
            return i
    return None


def _allowed_layers(cfg: SFTConfig, n_layers: int) -> set[int]:
    for sel in (cfg.trainable_layers, cfg.frozen_layers):
        bad = [i for i in sel or [] if not 0 <= i < n_layers]
        if bad:
            raise VlsafeError(f"layer {bad[0]} out of range: the model has {n_layers} decoder layers")
    if cfg.trainable_layers is not None:
        return set(cfg.trainable_layers)
    return set(range(n_layers)) - set(cfg.frozen_layers or [])


def select_trainable(model: torch.nn.Module, cfg: SFTConfig) -> list[str]:
    """Set `requires_grad` for full fine-tuning per `cfg` and return the trainable parameter names.

    Language parameters outside decoder layers (embeddings, final norm, head) train unless `trainable_layers`
    restricts training to some layers (with `frozen_layers`, everything else trains, as in SPPFT).
    """
    prefixes = layer_index(model)
    allowed = _allowed_layers(cfg, len(set(prefixes.values())))
    selective = cfg.trainable_layers is not None
    ad = adapter(model)
    names = []
    for name, p in model.named_parameters():
        part = ad.part_of(name)
        layer = _layer_of(name, prefixes) if part == "language" else None
        ok = part in cfg.train and (part != "language" or (layer in allowed if layer is not None else not selective))
        p.requires_grad_(ok)
        if ok:
            names.append(name)
    return names


def apply_lora(model: torch.nn.Module, cfg: SFTConfig) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters on the selected decoder layers' linear layers (language model only);
    projector/vision parameters named in `cfg.train` are trained in full alongside."""
    from peft import LoraConfig, get_peft_model

    prefixes = layer_index(model)
    allowed = _allowed_layers(cfg, len(set(prefixes.values())))
    ad = adapter(model)
    targets = [name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
               and name.rsplit(".", 1)[-1] in cfg.lora_targets and ad.part_of(name) == "language"
               and _layer_of(name, prefixes) in allowed]
    if not targets:
        raise VlsafeError(f"LoRA: no linear layer named {cfg.lora_targets} in the selected decoder layers")
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none")
    peft_model = get_peft_model(model, lcfg)
    for name, p in peft_model.named_parameters():
        if "lora_" not in name and ad.part_of(name) in cfg.train and ad.part_of(name) != "language":
            p.requires_grad_(True)
    return peft_model


def merged(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """The plain transformers model: LoRA adapters merged (`merge_and_unload`), on a copy unless `inplace`."""
    if hasattr(model, "merge_and_unload"):
        return (model if inplace else copy.deepcopy(model)).merge_and_unload()
    return model


# ----------------------------------------------------------------------------------------------------- training

def _batches(items: list[dict[str, Any]], cfg: SFTConfig) -> Iterator[list[dict[str, Any]]]:
    """Endless seeded stream of micro-batches: epoch after epoch of a fresh permutation (last one may be short)."""
    g = torch.Generator().manual_seed(cfg.seed)
    while True:
        order = torch.randperm(len(items), generator=g).tolist()
        for s in range(0, len(order), cfg.batch_size):
            yield [items[j] for j in order[s:s + cfg.batch_size]]


def _load(model: Any) -> Any:
    from vlsafe.probes.models import load

    return load(model) if isinstance(model, (str, os.PathLike)) else model


@dataclass
class TrainResult:
    """A trained in-memory model (LoRA still attached when `method='lora'`; see `merged`) and its log."""

    model: torch.nn.Module
    log: pd.DataFrame
    trainable: list[str]


def train(lm: Any, examples: Sequence[Example | dict[str, Any]], cfg: SFTConfig, *,
          callback: Callback | None = None, desc: str = "sft") -> TrainResult:
    """Fine-tune `lm` (a `LoadedModel`) in memory; `callback(step, model, row)` runs after every step."""
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    if not examples:
        raise VlsafeError("sft: no training examples")
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        items = [encode_example(lm, ex, cfg.max_length, i) for i, ex in enumerate(examples)]
        model = lm.model
        if cfg.method == "lora":
            for p in model.parameters():
                p.requires_grad_(False)
            model = apply_lora(model, cfg)
        else:
            select_trainable(model, cfg)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise VlsafeError(f"sft: nothing to train (train={cfg.train}, layers selection leaves no parameter)")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=_fusable(params))
        sched = get_linear_schedule_with_warmup(opt, round(cfg.warmup_ratio * cfg.steps), cfg.steps)
        stream = _batches(items, cfg)
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
        rows = []
        model.train()
        loss_fn = pick_loss(model, collate(items[:cfg.batch_size], pad))
        bar = tqdm(range(1, cfg.steps + 1), desc=desc, disable=not cfg.progress, leave=False)
        for step in bar:
            row = _step(model, [collate(next(stream), pad) for _ in range(cfg.grad_accum)], opt, sched, params, cfg,
                        loss_fn)
            row["step"] = step
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if callback is not None:
                callback(step, model, row)
        model.eval()
        log = pd.DataFrame(rows)[["step", "loss", "lr", "tokens", "grad_norm", "seconds"]]
        return TrainResult(model, log, trainable)
    finally:
        torch.set_num_threads(old_threads)


def _fusable(params: list[torch.Tensor]) -> bool:
    """AdamW's fused kernel (one pass over parameter, gradient and both moments) where torch has it: same math,
    float rounding aside, and a much faster optimizer step (`docs/performance.md`)."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
               for p in params)


def _step(model: torch.nn.Module, micro: list[dict[str, torch.Tensor]], opt: Any, sched: Any,
          params: list[torch.Tensor], cfg: SFTConfig, loss_fn: LossFn) -> dict[str, Any]:
    t0 = time.perf_counter()
    total = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
    loss_sum = 0.0
    for b in micro:
        labels = b.pop("labels")
        loss = loss_fn(model, b, labels, cfg.precision)
        (loss / max(total, 1)).backward()
        loss_sum += float(loss.detach())
    gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": loss_sum / max(total, 1), "lr": lr, "tokens": total, "grad_norm": float(gn),
            "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------------- saving

def write_checkpoint(model: torch.nn.Module, formatter: Any, out_dir: str | os.PathLike, *,
                     log: pd.DataFrame | None = None, files: dict[str, Any] | None = None,
                     merge_inplace: bool = False) -> Path:
    """Save an HF checkpoint atomically (temp dir, then rename): weights (LoRA merged), tokenizer/processor,
    `train_log.csv` when `log` is given, and each `files` entry (name → JSON-able object) as JSON."""
    plain = merged(model, inplace=merge_inplace)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        plain.save_pretrained(tmp)
        formatter.save_pretrained(tmp)
        if log is not None:
            log.to_csv(tmp / "train_log.csv", index=False)
        for name, obj in (files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(out_dir)


def sft(model: str | os.PathLike | Any, examples: Sequence[Example | dict[str, Any]], cfg: SFTConfig,
        out_dir: str | os.PathLike, *, callback: Callback | None = None) -> Path:
    """Fine-tune `model` (checkpoint spec or `LoadedModel`) on `examples` and save to `out_dir` atomically.

    `out_dir` receives the HF checkpoint, `train_log.csv` (step, loss, lr, tokens, grad_norm, seconds) and
    `sft.json` (the config and data counts). Returns `out_dir`.
    """
    lm = _load(model)
    result = train(lm, examples, cfg, callback=callback)
    info = {"config": cfg.model_dump(), "examples": len(examples),
            "with_image": sum(as_example(e, i).image is not None for i, e in enumerate(examples)),
            "trainable_parameters": len(result.trainable)}
    return write_checkpoint(result.model, _formatter(lm), out_dir, log=result.log, files={"sft.json": info},
                            merge_inplace=True)
