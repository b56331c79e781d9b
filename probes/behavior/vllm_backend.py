"""Optional vLLM generation engine with the outputs contract of `vlsafe.probes.behavior.generate.generate`.

>>> from vlsafe.probes.behavior.vllm_backend import generate_vllm, generate_with, select_backend
>>> select_backend("auto")        # "vllm" when vLLM is importable and a CUDA device exists, else "transformers"
>>> generate_vllm("runs/organism/lvlm", load_prompts("harmful-test"), max_new_tokens=64)   # greedy
>>> generate_with("auto", "runs/organism/lvlm", prompt_set, max_new_tokens=64)   # vLLM on a GPU, else transformers

Contract (as `generate`): one string per prompt, in the order given; each prompt goes through the model's chat
template (`vlsafe.probes.templates.format_chat`: the processor's template for an LVLM, image placeholder first) and is
tokenized without extra special tokens; greedy unless `do_sample`; decoding stops at the same end-of-sequence
ids (generation config + tokenizer eos); special tokens are skipped and whitespace stripped. Text prompts are
sent to vLLM as token ids, so both engines see identical inputs; image prompts are sent as the formatted text
plus the PIL image (vLLM's own processor expands the placeholder). Greedy outputs match transformers' token for
token except where two logits tie within kernel rounding; sampled outputs are reproducible per `seed` within
vLLM but are not the same random draws as transformers'. vLLM reads weights from disk, so pass a checkpoint,
not an edited in-memory model. Install with `pip install 'vlsafe[vllm]'` on a machine with a CUDA GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.behavior.generate import (GenerationSettings, check_inputs, generate, load_image,
                                      prompt_texts_and_images, stop_token_ids)

log = logging.getLogger("vlsafe.generate")
BACKENDS = ("transformers", "vllm", "auto")
_ALIASES = {"hf": "transformers", "torch": "transformers", "transformer": "transformers"}
_ENGINES: dict[tuple, Any] = {}
_INSTALL = "pip install 'vlsafe[vllm]' on a machine with a CUDA GPU"
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # keep vLLM's own log handlers off vlsafe's output


def available() -> bool:
    """True when the `vllm` package can be imported (it is not imported here: that takes seconds)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def select_backend(name: str = "auto") -> str:
    """`"transformers"` or `"vllm"` for a requested engine; falls back to transformers, with a one-line warning,
    when vLLM is asked for but absent (`auto` picks vLLM only when it is installed and a CUDA device exists)."""
    key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in BACKENDS:
        raise VlsafeError(f"unknown generation backend {name!r} (choose from {', '.join(BACKENDS)})")
    if key == "transformers":
        return key
    if key == "vllm":
        if available():
            return "vllm"
        log.warning("vLLM is not installed; generating with transformers instead (%s)", _INSTALL)
        return "transformers"
    if available() and torch.cuda.is_available():
        return "vllm"
    why = "no CUDA device" if available() else "vLLM is not installed"
    log.info("generation backend auto: transformers (%s)", why)
    return "transformers"


# ---- inputs ----------------------------------------------------------------------------------------------------
def formatter(ckpt: Any) -> tuple[Any, Any]:
    """(what formats prompts: the processor for an LVLM else the tokenizer, the tokenizer) — no weights loaded."""
    import transformers as T

    trust = getattr(ckpt, "trust_remote_code", False)
    proc = None
    if ckpt.family.is_lvlm:
        try:
            proc = T.AutoProcessor.from_pretrained(str(ckpt.path), trust_remote_code=trust)
        except (OSError, ValueError, TypeError, KeyError):
            proc = None
    tok = getattr(proc, "tokenizer", None) or T.AutoTokenizer.from_pretrained(str(ckpt.path), trust_remote_code=trust)
    return (proc if proc is not None else tok), tok


def build_requests(fmt: Any, tokenizer: Any, texts: Sequence[str], images: Sequence[Any],
                   system: str | None = None) -> list[dict[str, Any]]:
    """vLLM prompts: `{"prompt_token_ids": …}` for text, `{"prompt": …, "multi_modal_data": {"image": …}}`."""
    from vlsafe.probes.templates import format_chat

    out: list[dict[str, Any]] = []
    for text, image in zip(texts, images):
        formatted = format_chat(fmt, text, image=image is not None, system=system)
        if image is None:
            out.append({"prompt_token_ids": tokenizer(formatted, add_special_tokens=False)["input_ids"]})
        else:
            out.append({"prompt": formatted, "multi_modal_data": {"image": image}})
    return out


def sampling_kwargs(s: GenerationSettings, stop_ids: list[int]) -> dict[str, Any]:
    """`vllm.SamplingParams` keywords for `s`: temperature 0 for greedy, a per-request seed when sampling."""
    kw: dict[str, Any] = dict(n=1, max_tokens=s.max_new_tokens, stop_token_ids=list(stop_ids),
                              skip_special_tokens=True)
    if s.do_sample:
        kw.update(temperature=s.temperature, top_p=s.top_p, seed=s.seed)
    else:
        kw.update(temperature=0.0, top_p=1.0)
    return kw


