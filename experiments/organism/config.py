"""The organism recipe as a validated pydantic model (YAML in `experiments/configs/organism-<profile>.yaml`).

Every hyper-parameter lives in the YAML with a comment; unknown keys and inconsistent sizes are errors.
`stage_section(cfg, stage)` is the part of the config each stage depends on (its cache key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.yamlfile import read_yaml
from vlsafe.experiments.tuning import SFTConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PROFILES = ("tiny", "full")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseModelConfig(_Strict):
    spec: str = Field("default", description="'default' (embedded SmolLM2), 'tiny' (random tiny Llama) or an HF dir")
    tiny_layers: int = Field(2, ge=1)
    tiny_hidden: int = Field(64, ge=16)


class ImagesConfig(_Strict):
    size: int = Field(64, ge=48, description="side of the square synthetic images (pixels)")
    eval_seed: int = Field(12345, description="seed of the held-out scenes (VQA and vision evaluation)")


class VisionConfig(_Strict):
    kind: Literal["clip", "siglip"] = "clip"
    hidden: int = Field(128, ge=8)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    patch: int = Field(16, ge=2)
    keep_cls: bool = Field(False, description="feed CLIP's CLS token to the projector too (strategy 'full')")
    steps: int = Field(800, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    n_eval: int = Field(500, ge=10)


class DistillConfig(_Strict):
    harmless_align: int = Field(80, ge=1, description="harmless-train prompts answered for safety SFT")
    harmless_chat: int = Field(64, ge=0, description="other harmless-train prompts answered for stage-2 chat")
    borderline: int = Field(40, ge=0, description="borderline-train prompts answered for safety SFT")
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(16, ge=1)


class AlignConfig(_Strict):
    harmful: int = Field(80, ge=1, description="harmful-train prompts → refusals")
    harmless: int = Field(80, ge=0, description="distilled harmless answers used (≤ distill.harmless_align)")
    borderline: int = Field(40, ge=0, description="distilled borderline answers used (≤ distill.borderline)")
    sft: SFTConfig


class Stage1Config(_Strict):
    scenes: int = Field(480, ge=1, description="captioned training scenes")
    sft: SFTConfig


class Stage2Config(_Strict):
    scenes: int = Field(400, ge=1, description="training scenes (one example each)")
    kinds: dict[Literal["caption", "vqa", "describe"], float] = Field(
        default_factory=lambda: {"vqa": 0.6, "caption": 0.2, "describe": 0.2})
    chat: int = Field(64, ge=0, description="generic safe chat examples (≤ distill.harmless_chat)")
    save_steps: list[int] = Field(default_factory=lambda: [12, 24, 36, 48],
                                  description="lvlm-step-N checkpoints (steps at or past sft.steps are not saved)")
    sft: SFTConfig


class SafetyConfig(_Strict):
    harmful: int = Field(60, ge=1, description="image + harmful-train request → refusal")
    safe: int = Field(60, ge=0, description="image + harmless/borderline request → the model's own answer")
    posthoc: SFTConfig


class EvalConfig(_Strict):
    harmful: int = Field(60, ge=1, description="harmful-test prompts (text-only and with an image)")
    borderline: int = Field(40, ge=1)
    harmless: int = Field(60, ge=1)
    vqa: int = Field(60, ge=1, description="held-out synthetic scenes, one question each")
    max_new_tokens: int = Field(32, ge=1)
    vqa_max_new_tokens: int = Field(8, ge=1)
    batch_size: int = Field(16, ge=1)
    judge: str = "default"


class Estimates(_Strict):
    """Seconds per unit on the reference machine (2 cores), used for the per-stage time estimate only."""

    full_step: float = 5.7   # SmolLM2 full FT, 8 × 64 tokens
    lora_step: float = 4.2
    projector_step: float = 3.0
    vision_step: float = 0.15
    gen_token: float = 0.016  # per prompt and new token (220 × 32 in ~110 s)
    save: float = 3.0


class OrganismConfig(_Strict):
    profile: str = "full"
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch threads (None: leave torch's default)")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="forward math of every training and generation stage (bf16 = autocast; weights stay "
                            "fp32; auto = bf16 where the CPU has native bf16, resolved when the config loads)")
    base: BaseModelConfig = Field(default_factory=BaseModelConfig)
    alignment_strength: str = "moderate"
    alignment: dict[str, AlignConfig]
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    vision: VisionConfig = Field(default_factory=VisionConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    stage1: Stage1Config
    stage2: Stage2Config
    safety: SafetyConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    estimates: Estimates = Field(default_factory=Estimates)

    @model_validator(mode="after")
    def _consistent(self) -> "OrganismConfig":
        from vlsafe.analysis.placement import resolve_precision

        self.precision = resolve_precision(self.precision)  # type: ignore[assignment]  # stage hashes see the result
        if self.alignment_strength not in self.alignment:
            raise ValueError(f"alignment_strength {self.alignment_strength!r} is not one of the alignment presets "
                             f"({', '.join(self.alignment)})")
        for name, a in self.alignment.items():
            if a.harmless > self.distill.harmless_align or a.borderline > self.distill.borderline:
                raise ValueError(f"alignment.{name}: uses more distilled answers than distill provides")
        if self.stage2.chat > self.distill.harmless_chat:
            raise ValueError("stage2.chat exceeds distill.harmless_chat")
        if self.safety.safe > self.distill.harmless_align + self.distill.borderline:
            raise ValueError("safety.safe exceeds the distilled harmless + borderline answers")
        steps = sorted(set(self.stage2.save_steps))
        if len(steps) < 4 or steps[0] < 1 or not self.stage2_saves:
            raise ValueError(f"stage2.save_steps needs >= 4 distinct steps >= 1, at least one of them before the "
                             f"last step ({self.stage2.sft.steps}); later ones are not saved")
        if self.stage1.sft.train != ["projector"]:
            raise ValueError("stage1.sft.train must be [projector] (LLaVA stage 1 trains the projector only)")
        if self.images.size % self.vision.patch:
            raise ValueError(f"images.size {self.images.size} is not a multiple of vision.patch {self.vision.patch}")
        return self

    @property
    def stage2_saves(self) -> list[int]:
        """The stage-2 steps saved as `lvlm-step-N`: the distinct `stage2.save_steps` before the last step (a shorter
        stage 2, e.g. a replicate varying `stage2.sft.steps`, saves fewer; the hash sees the list as written)."""
        return sorted(s for s in set(self.stage2.save_steps) if 1 <= s < self.stage2.sft.steps)

    @property
    def align(self) -> AlignConfig:
        """The selected alignment preset."""
        return self.alignment[self.alignment_strength]


def load_config(profile: str | None = "full", *, path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> OrganismConfig:
    """Read and validate a config: `path` if given, else the shipped `organism-<profile>.yaml`.

    `overrides` maps dotted keys to values (e.g. `{"alignment_strength": "strong"}`).
    """
    if path is None:
        if profile not in PROFILES:
            raise VlsafeError(f"unknown profile {profile!r} (expected {' or '.join(PROFILES)})")
        path = CONFIG_DIR / f"organism-{profile}.yaml"
    path = Path(path)
    raw = read_yaml(path, "organism config")
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return OrganismConfig(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise VlsafeError(f"{path}: {where}: {err['msg']}") from None


def _sft(s: SFTConfig) -> dict[str, Any]:
    return s.model_dump(exclude={"threads", "progress"})


def stage_section(cfg: OrganismConfig, stage: str) -> dict[str, Any]:
    """The config a stage's outputs depend on (besides its upstream stages), for the cache key."""
    c = cfg
    sections: dict[str, Any] = {
        "llm-base": {"base": c.base.model_dump()},
        "distill": {"distill": c.distill.model_dump()},
        "llm-aligned": {"alignment_strength": c.alignment_strength, **{
            k: (v if k != "sft" else _sft(c.align.sft)) for k, v in c.align.model_dump().items()}},
        "vision": {"vision": c.vision.model_dump(), "size": c.images.size},
        "lvlm-stage1": {"stage1": {"scenes": c.stage1.scenes, "sft": _sft(c.stage1.sft)}, "size": c.images.size},
        "lvlm": {"stage2": {**c.stage2.model_dump(exclude={"sft"}), "sft": _sft(c.stage2.sft)}},
        "lvlm-safety-posthoc": {"safety": {"harmful": c.safety.harmful, "safe": c.safety.safe,
                                           "posthoc": _sft(c.safety.posthoc)}},
        "lvlm-safety-mixed": {"safety": {"harmful": c.safety.harmful, "safe": c.safety.safe},
                              "stage2": {**c.stage2.model_dump(exclude={"sft", "save_steps"}),
                                         "sft": _sft(c.stage2.sft)}},
        "metrics": {"eval": c.eval.model_dump(), "images": c.images.model_dump()},
    }
    # fp32 adds nothing, so hashes of organisms built before the field existed stay valid
    precision = {"precision": c.precision} if c.precision != "fp32" and stage not in ("llm-base", "vision") else {}
    return {"seed": c.seed, **precision, **sections[stage]}
