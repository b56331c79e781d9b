"""The organism's stages (a miniature LLaVA-1.5 recipe on top of a safety-aligned SmolLM2):

`llm-base` → `distill` (the base model's own answers) → `llm-aligned` (safety SFT) ; `vision` (tower pretraining)
→ `lvlm-stage1` (LLaVA assembled, projector trained on captions) → `lvlm` (projector + full LM on safe visual
instructions and chat; `lvlm-step-N` saved on the way) → `lvlm-safety-posthoc` (VLGuard-like SFT of `lvlm`) and
`lvlm-safety-mixed` (the same safety data mixed into stage 2).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlsafe.analysis.checkpoints import LoadedModel
from vlsafe.experiments.organism import data as D
from vlsafe.experiments.organism.build import Ctx, StageSpec
from vlsafe.experiments.organism.config import OrganismConfig
from vlsafe.experiments.organism.images import render, sample_scenes
from vlsafe.experiments.tuning import SFTConfig, train, write_checkpoint

CHECKPOINTS = ("llm-base", "llm-aligned", "lvlm-stage1", "lvlm", "lvlm-safety-posthoc", "lvlm-safety-mixed")


def seed_for(cfg: OrganismConfig, offset: int) -> int:
    """Every random choice derives from the organism seed plus a fixed per-use offset."""
    return cfg.seed * 1000 + offset


def _sft(ctx: Ctx, sft: SFTConfig, offset: int) -> SFTConfig:
    return sft.model_copy(update={"seed": seed_for(ctx.cfg, offset), "threads": ctx.cfg.threads,
                                  "precision": ctx.cfg.precision, "progress": ctx.progress})


def _load(path: Path) -> LoadedModel:
    from vlsafe.probes.models import load

    return load(path)


def _fmt(lm: LoadedModel) -> Any:
    return lm.processor if lm.processor is not None else lm.tokenizer


def _save(lm: LoadedModel, res: Any, out: Path, data: dict[str, Any]) -> dict[str, Any]:
    write_checkpoint(res.model, _fmt(lm), out, log=res.log, files={"data.json": data}, merge_inplace=True)
    return {**data, "final_loss": float(res.log.loss.iloc[-1]), "s_per_step": float(res.log.seconds.mean())}


def _distilled(ctx: Ctx, use: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (ctx.path("distill") / "answers.jsonl").read_text().splitlines()]
    return [r for r in rows if r["use"] == use and not r["refused"] and r["answer"].strip()]


# ----------------------------------------------------------------------------------------------------- stages

def run_llm_base(ctx: Ctx, out: Path) -> dict[str, Any]:
    """The base LLM as shipped (`default`: embedded SmolLM2, hard-linked/copied) or a tiny random Llama."""
    b = ctx.cfg.base
    if b.spec == "tiny":
        from vlsafe.analysis.tiny import tiny_llama

        tiny_llama(out, layers=b.tiny_layers, hidden=b.tiny_hidden, seed=seed_for(ctx.cfg, 1))
        return {"source": "tiny"}
    from vlsafe.analysis.resolve import resolve

    src = resolve(b.spec)
    if not src.is_dir():
        raise ValueError(f"base.spec {b.spec!r} does not resolve to an HF directory")
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, out / f.name)
            except OSError:
                shutil.copy2(f, out / f.name)
    return {"source": str(src)}


def run_distill(ctx: Ctx, out: Path) -> dict[str, Any]:
    """The base model's own greedy answers to harmless/borderline train prompts, judged for refusals."""
    from vlsafe.probes.behavior.datasets import load_prompts
    from vlsafe.probes.behavior.generate import generate
    from vlsafe.probes.behavior.judges import get_judge

    d, seed = ctx.cfg.distill, seed_for(ctx.cfg, 2)
    harmless = load_prompts("harmless-train").sample(d.harmless_align + d.harmless_chat, seed=seed).records
    random.Random(seed).shuffle(harmless)
    border = load_prompts("borderline-train").sample(d.borderline, seed=seed).records if d.borderline else []
    uses = ["align"] * d.harmless_align + ["chat"] * (len(harmless) - d.harmless_align) + ["borderline"] * len(border)
    recs = list(harmless) + list(border)
    lm = _load(ctx.path("llm-base"))
    prompts = [r.prompt for r in recs]
    answers = generate(lm, prompts, max_new_tokens=d.max_new_tokens, batch_size=d.batch_size, cache=False,
                       progress=ctx.progress, precision=ctx.cfg.precision)
    verdicts = get_judge(ctx.cfg.eval.judge).judge(answers, prompts)
    lengths = [len(ids) for ids in lm.tokenizer(answers, add_special_tokens=False)["input_ids"]]
    rows = [{"use": u, "id": r.id, "prompt": r.prompt, "answer": a, "complete": n < d.max_new_tokens - 1,
             "refused": v.refused, "judge_score": v.score} for u, r, a, n, v in zip(uses, recs, answers, lengths,
                                                                                      verdicts)]
    out.mkdir(parents=True)
    (out / "answers.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {u: {"n": uses.count(u), "refused": sum(r["refused"] for r in rows if r["use"] == u)}
            for u in dict.fromkeys(uses)}


