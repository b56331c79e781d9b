"""Batched generation for text and LVLM prompts: left padding, greedy by default, on-disk cache.

>>> from vlsafe.probes.models import load
>>> from vlsafe.probes.behavior.datasets import load_prompts
>>> from vlsafe.probes.behavior.generate import generate
>>> lm = load("default")
>>> generate(lm, load_prompts("harmless-test", limit=8), max_new_tokens=32)      # list of 8 strings

Prompts are sorted by token length into batches (less padding), generated with `model.generate` (position ids
derived from the attention mask by transformers, i.e. `cumsum(mask) - 1`), cut at the first end-of-sequence token,
decoded from the new tokens only, and returned in the original order. Results are cached as JSONL under
`vlsafe.analysis.resolve.cache_dir()/generations/`, keyed by the checkpoint's content hash, an in-memory weight
fingerprint (so edited weights miss), the prompts and images, and the generation config.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.placement import bf16_linear_weights, compute_precision, input_device, resolve_precision
from vlsafe.analysis.runinfo import atomic_path

CACHE_VERSION = 1


@dataclass(frozen=True)
class GenerationSettings:
    """The generation config that, with the model and prompts, determines the outputs (the cache key)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    system: str | None = None
    precision: str = "fp32"  # or "bf16" (autocast); see vlsafe.analysis.placement.compute_precision

    def key(self, batch_size: int) -> dict[str, Any]:
        """What goes into the cache key; batch composition only matters when sampling."""
        d = asdict(self)
        if self.precision == "fp32":
            del d["precision"]  # keys from before the field existed stay valid
        if not self.do_sample:
            d.update(temperature=None, top_p=None, seed=None)
        else:
            d["batch_size"] = batch_size
        return d


def generate(lm: Any, prompts: Any, *, images: Any = None, max_new_tokens: int = 64, batch_size: int = 16,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             system: str | None = None, cache: bool | str | Path = True, progress: bool = True,
             precision: str = "fp32") -> list[str]:
    """Generate one response per prompt (decoded new tokens, stripped), in the order given.

    `prompts` is a list of strings or a `PromptSet` (its records' `image` specs are used unless `images` is
    given). `images`: one PIL image / image spec (`blank`, `noise:SEED`, a file) / None per prompt, or a single
    one for all. Greedy unless `do_sample` (then `temperature`, `top_p`, reproducible with `seed`; top-k off).
    `cache`: True (the vlsafe cache), a directory, or False. `precision="bf16"` runs the forward passes under
    bf16 autocast (faster on CPUs with AVX512-BF16; greedy outputs can differ from fp32 on near-ties); `"auto"`
    picks bf16 only where the CPU has it natively (resolved before the cache key is made).
    """
    texts, specs = prompt_texts_and_images(prompts, images)
    settings = GenerationSettings(int(max_new_tokens), bool(do_sample), float(temperature), float(top_p),
                                  int(seed), system, resolve_precision(precision))
    check_inputs(lm, texts, specs, settings, batch_size)
    path = _cache_path(lm, texts, specs, settings, batch_size, cache)
    if path is not None and (hit := _read_cache(path, texts)) is not None:
        return hit
    out = _generate_all(lm, texts, specs, settings, batch_size, progress)
    if path is not None:
        _write_cache(path, texts, specs, out)
    return out


# ----------------------------------------------------------------------------------------------------- inputs

def prompt_texts_and_images(prompts: Any, images: Any) -> tuple[list[str], list[Any]]:
    """(prompt texts, one image or None each) from a list / `PromptSet` and an optional `images` override."""
    records = getattr(prompts, "records", None)
    if records is not None:
        texts = [r.prompt for r in records]
        default_images = [r.image for r in records]
    elif isinstance(prompts, str):
        texts, default_images = [prompts], [None]
    else:
        texts = list(prompts)
        default_images = [None] * len(texts)
    if images is None:
        specs = default_images
    elif isinstance(images, (str, Path)) or hasattr(images, "convert"):  # one spec / PIL image for all
        specs = [images] * len(texts)
    else:
        specs = list(images)
    if len(specs) != len(texts):
        raise VlsafeError(f"generate: {len(specs)} images for {len(texts)} prompts")
    return texts, [str(s) if isinstance(s, Path) else s for s in specs]


