"""Where a runnable model's pieces live: accelerate device maps, disk offload, and the device inputs go to.

>>> from vlsafe.analysis.checkpoints import open_checkpoint
>>> ck = open_checkpoint("big-model-dir")
>>> lm = ck.load_model(dtype="bfloat16", device_map="auto", max_memory={0: "70GiB", 1: "70GiB", "cpu": "200GiB"})
>>> lm = ck.load_model(device_map={20: "disk", 21: "disk"}, offload_folder="/scratch/offload")   # layers 20, 21 on disk
>>> input_device(lm.model)                      # where input ids must go (the embedding's execution device)

`device_map` is `None` (one device, plain `.to(device)`), a strategy understood by accelerate (`auto`,
`balanced`, `balanced_low_0`, `sequential`) or a dict. Dict keys are module names of the model in memory
(`model.layers.3`, `lm_head`, for LLaVA `model.language_model.layers.3`, `model.vision_tower`) or an int, meaning
language-model block `i` on the shared layer axis. Values are a device (`"cpu"`, `"cuda:1"`, an int GPU index) or
`"disk"`. Modules the dict does not name go to `device`, so a partial map is enough.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import platform
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from vlsafe.analysis.errors import VlsafeError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = str | Mapping[Any, Any] | None


def resolve_device(name: str | torch.device | None = "cpu") -> torch.device:
    """`"auto"` → `cuda` when available else `cpu`; `"cuda"`, `"cuda:1"`, `"cpu"`, `"mps"` checked to exist."""
    if isinstance(name, torch.device):
        return name
    name = str(name or "cpu").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise VlsafeError(f"unknown device {name!r} (use cpu, cuda, cuda:N, disk in a device map, or auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VlsafeError(f"device {name!r} requested but torch sees no CUDA device "
                              f"(torch {torch.__version__}); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VlsafeError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


PRECISIONS = ("fp32", "bf16", "auto")


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX); elsewhere autocast may be slower.
    Read once per process: `precision="auto"` is resolved on every SFT forward."""
    try:
        flags = {w for line in open("/proc/cpuinfo") if line.startswith("flags") for w in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str) -> str:
    """`auto` → `bf16` on CPUs with native bf16 (see `native_bf16`), else `fp32`; `fp32`/`bf16` unchanged;
    anything else is a one-line error."""
    if precision not in PRECISIONS:
        raise VlsafeError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision


def compute_precision(precision: str, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    """Context for the forward math: `fp32` as stored, or `bf16` = `torch.autocast` (bf16 matmuls, fp32
    weights and reductions). Pays off on CPUs with native bf16 (`docs/performance.md`)."""
    if resolve_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


@contextlib.contextmanager
def bf16_linear_weights(model: torch.nn.Module, precision: str) -> Iterator[None]:
    """For inference under `compute_precision("bf16")`: hold bf16 copies of every plain `nn.Linear`'s fp32
    weight and bias for the duration, then put the originals back (tied weights stay tied).

    Autocast casts a weight that does not require grad again on every forward; during generation that is the
    whole model once per new token. The copies give bit-identical outputs (autocast rounds the same way) and
    spare that cast (`docs/performance.md`). Costs half the fp32 linear weights in memory. A no-op for `fp32` and non-fp32 weights.
    Inference only: gradients do not reach the originals while the copies are in place."""
    if resolve_precision(precision) != "bf16":
        yield
        return
    stash: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for m in model.modules():
            if type(m) is not torch.nn.Linear:  # subclasses (quantized layers) keep their own forward
                continue
            for name in ("weight", "bias"):
                p = getattr(m, name)
                if p is not None and p.dtype == torch.float32:
                    stash.append((m, name, p))
                    setattr(m, name, torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False))
        yield
    finally:
        for m, name, p in reversed(stash):
            setattr(m, name, p)


def device_name(device: str | torch.device) -> str:
    """A human-readable name: the GPU model for CUDA, the processor and thread count for CPU."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev.index or 0)
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def synchronize(device: str | torch.device) -> None:
    """Wait for queued kernels on `device` (a no-op on CPU), so wall-clock timings are honest."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _as_device(value: Any) -> torch.device:
    if isinstance(value, int):
        return torch.device("cuda", value)
    return torch.device(value)


