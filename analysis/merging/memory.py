"""In-memory merges: a merge plan applied to a loaded model of its layout checkpoint; nothing is written.

`merge_into(plan, lm)` writes into `lm`'s parameters the tensors `run_merge(plan, out)` would write where they differ
from the layout model's stored ones (`vlsafe.analysis.merging.executor.merged_tensors`: every merged tensor, and
copies cast to another `out_dtype`), each cast to the parameter's dtype, so `lm` then equals
`load(run_merge(plan, out))` loaded with the same dtype, bit for bit. `load_merged(plan)` is both steps.

Parameters are found by canonical name: the layout checkpoint's family rules (`vlsafe.analysis.names`, the same
rules that name the checkpoint's tensors) name the loaded model's parameters too, whose in-memory layout may differ
from the saved one (LLaVA saves `language_model.model.*` or `model.language_model.*` and holds the latter; both are
`model.*`). A merged tensor with no parameter is a one-line error naming it.

What an in-memory merge cannot reproduce (`not_in_memory`): a `tokenizer_source` other than the base, or a
`chat_template` (the written checkpoint's tokenizer differs from the layout model's).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlsafe.analysis.checkpoints import LoadedModel, open_checkpoint
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.merging.config import MergePlan
from vlsafe.analysis.merging.executor import merged_tensors
from vlsafe.analysis.names import Family, canonicalize

__all__ = ["merge_into", "load_merged", "not_in_memory", "parameters_by_canonical"]


def not_in_memory(plan: MergePlan) -> str | None:
    """Why `merge_into` cannot reproduce `run_merge(plan)`'s model (its tokenizer would differ), or None."""
    if plan.tokenizer_source not in (None, "base"):
        return f"tokenizer_source '{plan.tokenizer_source}' changes the tokenizer"
    if plan.chat_template is not None:
        return "chat_template changes the tokenizer's chat template"
    return None


def parameters_by_canonical(model: nn.Module, family: Family, source: str = "model") -> dict[str, tuple[str, Any]]:
    """Canonical name → (name in `model`, tensor) of every parameter and persistent buffer, named by `family`'s
    rules (names no rule matches get the `other.` prefix, as in a checkpoint). Tied parameters appear under each
    of their names, as one tensor."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    saved = set(model.state_dict())
    tensors.update((n, b) for n, b in model.named_buffers(remove_duplicate=False) if n in saved)
    return {canon: (name, tensors[name]) for name, canon in canonicalize(tensors, family, source).items()}


def merge_into(plan: MergePlan, lm: LoadedModel, *, allow_pickle: bool = False,
               trust_remote_code: bool = False) -> int:
    """Apply `plan` to `lm` (loaded from the plan's layout model: the base, else the first model) in place; the
    number of tensors written. `lm` then equals the written merge loaded with `lm`'s dtype (see the module
    docstring); `lm.checkpoint` still names the layout model."""
    reason = not_in_memory(plan)
    if reason is not None:
        raise VlsafeError(f"merge_into: {reason}; write the merge with run_merge instead")
    layout = open_checkpoint(plan.layout_model(), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if lm.checkpoint.content_hash() != layout.content_hash():
        raise VlsafeError(f"merge_into: the model is {lm.checkpoint.spec}, not the plan's layout model {layout.spec}")
    params = parameters_by_canonical(lm.model, layout.family, lm.checkpoint.spec)
    written: dict[int, str] = {}  # storage → the merged tensor written there (tied parameters share one)
    n = 0
    with torch.no_grad():
        for task, tensor in merged_tensors(plan, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code):
            if task.name not in params:
                raise VlsafeError(f"merge_into: merged tensor '{task.raw_name}' ({task.name}) has no parameter in "
                                  f"the loaded {type(lm.model).__name__}")
            name, param = params[task.name]
            if tuple(param.shape) != tuple(tensor.shape):
                raise VlsafeError(f"merge_into: '{task.raw_name}' has shape {tuple(tensor.shape)}, parameter "
                                  f"'{name}' {tuple(param.shape)}")
            value = tensor.to(param.dtype)
            key = param.data_ptr()
            if key in written and not torch.equal(param, value):
                raise VlsafeError(f"merge_into: '{task.raw_name}' and '{written[key]}' are tied in the loaded "
                                  "model but merge to different values; write the merge with run_merge instead")
            param.copy_(value)
            written[key] = task.raw_name
            n += 1
    return n


def load_merged(plan: MergePlan, *, dtype: str | torch.dtype = "float32", device: str = "cpu",
                allow_pickle: bool = False, trust_remote_code: bool = False) -> LoadedModel:
    """The plan's layout model loaded (`Checkpoint.load_model`, as `vlsafe.probes.models.load` does; eager
    attention) with `plan` merged into it in memory."""
    layout = open_checkpoint(plan.layout_model(), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    lm = layout.load_model(dtype=dtype, device=device)
    merge_into(plan, lm, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return lm