def check_inputs(lm: Any, texts: list[str], specs: list[Any], s: GenerationSettings, batch_size: int) -> None:
    """One-line `VlsafeError` for an empty list, empty prompts, bad settings, or images for a text-only model."""
    if not texts:
        raise VlsafeError("generate: empty prompt list")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise VlsafeError(f"generate: prompt {i} is empty or not a string")
    if batch_size < 1 or s.max_new_tokens < 1:
        raise VlsafeError(f"generate: batch_size ({batch_size}) and max_new_tokens ({s.max_new_tokens}) must be >= 1")
    if s.do_sample and (s.temperature <= 0 or not 0 < s.top_p <= 1):
        raise VlsafeError(f"generate: sampling needs temperature > 0 and 0 < top_p <= 1 "
                          f"(got {s.temperature}, {s.top_p})")
    first = next((i for i, im in enumerate(specs) if im is not None), None)
    if first is not None and not _takes_images(lm):
        raise VlsafeError(f"{_label(lm)}: prompt {first} has an image ({_describe(specs[first])}) but the model is "
                          "text-only; use a text prompt set or a vision-language checkpoint")


def _takes_images(lm: Any) -> bool:
    proc = getattr(lm, "processor", None)
    return proc is not None and hasattr(proc, "image_processor")


def _label(lm: Any) -> str:
    ck = getattr(lm, "checkpoint", None)
    return getattr(ck, "spec", None) or type(getattr(lm, "model", lm)).__name__


def _describe(image: Any) -> str:
    return image if isinstance(image, str) else f"{type(image).__name__} image"


def load_image(spec: Any) -> Any:
    """A PIL image from a PIL image (returned as is) or an image spec string (`blank`, `noise:SEED`, a path)."""
    if spec is None or hasattr(spec, "convert"):
        return spec
    from vlsafe.probes.behavior.images import make_image

    return make_image(str(spec))


# ----------------------------------------------------------------------------------------------------- generation

def _generate_all(lm: Any, texts: list[str], specs: list[Any], s: GenerationSettings, batch_size: int,
                  progress: bool) -> list[str]:
    from tqdm.auto import tqdm

    from vlsafe.probes.templates import encode

    order = _length_order(lm, texts, specs, s.system)
    out: list[str | None] = [None] * len(texts)
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    device = input_device(lm.model)
    with _seeded(s.seed, device), bf16_linear_weights(lm.model, s.precision):
        for idx in tqdm(chunks, desc=f"generate {_label(lm)}", disable=not progress, leave=False):
            imgs = [load_image(specs[i]) for i in idx]
            batch = encode(lm, [texts[i] for i in idx], imgs if any(im is not None for im in imgs) else None,
                           system=s.system).to(device)
            for i, text in zip(idx, _generate_batch(lm, batch, s)):
                out[i] = text
    return [t or "" for t in out]


def _length_order(lm: Any, texts: list[str], specs: list[Any], system: str | None) -> list[int]:
    """Prompt indices sorted by formatted token length (longest first; ties keep the given order)."""
    from vlsafe.probes.templates import format_chat

    fmt = getattr(lm, "processor", None) or lm.tokenizer
    formatted = [format_chat(fmt, t, image=im is not None, system=system) for t, im in zip(texts, specs)]
    lengths = [len(ids) for ids in lm.tokenizer(formatted, add_special_tokens=False)["input_ids"]]
    return sorted(range(len(texts)), key=lambda i: -lengths[i])


def stop_token_ids(lm: Any) -> list[int]:
    """End-of-sequence ids: the model's generation config plus the tokenizer's eos (deduplicated)."""
    ids: list[int] = []
    gen_eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    for v in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])) + [lm.tokenizer.eos_token_id]:
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    if not ids:
        raise VlsafeError(f"{_label(lm)}: no end-of-sequence token in the tokenizer or generation config")
    return ids