def run_align(ctx: Ctx, out: Path) -> dict[str, Any]:
    """Safety SFT: harmful-train → refusals, harmless/borderline → the base model's own answers."""
    from vlsafe.probes.behavior.datasets import load_prompts

    a, seed = ctx.cfg.align, seed_for(ctx.cfg, 3)
    harmful = load_prompts("harmful-train").sample(a.harmful, seed=seed).prompts
    harmless, border = _distilled(ctx, "align")[:a.harmless], _distilled(ctx, "borderline")[:a.borderline]
    examples = D.refusal_examples(harmful, seed) + D.answer_examples(harmless) + D.answer_examples(border)
    lm = _load(ctx.path("llm-base"))
    res = train(lm, examples, _sft(ctx, a.sft, 3), desc="llm-aligned")
    return _save(lm, res, out, {"refusals": len(harmful), "harmless": len(harmless), "borderline": len(border),
                                "strength": ctx.cfg.alignment_strength})


def run_vision(ctx: Ctx, out: Path) -> dict[str, Any]:
    """Pretrain the vision tower on attribute classification (then it stays frozen)."""
    from vlsafe.experiments.organism.vision import pretrain, save_tower

    tower, processor, log, acc = pretrain(ctx.cfg.vision, ctx.cfg.images.size, seed_for(ctx.cfg, 4),
                                          ctx.cfg.images.eval_seed, progress=ctx.progress)
    out.mkdir(parents=True)
    save_tower(tower, processor, out)
    log.to_csv(out / "pretrain_log.csv", index=False)
    (out / "vision.json").write_text(json.dumps({"heldout_accuracy": acc}, indent=2) + "\n")
    return {"heldout_accuracy": acc}


def run_stage1(ctx: Ctx, out: Path) -> dict[str, Any]:
    """LLaVA stage 1: assemble (LM = llm-aligned, frozen tower, new projector); train the projector on captions."""
    from vlsafe.experiments.organism.lvlm import assemble

    cfg = ctx.cfg
    model, processor = assemble(ctx.path("llm-aligned"), ctx.path("vision"), kind=cfg.vision.kind,
                                keep_cls=cfg.vision.keep_cls, seed=seed_for(cfg, 5))
    lm = LoadedModel(model, processor.tokenizer, processor, None)
    scenes = sample_scenes(cfg.stage1.scenes, seed=seed_for(cfg, 5), size=cfg.images.size)
    examples = D.scene_examples(scenes, {"caption": 1.0}, seed_for(cfg, 5))
    res = train(lm, examples, _sft(ctx, cfg.stage1.sft, 5), desc="lvlm-stage1")
    return _save(lm, res, out, {"captions": len(examples)})


def stage2_examples(ctx: Ctx) -> list[Any]:
    """Safe visual instructions (VQA, captions, descriptions) plus generic safe chat — checked benign."""
    from vlsafe.probes.behavior.datasets import load_prompts
    from vlsafe.probes.behavior.judges import get_judge

    cfg = ctx.cfg
    scenes = sample_scenes(cfg.stage2.scenes, seed=seed_for(cfg, 6), size=cfg.images.size)
    examples = D.scene_examples(scenes, dict(cfg.stage2.kinds), seed_for(cfg, 6))
    examples += D.answer_examples(_distilled(ctx, "chat")[:cfg.stage2.chat])
    D.assert_benign(examples, set(load_prompts("harmful").prompts), get_judge(cfg.eval.judge))
    random.Random(seed_for(cfg, 6)).shuffle(examples)
    return examples


def safety_examples(ctx: Ctx) -> list[Any]:
    """VLGuard-like: image + harmful request → refusal; image + safe request → the base model's own answer."""
    from vlsafe.probes.behavior.datasets import load_prompts

    cfg, seed = ctx.cfg, seed_for(ctx.cfg, 7)
    s = cfg.safety
    harmful = load_prompts("harmful-train").sample(s.harmful, seed=seed).prompts
    safe = (_distilled(ctx, "align") + _distilled(ctx, "borderline"))
    safe = random.Random(seed).sample(safe, min(s.safe, len(safe)))
    imgs = [render(x) for x in sample_scenes(len(harmful) + len(safe), seed=seed, size=cfg.images.size)]
    return D.refusal_examples(harmful, seed, imgs[:len(harmful)]) + D.answer_examples(safe, imgs[len(harmful):])