def _stop_ids(ckpt: Any, tokenizer: Any) -> list[int]:
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(str(ckpt.path))
    except (OSError, ValueError):
        gen = None
    return stop_token_ids(SimpleNamespace(model=SimpleNamespace(generation_config=gen), tokenizer=tokenizer,
                                          checkpoint=ckpt))


def _checkpoint(spec: Any) -> Any:
    from vlsafe.analysis.checkpoints import Checkpoint, LoadedModel, open_checkpoint

    if isinstance(spec, LoadedModel):
        raise VlsafeError("vLLM loads weights from disk: pass a checkpoint path, not a loaded model "
                          "(save an edited model first, or use backend='transformers')")
    return spec if isinstance(spec, Checkpoint) else open_checkpoint(spec)


# ---- engine ----------------------------------------------------------------------------------------------------
def engine(path: str | Path, *, dtype: str = "auto", seed: int = 0, tensor_parallel_size: int = 1,
           gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, trust_remote_code: bool = False,
           **engine_kwargs: Any) -> Any:
    """A `vllm.LLM` for `path`, built once per process and settings (engines are expensive to start)."""
    if not available():
        raise VlsafeError(f"vLLM is not installed: {_INSTALL}, or use backend='transformers'")
    key = (str(path), dtype, seed, tensor_parallel_size, gpu_memory_utilization, max_model_len, trust_remote_code,
           tuple(sorted(engine_kwargs.items())))
    if key not in _ENGINES:
        from vllm import LLM

        kw = dict(model=str(path), tokenizer=str(path), dtype=dtype, seed=seed,
                  tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                  trust_remote_code=trust_remote_code, **engine_kwargs)
        if max_model_len is not None:
            kw["max_model_len"] = max_model_len
        _ENGINES[key] = LLM(**kw)
    return _ENGINES[key]


def generate_vllm(spec_or_path: Any, prompts: Any, *, images: Any = None, max_new_tokens: int = 64,
                  do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                  system: str | None = None, dtype: str = "auto", tensor_parallel_size: int = 1,
                  gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, llm: Any = None,
                  progress: bool = True) -> list[str]:
    """Generate one response per prompt with vLLM (same arguments and outputs as `generate`, minus the cache).

    `spec_or_path`: a checkpoint spec or `Checkpoint`. `tensor_parallel_size` splits the model over GPUs;
    `llm` reuses an engine built by `engine(...)`.
    """
    if not available():
        raise VlsafeError(f"vLLM is not installed: {_INSTALL}, or use backend='transformers'")
    ckpt = _checkpoint(spec_or_path)
    fmt, tok = formatter(ckpt)
    texts, specs = prompt_texts_and_images(prompts, images)
    settings = GenerationSettings(int(max_new_tokens), bool(do_sample), float(temperature), float(top_p), int(seed),
                                  system)
    proc = fmt if fmt is not tok else None
    check_inputs(SimpleNamespace(processor=proc, checkpoint=ckpt, model=None), texts, specs, settings, 1)
    requests = build_requests(fmt, tok, texts, [load_image(s) for s in specs], system)
    from vllm import SamplingParams

    llm = llm or engine(ckpt.path, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
                        gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                        trust_remote_code=getattr(ckpt, "trust_remote_code", False))
    outputs = llm.generate(requests, SamplingParams(**sampling_kwargs(settings, _stop_ids(ckpt, tok))),
                           use_tqdm=progress)
    return [o.outputs[0].text.strip() for o in outputs]


_TRANSFORMERS_ONLY = ("batch_size", "cache")
_VLLM_ONLY = ("dtype", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "llm")


def generate_with(backend: str, lm_or_spec: Any, prompts: Any, **kwargs: Any) -> list[str]:
    """`generate` or `generate_vllm` by `select_backend(backend)`; options of the other engine are dropped.

    An already loaded model stays with transformers under `auto` (vLLM would load a second copy from disk and
    miss in-memory edits); asking for `vllm` with one is an error.
    """
    from vlsafe.analysis.checkpoints import LoadedModel

    loaded = isinstance(lm_or_spec, LoadedModel)
    chosen = "transformers" if loaded and str(backend).strip().lower() == "auto" else select_backend(backend)
    if chosen == "vllm":
        return generate_vllm(lm_or_spec, prompts, **{k: v for k, v in kwargs.items() if k not in _TRANSFORMERS_ONLY})
    from vlsafe.probes.models import load

    return generate(load(lm_or_spec), prompts, **{k: v for k, v in kwargs.items() if k not in _VLLM_ONLY})