def input_device(model: Any) -> torch.device:
    """The device input ids must be on: the input embedding's execution device (accelerate-aware).

    For a model dispatched with a device map, weights offloaded to CPU or disk sit on the `meta` device while the
    embedding still *executes* somewhere real; that execution device is returned.
    """
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    emb = None
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        pass
    for mod in (emb, model):
        dev = getattr(getattr(mod, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            return _as_device(dev)
    for mod in (emb, model):
        if mod is None:
            continue
        for p in mod.parameters():
            if p.device.type != "meta":
                return p.device
    return torch.device("cpu")


def offloaded(model: nn.Module) -> list[str]:
    """Names of parameters that are not in memory (on the `meta` device: offloaded to CPU/disk by accelerate)."""
    return [n for n, p in model.named_parameters() if p.device.type == "meta"]


# ---- device maps ---------------------------------------------------------------------------------------------
def skeleton(auto_class: Any, config: Any, trust_remote_code: bool = False) -> nn.Module:
    """The model's module tree on the `meta` device (no weights read, no memory used)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return auto_class.from_config(config, trust_remote_code=trust_remote_code)


def block_prefix(model: nn.Module) -> str:
    """In-memory name of the language model's block list (the family file's `layers` path)."""
    from vlsafe.analysis.adapters import adapter

    ad = adapter(model)
    ad.layers()  # the path must exist in this model
    return ad.paths.layers


def _key(key: Any, prefix: str, n_layers: int, modules: set[str]) -> str:
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        key = int(key)
    if isinstance(key, int) and not isinstance(key, bool):
        if not 0 <= key < n_layers:
            raise VlsafeError(f"device_map: layer {key} out of range (valid layers: 0..{n_layers - 1})")
        return f"{prefix}.{key}"
    if not isinstance(key, str) or key not in modules:
        near = difflib.get_close_matches(str(key), sorted(modules), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else f"; e.g. {prefix}.0, lm_head, or a layer index"
        raise VlsafeError(f"device_map: no module named {key!r} in the model{hint}")
    return key


def _value(value: Any, where: str) -> str | int:
    text = str(value).strip().lower()
    if text == "disk":
        return text
    try:
        resolve_device(f"cuda:{value}" if isinstance(value, int) and not isinstance(value, bool) else text)
    except VlsafeError as e:
        raise VlsafeError(f"device_map[{where!r}]: {e}") from None
    return value if isinstance(value, int) else text


def complete(model: nn.Module, explicit: Mapping[str, str | int], default: str | int) -> dict[str, str | int]:
    """A device map naming every parameter: `explicit` entries plus the fewest module entries set to `default`."""
    out: dict[str, str | int] = {}

    def visit(name: str, module: nn.Module) -> None:
        if name in explicit:
            out[name] = explicit[name]
            return
        if not any(name == "" or k.startswith(name + ".") for k in explicit):
            out[name] = default
            return
        own = [n for n, _ in module.named_parameters(recurse=False)]
        for leaf in own + [n for n, _ in module.named_buffers(recurse=False)]:
            out[f"{name}.{leaf}" if name else leaf] = default
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return out


def build_device_map(model_skeleton: nn.Module, device_map: DeviceMap, default: str | torch.device = "cpu"
                     ) -> str | dict[str, str | int] | None:
    """`device_map` as `from_pretrained` wants it: strategies pass through, dicts are checked and completed."""
    if device_map is None or isinstance(device_map, str) and device_map in STRATEGIES:
        return device_map
    if isinstance(device_map, str):
        raise VlsafeError(f"device_map {device_map!r} not understood (use {', '.join(STRATEGIES)} or a dict)")
    if not isinstance(device_map, Mapping) or not device_map:
        raise VlsafeError("device_map must be a strategy name or a non-empty {module or layer: device} mapping")
    prefix = block_prefix(model_skeleton)
    n_layers = len(model_skeleton.get_submodule(prefix))
    modules = {n for n, _ in model_skeleton.named_modules() if n}
    explicit = {_key(k, prefix, n_layers, modules): _value(v, str(k)) for k, v in device_map.items()}
    return complete(model_skeleton, explicit, _value(str(resolve_device(default)), "default"))


def uses_disk(device_map: Any) -> bool:
    """True when an explicit map puts something on disk."""
    return isinstance(device_map, Mapping) and any(v == "disk" for v in device_map.values())


def max_memory_arg(max_memory: Mapping[Any, Any] | None) -> dict[Any, Any] | None:
    """`{0: "70GiB", "cpu": "200GiB"}` with string GPU indices ("0") turned into ints, as accelerate wants."""
    if max_memory is None:
        return None
    if not isinstance(max_memory, Mapping):
        raise VlsafeError('max_memory must be a mapping like {0: "70GiB", "cpu": "200GiB"}')
    return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in max_memory.items()}