def run_stage2(ctx: Ctx, out: Path) -> dict[str, Any]:
    """LLaVA stage 2: projector + full LM on safe visual instructions; saves `lvlm-step-N` on the way."""
    cfg = ctx.cfg
    lm = _load(ctx.path("lvlm-stage1"))
    examples = stage2_examples(ctx)
    saves = set(cfg.stage2_saves)

    def callback(step: int, model: Any, row: dict[str, Any]) -> None:
        if step in saves:
            ctx.save_extra(f"lvlm-step-{step}", "lvlm",
                           lambda p: write_checkpoint(model, lm.processor, p), {"step": step, "loss": row["loss"]})

    res = train(lm, examples, _sft(ctx, cfg.stage2.sft, 6), callback=callback, desc="lvlm stage 2")
    return _save(lm, res, out, {"examples": len(examples), "chat": cfg.stage2.chat, "saved": sorted(saves)})


def run_posthoc(ctx: Ctx, out: Path) -> dict[str, Any]:
    """Post-hoc safety SFT of `lvlm` on the VLGuard-like mix."""
    lm = _load(ctx.path("lvlm"))
    examples = safety_examples(ctx)
    random.Random(seed_for(ctx.cfg, 8)).shuffle(examples)
    res = train(lm, examples, _sft(ctx, ctx.cfg.safety.posthoc, 8), desc="lvlm-safety-posthoc")
    return _save(lm, res, out, {"examples": len(examples)})


def run_mixed(ctx: Ctx, out: Path) -> dict[str, Any]:
    """Stage 2 again from `lvlm-stage1`, with the VLGuard-like safety mix added to the adaptation data."""
    lm = _load(ctx.path("lvlm-stage1"))
    examples = stage2_examples(ctx) + safety_examples(ctx)
    random.Random(seed_for(ctx.cfg, 9)).shuffle(examples)
    res = train(lm, examples, _sft(ctx, ctx.cfg.stage2.sft, 6), desc="lvlm-safety-mixed")
    return _save(lm, res, out, {"examples": len(examples)})


# ----------------------------------------------------------------------------------------------------- estimates

def _train_s(cfg: OrganismConfig, sft: SFTConfig, per_step: float) -> float:
    scale = sft.batch_size * sft.grad_accum * sft.max_length / 512
    return sft.steps * per_step * scale * (0.02 if cfg.base.spec == "tiny" else 1.0) + cfg.estimates.save


def _gen_s(cfg: OrganismConfig, n: int, tokens: int) -> float:
    return n * tokens * cfg.estimates.gen_token * (0.02 if cfg.base.spec == "tiny" else 1.0)


def _step_s(cfg: OrganismConfig, sft: SFTConfig) -> float:
    e = cfg.estimates
    if sft.method == "lora":
        return e.lora_step
    return e.projector_step if "language" not in sft.train else e.full_step


def _est_sft(section: Callable[[OrganismConfig], SFTConfig]) -> Callable[[OrganismConfig], float]:
    return lambda c: _train_s(c, section(c), _step_s(c, section(c)))


def _est_distill(c: OrganismConfig) -> float:
    d = c.distill
    return _gen_s(c, d.harmless_align + d.harmless_chat + d.borderline, d.max_new_tokens)


def _est_vision(c: OrganismConfig) -> float:
    v = c.vision
    return v.steps * c.estimates.vision_step * (v.hidden / 128) ** 2 * (c.images.size / v.patch) ** 2 / 16


def specs() -> list[StageSpec]:
    """The organism's stages in build order."""
    stage2 = _est_sft(lambda c: c.stage2.sft)
    return [
        StageSpec("llm-base", (), run_llm_base, lambda c: 5.0),
        StageSpec("distill", ("llm-base",), run_distill, _est_distill),
        StageSpec("llm-aligned", ("llm-base", "distill"), run_align, _est_sft(lambda c: c.align.sft)),
        StageSpec("vision", (), run_vision, _est_vision),
        StageSpec("lvlm-stage1", ("llm-aligned", "vision"), run_stage1, _est_sft(lambda c: c.stage1.sft)),
        StageSpec("lvlm", ("lvlm-stage1", "distill"), run_stage2,
                  lambda c: stage2(c) + len(c.stage2_saves) * c.estimates.save,
                  extra=lambda c: [f"lvlm-step-{s}" for s in c.stage2_saves]),
        StageSpec("lvlm-safety-posthoc", ("lvlm", "distill"), run_posthoc, _est_sft(lambda c: c.safety.posthoc)),
        StageSpec("lvlm-safety-mixed", ("lvlm-stage1", "distill"), run_mixed, stage2),
    ]