def _generate_batch(lm: Any, batch: Any, s: GenerationSettings) -> list[str]:
    from transformers import GenerationConfig

    eos = stop_token_ids(lm)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else eos[0]
    kw: dict[str, Any] = dict(max_new_tokens=s.max_new_tokens, do_sample=s.do_sample, eos_token_id=eos,
                              pad_token_id=pad, num_beams=1)
    if s.do_sample:
        kw.update(temperature=s.temperature, top_p=s.top_p, top_k=0)
    with torch.inference_mode(), compute_precision(s.precision, input_device(lm.model)):
        seqs = lm.model.generate(**batch.model_inputs(position_ids=False), generation_config=GenerationConfig(**kw))
    new = seqs[:, batch.input_ids.shape[1]:].tolist()
    return [lm.tokenizer.decode(_until_eos(row, eos), skip_special_tokens=True).strip() for row in new]


def _until_eos(ids: list[int], eos: list[int]) -> list[int]:
    for j, t in enumerate(ids):
        if t in eos:
            return ids[:j]
    return ids


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for the block without disturbing the caller's global RNG state."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------------------------------- cache

def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over each parameter's fp64 sum and a strided sample of its values.

    Edits made in memory (orthogonalisation, merging into a loaded model…) change it, so they miss the cache.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)].to(torch.float64).cpu().numpy().tobytes()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{flat.sum(dtype=torch.float64).item():.17g}".encode())
            h.update(sample)
    return h.hexdigest()


def _has_hooks(model: torch.nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _image_key(image: Any) -> Any:
    """JSON identity of an image: the spec, plus the file's sha256 for a path, or a PIL image's pixel hash."""
    if image is None:
        return None
    if isinstance(image, str):
        path = Path(image).expanduser()
        return {"spec": image, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()} if path.is_file() else image
    return {"mode": image.mode, "size": list(image.size), "sha256": hashlib.sha256(image.tobytes()).hexdigest()}


def cache_key(lm: Any, texts: Sequence[str], specs: Sequence[Any], settings: GenerationSettings,
              batch_size: int = 16) -> dict[str, Any]:
    """The cache key record: checkpoint hash, weight fingerprint, prompt-set hash, generation config."""
    ck = getattr(lm, "checkpoint", None)
    prompts = json.dumps([[t, _image_key(im)] for t, im in zip(texts, specs)], ensure_ascii=False)
    return {"version": CACHE_VERSION, "checkpoint": ck.content_hash() if ck is not None else None,
            "weights": weights_fingerprint(lm.model), "prompts": hashlib.sha256(prompts.encode()).hexdigest(),
            "n": len(texts), "generation": settings.key(batch_size)}


def _cache_path(lm: Any, texts: list[str], specs: list[Any], s: GenerationSettings, batch_size: int,
                cache: bool | str | Path) -> Path | None:
    if cache is False or cache is None:
        return None
    from vlsafe.analysis.placement import offloaded

    if offloaded(lm.model):  # offloaded weights cannot be fingerprinted from memory
        return None
    if _has_hooks(lm.model):  # hooks change outputs invisibly to any weight-based key
        return None
    from vlsafe.analysis.resolve import cache_dir

    root = cache_dir() / "generations" if cache is True else Path(cache)
    key = cache_key(lm, texts, specs, s, batch_size)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return root / f"{digest}.jsonl"


def _read_cache(path: Path, texts: list[str]) -> list[str] | None:
    """The cached responses, or None when absent or not matching (a stale or foreign file is a miss)."""
    if not path.is_file():
        return None
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if len(rows) != len(texts) or any(r.get("prompt") != t for r, t in zip(rows, texts)):
        return None
    return [str(r.get("response", "")) for r in rows]


def _write_cache(path: Path, texts: list[str], specs: list[Any], responses: list[str]) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8") as f:
            for t, im, r in zip(texts, specs, responses):
                image = im if im is None or isinstance(im, str) else _image_key(im)
                f.write(json.dumps({"prompt": t, "image": image, "response": r}, ensure_ascii=False) + "\n")
