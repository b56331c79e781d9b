"""`vlsafe tune CONFIG.yaml -o DIR`: safety SFT (full or LoRA), layer-targeted training, SPPFT and DPO on an LLM
or an LVLM, post-hoc or mixed with other data → an HF checkpoint + `train_log.csv` + `run.json`.

```yaml
vars: {organism: runs/organism}    # ${name} anywhere below; `--var organism=...` overrides
model: ${organism}/lvlm            # any checkpoint spec (HF dir, file, hub id, default)
method: sft                        # sft (full FT) | lora (peft, merged back) | dpo (trl DPOTrainer)
data:                              # see vlsafe.experiments.tune_data: harmful-* → refusals, others → own answers
  - {set: harmful-train, limit: 80}
  - {set: harmless-train, limit: 80}
  - {file: pairs.jsonl}            # prompt/answer (sft, lora) or prompt/chosen/rejected (dpo); optional image
mix_with: [{file: adaptation.jsonl}]   # other data trained on at the same time ("mixed" vs "post-hoc")
layers: {sppft: [8, 12]}           # or {trainable: [...]} or {frozen: [...]}
steps: 40
lr: 5.0e-5
lora: {r: 16, alpha: 32}
dpo: {beta: 0.1}
```

Layer selections act on the language model's blocks (the shared layer axis):
- `trainable: [i, …]` — only these blocks train (embeddings, final norm, head, vision and projector frozen);
- `frozen: [i, …]` — these blocks are frozen, everything else trains as usual;
- `sppft: [start, end]` — SPPFT (Li et al.): the `self_attn` and `mlp` of blocks start ≤ ℓ < end are frozen,
  everything else trains. **Half-open [start, end)**: the authors' code tests `begin < ℓ < end`, which also
  skips `begin` (an off-by-one); write `[begin, end]` here to freeze what their paper describes, or
  `[begin + 1, end]` to reproduce their code exactly.
With LoRA the same selection decides which blocks receive adapters. The vision tower of an LVLM is frozen
unless `train_vision: true`. After training, every frozen tensor is checked bit-identical to the input.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.yamlfile import read_yaml
from vlsafe.experiments.tune_data import REFUSALS, DataSource

METHODS = ("sft", "lora", "dpo")


class LayerSelection(BaseModel):
    """Exactly one of `trainable`, `frozen`, `sppft` (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    trainable: list[int] | None = None
    frozen: list[int] | None = None
    sppft: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one(self) -> "LayerSelection":
        given = [k for k in ("trainable", "frozen", "sppft") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of trainable: [...], frozen: [...], sppft: [start, end]")
        if self.sppft is not None and not 0 <= self.sppft[0] < self.sppft[1]:
            raise ValueError(f"sppft {list(self.sppft)} must be [start, end] with 0 <= start < end (end exclusive)")
        return self

    def layers_named(self) -> list[int]:
        if self.sppft is not None:
            return list(range(*self.sppft))
        return list(self.trainable if self.trainable is not None else self.frozen)

    def frozen_layer_modules(self, num_layers: int) -> dict[int, tuple[str, ...]]:
        """layer → block roles frozen in that block (`attn`, `mlp`; `()` = the whole block)."""
        if self.trainable is not None:
            return {i: () for i in range(num_layers) if i not in self.trainable}
        if self.frozen is not None:
            return {i: () for i in self.frozen}
        return {i: ("attn", "mlp") for i in range(*self.sppft)}


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


class DPOSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = 0.1
    loss_type: str = "sigmoid"
    lora: bool = False


class TuneConfig(BaseModel):
    """A validated `vlsafe tune` config (hyper-parameters flat at the top level)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    method: Literal["sft", "lora", "dpo"]
    data: list[DataSource]
    mix_with: list[DataSource] = []
    layers: LayerSelection | None = None
    lora: LoraSettings = LoraSettings()
    dpo: DPOSettings = DPOSettings()
    steps: int = 40
    lr: float = 5e-5
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 96
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    answer_tokens: int = 64
    refusals: list[str] | None = None
    train_vision: bool = False
    base_dir: str | None = None  # where relative paths resolve (set by the loader)

    @model_validator(mode="after")
    def _sane(self) -> "TuneConfig":
        for k in ("steps", "batch_size", "grad_accum", "max_length", "answer_tokens"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{k} must be positive, got {getattr(self, k)}")
        if not self.lr > 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"lr must be > 0 and warmup_ratio in [0, 1) (got {self.lr}, {self.warmup_ratio})")
        if not self.data:
            raise ValueError("data is empty")
        return self

    # ---- parsing --------------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, d: Any, source: str = "config", base_dir: str | os.PathLike | None = None) -> "TuneConfig":
        """Validate a mapping; unknown keys/methods name the valid ones; a missing model is an error here."""
        if not isinstance(d, dict):
            raise VlsafeError(f"{source}: a tune config must be a YAML mapping")
        _check_keys(d, cls, source)
        if d.get("method") is not None and d["method"] not in METHODS:
            close = difflib.get_close_matches(str(d["method"]), METHODS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise VlsafeError(f"{source}: unknown method '{d['method']}'{hint}; valid: {', '.join(METHODS)}")
        for sub, model in (("lora", LoraSettings), ("dpo", DPOSettings), ("layers", LayerSelection)):
            if isinstance(d.get(sub), dict):
                _check_keys(d[sub], model, source, prefix=f"{sub}.")
        try:
            cfg = cls.model_validate({**d, "base_dir": str(base_dir) if base_dir is not None else d.get("base_dir")})
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise VlsafeError(f"{source}: {loc}: {err['msg'].removeprefix('Value error, ')}") from None
        cfg.model = _resolve_model(cfg.model, Path(cfg.base_dir or "."), source)
        return cfg

    @property
    def root(self) -> Path:
        return Path(self.base_dir or ".")

    def checkpoint(self) -> Any:
        from vlsafe.analysis.checkpoints import open_checkpoint

        return open_checkpoint(self.model)

    def check_layers(self, num_layers: int | None = None) -> None:
        """Every named layer must exist in the model."""
        if self.layers is None:
            return
        n = num_layers if num_layers is not None else self.checkpoint().num_layers
        if self.layers.sppft is not None and self.layers.sppft[1] > n:
            raise VlsafeError(f"layers.sppft {list(self.layers.sppft)}: end {self.layers.sppft[1]} beyond the model's "
                              f"{n} layers (end is exclusive, at most {n})")
        bad = [i for i in self.layers.layers_named() if not 0 <= i < n]
        if bad:
            raise VlsafeError(f"layers: layer {bad[0]} out of range (the model has {n} layers, 0..{n - 1})")

    def refusal_texts(self) -> tuple[str, ...]:
        return tuple(self.refusals) if self.refusals else REFUSALS


def _check_keys(d: dict[str, Any], model: type[BaseModel], source: str, prefix: str = "") -> None:
    valid = [k for k in model.model_fields if k != "base_dir"]
    for key in d:
        if key not in model.model_fields:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise VlsafeError(f"{source}: unknown key '{prefix}{key}'{hint}; valid: {', '.join(valid)}")


def _resolve_model(spec: str, base_dir: Path, source: str) -> str:
    from vlsafe.analysis.checkpoints import open_checkpoint

    cand = base_dir / spec
    if not Path(spec).expanduser().exists() and cand.exists():
        spec = str(cand.resolve())
    try:
        open_checkpoint(spec)
    except VlsafeError as e:
        raise VlsafeError(f"{source}: model: {e}") from None
    return spec


def load_tune_config(path: str | Path, overrides: dict[str, str] | None = None) -> TuneConfig:
    """Read a tune YAML (`vars:` substituted, `overrides` win); relative paths (model, data files) resolve
    against the cwd, then the YAML's folder."""
    from vlsafe.experiments.yamlvars import with_vars

    p = Path(path)
    d = read_yaml(p, "tune config")
    return TuneConfig.parse(with_vars(d, overrides, str(p)), str(p), base_dir=p.parent)


# ---- freezing ------------------------------------------------------------------------------------------------------
def frozen_names(names: list[str], cfg: TuneConfig, num_layers: int, *, family: Any = None) -> set[str]:
    """Canonical tensor names the run must leave untouched (layer selection, vision tower). Block roles
    (`attn`, `mlp`) become paths through `family`'s module paths (a `vlsafe.analysis.names.Family`; Llama's
    when None): canonical names inside a block are the block-relative paths in memory."""
    from vlsafe.analysis.names import families, layer_module, namespace

    modules = (family.modules() if family is not None else None) or families()["llama"].modules()
    blocks = [modules.block] + ([modules.cross_attention.block] if modules.cross_attention else [])

    by_layer = cfg.layers.frozen_layer_modules(num_layers) if cfg.layers is not None else {}
    only_blocks = cfg.layers is not None and cfg.layers.trainable is not None
    out = set()
    for n in names:
        layer, module = layer_module(n)
        ns = namespace(n)
        if ns == "vision" and not cfg.train_vision:
            out.add(n)
        elif layer is None and only_blocks:
            out.add(n)
        elif layer in by_layer:
            prefixes = [getattr(b, role) for role in by_layer[layer] for b in blocks]
            inner = n.split(f"layers.{layer}.", 1)[1]
            if not prefixes or inner.startswith(tuple(p + "." for p in prefixes)):
                out.add(n)
    return out


def verify_frozen(src: Any, dst: Any, frozen: set[str]) -> None:
    """Every frozen tensor of the output must be bit-identical to the input (streamed, by canonical name)."""
    import torch

    from vlsafe.analysis.merging.io import MergeReader

    reader = MergeReader(dst)
    try:
        for name, before in src.iter_tensors([n for n in src.infos if n in frozen]):
            after = reader.get(name) if reader.has(name) else None
            if after is None or not torch.equal(before, after.to(before.dtype)):
                raise VlsafeError(f"tune: frozen tensor '{name}' changed during training (layer selection not "
                                  "honoured by the trainer)")
    finally:
        reader.close()


Callback = Callable[[dict[str, Any]], None]


# ---- running -------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def pinned(model: Any, layers: range, roles: tuple[str, ...] = ("attn", "mlp")) -> Iterator[int]:
    """Turn the parameters of the block parts `roles` (`attn`, `mlp`, as the family adapter names them) in
    decoder `layers` into buffers for the duration, so no trainer can train them (module-level freezing, which
    `vlsafe.experiments.tuning.SFTConfig` lacks); restored as parameters."""
    import torch

    from vlsafe.analysis.adapters import adapter

    ad = adapter(model)
    ids = {id(getattr(ad.block(i), role)) for i in layers for role in roles}
    wanted = tuple(n + "." for n, m in model.named_modules() if id(m) in ids)
    moved = []
    for name, mod in model.named_modules():
        if wanted and (name + ".").startswith(wanted):
            for attr, p in list(mod._parameters.items()):
                if p is not None:
                    del mod._parameters[attr]
                    mod.register_buffer(attr, p.detach(), persistent=True)
                    moved.append((mod, attr))
    try:
        yield len(moved)
    finally:
        for mod, attr in moved:
            t = mod._buffers.pop(attr)
            mod.register_parameter(attr, torch.nn.Parameter(t, requires_grad=False))


def sft_config(cfg: TuneConfig, progress: bool) -> Any:
    """The `vlsafe.experiments.tuning.SFTConfig` for this run (SPPFT is handled by `pinned`, not by layers)."""
    from vlsafe.experiments.tuning import SFTConfig

    sel = cfg.layers
    parts = ["language"] + ([] if sel is not None and sel.trainable is not None else ["projector"]) + \
        (["vision"] if cfg.train_vision else [])
    lora_sppft = sel is not None and sel.sppft is not None and _uses_lora(cfg)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] \
        if cfg.lora.target_modules == "all-linear" else list(cfg.lora.target_modules)
    return SFTConfig(
        method="lora" if _uses_lora(cfg) else "full", steps=cfg.steps, batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio,
        max_length=cfg.max_length, seed=cfg.seed, train=parts, progress=progress,
        trainable_layers=sel.trainable if sel is not None else None,
        frozen_layers=(sel.frozen if sel is not None and sel.frozen is not None else
                       list(range(*sel.sppft)) if lora_sppft else None),
        lora_r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, lora_targets=targets)


def _uses_lora(cfg: TuneConfig) -> bool:
    return cfg.method == "lora" or (cfg.method == "dpo" and cfg.dpo.lora)


def _train(cfg: TuneConfig, lm: Any, examples: list[dict[str, Any]], scfg: Any, progress: bool,
           callback: Callback | None) -> tuple[Any, Any]:
    """(trained model with LoRA merged, log DataFrame)."""
    from vlsafe.experiments import tuning

    sppft = cfg.layers is not None and cfg.layers.sppft is not None and not _uses_lora(cfg)
    span = range(*cfg.layers.sppft) if sppft else range(0)
    with pinned(lm.model, span):
        if cfg.method != "dpo":
            cb = (lambda step, model, row: callback(row)) if callback else None
            result = tuning.train(lm, examples, scfg, callback=cb, desc=f"tune ({cfg.method})")
            model, log = result.model, result.log
        else:
            from vlsafe.experiments.tune_dpo import train_dpo

            model = tuning.apply_lora(lm.model, scfg) if _uses_lora(cfg) else lm.model
            if not _uses_lora(cfg):
                tuning.select_trainable(model, scfg)
            ref = None if _uses_lora(cfg) else cfg.checkpoint().load_model().model
            model, log = train_dpo(model, lm.tokenizer, examples, cfg, ref_model=ref, progress=progress,
                                   callback=callback)
    return tuning.merged(model, inplace=True), log


def run_tune(cfg: TuneConfig, out_dir: str | Path, *, progress: bool = True,
             callback: Callback | None = None) -> Path:
    """Build the examples, train, and write `out_dir` atomically: HF checkpoint, `train_log.csv`, `examples.jsonl`,
    `tune.json` (resolved config and data counts), `run.json`. Frozen tensors are verified bit-identical."""
    import json

    from vlsafe.analysis.checkpoints import open_checkpoint
    from vlsafe.analysis.runinfo import atomic_path, check_out_dir, write_run_json
    from vlsafe.experiments import tuning
    from vlsafe.experiments.tune_data import build_examples, collect

    out = Path(out_dir)
    ckpt = cfg.checkpoint()
    check_out_dir(out, inputs=[ckpt.path])  # the folder is replaced whole (atomic_path)
    cfg.check_layers(ckpt.num_layers)
    scfg = sft_config(cfg, progress)
    lm = ckpt.load_model(dtype="float32")
    dpo = cfg.method == "dpo"
    rows = collect(cfg.data + cfg.mix_with, cfg.root, dpo, cfg.seed)
    examples, counts = build_examples(rows, lm, dpo=dpo, refusals=cfg.refusal_texts(), seed=cfg.seed,
                                      max_new_tokens=cfg.answer_tokens, batch_size=cfg.batch_size)
    frozen = frozen_names(list(ckpt.infos), cfg, ckpt.num_layers, family=ckpt.family)
    model, log = _train(cfg, lm, examples, scfg, progress, callback)
    info = {"config": cfg.model_dump(), "sft_config": scfg.model_dump(), "data": counts, "frozen_tensors": len(frozen)}
    with atomic_path(out) as tmp:
        tuning.write_checkpoint(model, lm.processor or lm.tokenizer, tmp, log=log, files={"tune.json": info})
        verify_frozen(ckpt, open_checkpoint(tmp), frozen)
        with (tmp / "examples.jsonl").open("w") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in examples)
        logs = {"train_log": "train_log.csv"} if (tmp / "train_log.csv").is_file() else {}
        write_run_json(tmp, kind="tune", tables=logs, config=cfg.model_dump(), checkpoints={"model": ckpt},
                       seed=cfg.seed, extra={"data": counts})
    return out
