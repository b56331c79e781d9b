"""Streaming merge executor: one tensor group in memory, output written tensor by tensor, atomically.

Inputs are `Checkpoint`s paired **by canonical name**, so an LVLM and its pre-adaptation LLM align. The
output keeps the layout model's (the base, else the first model) raw names, order, config and tokenizer,
so it is a valid checkpoint of the base's family:

- LVLM + LLM: only the language model is merged; vision tower and projector (absent from the LLM) are
  copied from the LVLM; embedding/`lm_head` rows beyond the smaller vocabulary are kept from the base.
- two LVLMs: every aligned tensor is merged.
- tensors outside a `layers`/`modules` selection, and non-float tensors, are copied from the base.

Everything is checked (shapes, parameters, layer indices, the mergekit export) before the first byte is
written; the output is built in a temporary folder renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from vlsafe.analysis.checkpoints import Checkpoint, open_checkpoint
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.loading import as_dtype
from vlsafe.analysis.merging import methods
from vlsafe.analysis.merging.config import MergePlan, module_matches
from vlsafe.analysis.merging.io import MergeReader, ShardedWriter, pipelined
from vlsafe.analysis.runinfo import atomic_path, check_out_dir, write_run_json
from vlsafe.analysis.sources import torch_dtype
from vlsafe.analysis.streaming import wants_direct_io

_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")
_NOT_COPIED = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "run.json", "mergekit.yaml",
               "vlsafe_source.txt"}
_TOKENIZER = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "chat_template", "spiece")


@dataclass
class TensorTask:
    """What happens to one output tensor."""

    name: str
    raw_name: str
    layer: int | None
    module: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    action: str  # "merge" or "copy"
    reason: str = ""
    rows: int | None = None  # merge only the first `rows` rows (vocabulary), the rest from the base
    shared: dict[str, Any] = field(default_factory=dict)
    per_model: list[dict[str, Any]] = field(default_factory=list)

    def summary(self, contributors: list[str]) -> dict[str, Any]:
        d: dict[str, Any] = {"tensor": self.name, "layer": self.layer, "module": self.module, "action": self.action}
        if self.reason:
            d["reason"] = self.reason
        if self.rows is not None:
            d["merged_rows"] = self.rows
        if self.action == "merge":
            d["parameters"] = self.shared
            d["per_model"] = dict(zip(contributors, self.per_model))
        return d


def _out_dtype(plan: MergePlan, stored: torch.dtype) -> torch.dtype:
    if not stored.is_floating_point:
        return stored
    chosen = plan.out_dtype or plan.dtype
    return as_dtype(chosen) if chosen else stored


def plan_tensors(plan: MergePlan, ckpts: dict[str, Checkpoint]) -> list[TensorTask]:
    """Resolve every output tensor of `plan` (no tensor data read); structural problems raise here."""
    layout = ckpts[plan.layout_model()]
    readers = {s: MergeReader(ckpts[s]) for s in plan.inputs()}
    num_layers = layout.num_layers
    plan.check_layers(num_layers, source=f"plan for {layout.spec}")
    tasks = []
    for name, info in layout.infos.items():
        stored = torch_dtype(info.dtype)
        task = TensorTask(name, info.raw_name, info.layer, info.module, tuple(info.shape),
                          _out_dtype(plan, stored), "copy")
        missing = [s for s in plan.inputs() if not readers[s].has(name)]
        if not stored.is_floating_point:
            task.reason = "not floating point"
        elif not plan.selects(info.layer, info.module):
            task.reason = "outside the layers/modules selection"
        elif missing and info.namespace != "language":
            task.reason = f"absent from {missing[0]}"
        elif missing:
            raise VlsafeError(f"{name}: language-model tensor missing from {missing[0]} "
                              f"(present in {layout.spec}); are they the same architecture?")
        else:
            task.action, task.rows = "merge", _rows(name, info, readers, layout.spec)
            task.shared, task.per_model = plan.resolve(name, info.layer, num_layers)
        tasks.append(task)
    _check_selection(plan, layout)
    return tasks


def _check_selection(plan: MergePlan, layout: Checkpoint) -> None:
    """Every `modules` entry must name something in the layout model, and the selection must pick a tensor."""
    labels = {i.module for i in layout.infos.values()}
    for wanted in plan.modules or []:
        if not any(module_matches(m, wanted) for m in labels):
            raise VlsafeError(f"modules: '{wanted}' matches no tensor of {layout.spec} "
                              f"(modules there: {', '.join(sorted(labels))})")
    if (plan.layers is not None or plan.modules is not None) and not any(
            plan.selects(i.layer, i.module) for i in layout.infos.values()):
        raise VlsafeError(f"layers {plan.layers} / modules {plan.modules} select no tensor of {layout.spec}")


def _rows(name: str, info: Any, readers: dict[str, MergeReader], layout_spec: str) -> int | None:
    rows = None
    for spec, r in readers.items():
        shape = r.shape(name)
        if shape == tuple(info.shape):
            continue
        vocab = info.module in ("embed", "lm_head") and shape[1:] == tuple(info.shape[1:])
        if not vocab:
            raise VlsafeError(f"{name}: shape {shape} in {spec} does not match {tuple(info.shape)} in {layout_spec}")
        rows = min(rows or info.shape[0], shape[0])
    return rows


def tensor_seed(seed: int, name: str) -> int:
    """The per-tensor DARE seed: independent of execution order, stable across runs."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def _load(task: TensorTask, plan: MergePlan, readers: dict[str, MergeReader]) -> dict[str, torch.Tensor]:
    """The input tensors `task` needs (the layout model's only, for a copy)."""
    specs = [plan.layout_model()] if task.action == "copy" else plan.inputs()
    return {s: readers[s].get(task.name) for s in specs}


