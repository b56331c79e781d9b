"""Load a runnable transformers model for a `Checkpoint` (AutoModel classes chosen by family kind)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from vlsafe.analysis.errors import VlsafeError

if TYPE_CHECKING:
    from vlsafe.analysis.checkpoints import Checkpoint


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"float32"`/`"fp32"`/`"bf16"`/torch dtype → torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp64": "float64"}
    name = aliases.get(str(dtype), str(dtype))
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise VlsafeError(f"unknown dtype {dtype!r} (use float32, bfloat16, float16 or float64)")
    return getattr(torch, name)


def _check_loadable(ckpt: "Checkpoint") -> None:
    if not ckpt.path.is_dir() or not (ckpt.path / "config.json").is_file():
        raise VlsafeError(f"{ckpt.spec}: cannot build a runnable model without a config.json next to the weights")
    if ckpt.config.get("auto_map") and not ckpt.trust_remote_code:
        raise VlsafeError(f"{ckpt.spec}: needs custom code from the checkpoint (auto_map); "
                          "pass trust_remote_code=True / --trust-remote-code if you trust it")


def _placement(ckpt: "Checkpoint", auto: Any, device: str, device_map: Any, max_memory: Any,
               offload_folder: Any) -> dict[str, Any]:
    """`from_pretrained` keywords for a device map (see `vlsafe.analysis.placement`); {} without one."""
    from vlsafe.analysis import placement as P

    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise VlsafeError(f"{ckpt.spec}: max_memory / offload_folder need a device_map (e.g. device_map='auto')")
        return {}
    if isinstance(device_map, Mapping):
        import transformers as T

        config = T.AutoConfig.from_pretrained(str(ckpt.path), trust_remote_code=ckpt.trust_remote_code)
        device_map = P.build_device_map(P.skeleton(auto, config, ckpt.trust_remote_code), device_map, device)
    else:
        device_map = P.build_device_map(None, device_map)
    if P.uses_disk(device_map) and offload_folder is None:
        raise VlsafeError(f"{ckpt.spec}: the device_map puts modules on disk; pass offload_folder=DIR")
    kw: dict[str, Any] = {"device_map": device_map}
    if max_memory is not None:
        kw["max_memory"] = P.max_memory_arg(max_memory)
    if offload_folder is not None:
        kw["offload_folder"] = str(offload_folder)
    return kw


def load_runnable(ckpt: "Checkpoint", *, dtype: str | torch.dtype = "float32", device: str = "cpu",
                  attn_implementation: str = "eager", device_map: Any = None, max_memory: Any = None,
                  offload_folder: Any = None) -> tuple[Any, Any, Any]:
    """(model, tokenizer, processor) for `ckpt`; processor is None for text models.

    Tokenizers are set to left padding (pad = eos when missing) so batched last-token reads line up.
    `device_map` (`auto`, `balanced`, a `{module or layer index: device or "disk"}` dict; see
    `vlsafe.analysis.placement`) spreads the model over devices with accelerate instead of `.to(device)`; `device`
    is then where modules a partial dict does not name go. `max_memory` caps each device, `offload_folder`
    holds weights put on disk.
    """
    import transformers as T

    _check_loadable(ckpt)
    kw: dict[str, Any] = dict(dtype=as_dtype(dtype), attn_implementation=attn_implementation,
                              trust_remote_code=ckpt.trust_remote_code)
    if ckpt.source.kind == "pickle":
        kw["use_safetensors"] = False
    auto = T.AutoModelForImageTextToText if ckpt.family.is_lvlm else T.AutoModelForCausalLM
    placed = _placement(ckpt, auto, device, device_map, max_memory, offload_folder)
    try:
        model = auto.from_pretrained(str(ckpt.path), **kw, **placed)
    except (OSError, ValueError, KeyError) as e:
        raise VlsafeError(f"{ckpt.spec}: transformers cannot load it ({str(e).splitlines()[0][:200]})") from None
    model = (model if placed else model.to(device)).eval()
    processor = None
    if ckpt.family.is_lvlm:
        try:
            processor = T.AutoProcessor.from_pretrained(str(ckpt.path), trust_remote_code=ckpt.trust_remote_code)
        except (OSError, ValueError, TypeError, KeyError):
            processor = None
    tokenizer = getattr(processor, "tokenizer", None) or T.AutoTokenizer.from_pretrained(
        str(ckpt.path), trust_remote_code=ckpt.trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, processor