def _compute(task: TensorTask, plan: MergePlan, group: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    layout = plan.layout_model()
    if task.action == "copy":
        return group[layout].to(task.out_dtype)
    spec = plan.spec
    if task.rows is not None:
        full = group[layout].to(task.out_dtype, copy=True)
        group = {s: t[:task.rows] for s, t in group.items()}
    base = group[plan.base_model] if plan.base_model else None
    others = [group[s] for s in plan.contributors()]
    gen = torch.Generator().manual_seed(tensor_seed(seed, task.name)) if spec.sparsify == "random" else None
    compute = as_dtype(plan.dtype) if plan.dtype else None
    try:
        out = methods.apply(spec, base, others, task.shared, task.per_model, dtype=compute,
                            out_dtype=task.out_dtype, generator=gen)
    except VlsafeError as e:
        raise VlsafeError(f"{task.name}: {e}") from None
    if task.rows is not None:
        full[:task.rows] = out
        out = full
    return out


def open_inputs(plan: MergePlan, allow_pickle: bool = False, trust_remote_code: bool = False) -> dict[str, Checkpoint]:
    """Open every model the plan names (inputs and tokenizer source) lazily, by spec."""
    specs = plan.inputs() + ([plan.tokenizer_source] if plan.tokenizer_source not in (None, "base") else [])
    out = {}
    for s in dict.fromkeys(specs):
        if s == "union":
            raise VlsafeError("tokenizer_source 'union' is not supported yet (use 'base' or a model)")
        out[s] = open_checkpoint(s, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return out


def _readers(plan: MergePlan, ckpts: dict[str, Checkpoint]) -> dict[str, MergeReader]:
    direct = wants_direct_io([ckpts[s] for s in plan.inputs()])  # inputs larger than memory: bypass the cache
    return {s: MergeReader(ckpts[s], direct=direct) for s in plan.inputs()}


def _seed(plan: MergePlan) -> int:
    return 0 if plan.seed is None else plan.seed


def merged_tensors(plan: MergePlan, *, allow_pickle: bool = False, trust_remote_code: bool = False
                   ) -> Iterator[tuple[TensorTask, torch.Tensor]]:
    """The tensors `run_merge(plan, …)` writes that differ from the layout model's stored ones — every merged
    tensor, and copies cast to another dtype (`out_dtype`) — each with its task (canonical `name`, `raw_name`),
    computed exactly as `run_merge` computes them, in the layout's order, one tensor group in memory at a time.
    Nothing is written (see `vlsafe.analysis.merging.memory.merge_into`)."""
    ckpts = open_inputs(plan, allow_pickle, trust_remote_code)
    stored = ckpts[plan.layout_model()].infos
    tasks = [t for t in plan_tensors(plan, ckpts)
             if t.action == "merge" or t.out_dtype != torch_dtype(stored[t.name].dtype)]
    readers = _readers(plan, ckpts)
    try:
        for task in tasks:
            yield task, _compute(task, plan, _load(task, plan, readers), _seed(plan))
    finally:
        for r in readers.values():
            r.close()


def _root(ckpt: Checkpoint) -> Path:
    return ckpt.path if ckpt.path.is_dir() else ckpt.path.parent


def _copy_side_files(plan: MergePlan, ckpts: dict[str, Checkpoint], dst: Path, tasks: list[TensorTask]) -> None:
    src = _root(ckpts[plan.layout_model()])
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix not in _WEIGHTS and f.name not in _NOT_COPIED:
            shutil.copy2(f, dst / f.name)
    if plan.tokenizer_source not in (None, "base"):
        for f in sorted(_root(ckpts[plan.tokenizer_source]).iterdir()):
            if f.is_file() and f.name.startswith(_TOKENIZER) and f.suffix not in _WEIGHTS:
                shutil.copy2(f, dst / f.name)
    if plan.chat_template is not None:
        (dst / "chat_template.jinja").write_text(plan.chat_template)
    cfg = dst / "config.json"
    chosen = plan.out_dtype or plan.dtype
    if cfg.is_file() and chosen:
        d = json.loads(cfg.read_text())
        name = str(as_dtype(chosen)).removeprefix("torch.")
        for sub in [d] + [v for v in d.values() if isinstance(v, dict)]:
            for key in ("dtype", "torch_dtype"):
                if key in sub:
                    sub[key] = name
        cfg.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def _export_renames(ckpts: dict[str, Checkpoint]) -> dict[str, str]:
    return {s: str(c.path) for s, c in ckpts.items() if s == "default" or s.endswith(".gguf")}


def run_merge(plan: MergePlan, out_dir: str | Path, *, out_shard_size: int | str = "5GB", allow_pickle: bool = False,
              trust_remote_code: bool = False, progress: bool = True, kind: str = "merge") -> Path:
    """Execute `plan` into `out_dir`: HF checkpoint + `mergekit.yaml` (the exported plan) + `run.json`.

    `kind` is the run kind recorded in `run.json` (`resta` when RESTA builds the plan)."""
    out = Path(out_dir)
    ckpts = open_inputs(plan, allow_pickle, trust_remote_code)
    check_out_dir(out, inputs=[_root(c) for c in ckpts.values()])
    layout = ckpts[plan.layout_model()]
    tasks = plan_tensors(plan, ckpts)
    # the export covers what mergekit would merge: merged tensors and those only outside the selection
    names = [t.name for t in tasks if t.action == "merge" or t.reason.startswith("outside")]
    exported = plan.to_mergekit_yaml(names, layout.num_layers, _export_renames(ckpts))
    seed = _seed(plan)
    readers = _readers(plan, ckpts)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        writer = ShardedWriter(tmp, [(t.raw_name, t.out_dtype, t.shape) for t in tasks], out_shard_size)
        with tqdm(total=len(tasks), desc=f"merge ({plan.merge_method})", unit="tensor", disable=not progress) as bar:
            def write(task: TensorTask, tensor: torch.Tensor) -> None:
                writer.write(task.raw_name, tensor)
                bar.update(1)

            pipelined(tasks, lambda t: _load(t, plan, readers), lambda t, g: _compute(t, plan, g, seed), write)
        for r in readers.values():
            r.close()
        files = writer.close()
        _copy_side_files(plan, ckpts, tmp, tasks)
        (tmp / "mergekit.yaml").write_text(exported)
        contributors = plan.contributors()
        counts = {a: sum(t.action == a for t in tasks) for a in ("merge", "copy")}
        write_run_json(tmp, kind=kind, tables={}, config=plan.model_dump(exclude_none=True),
                       checkpoints=dict(ckpts), seed=seed,
                       extra={"output": {"layout_model": plan.layout_model(), "family": layout.family.name,
                                         "shards": [f.name for f in files], "tensors": counts,
                                         "out_shard_size": str(out_shard_size)},
                              "tensors": [t.summary(contributors) for t in tasks]})
    return out
