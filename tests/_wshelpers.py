"""Helpers for the weight-space tests: real-format checkpoint copies with planted changes.

Every helper writes genuine HF directories (config, tokenizer files and safetensors with the source's raw
tensor names), so the code under test reads them exactly as it would read a downloaded checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from vlsafe.analysis.checkpoints import open_checkpoint

Transform = Callable[[str, torch.Tensor], torch.Tensor]


def write_like(src: str | Path, out: str | Path, fn: Transform | None = None, *, shards: int = 1) -> Path:
    """Copy checkpoint `src` to `out`, passing every tensor through `fn(canonical, tensor)`.

    Non-weight files are copied; `shards > 1` writes a sharded checkpoint with an index.
    """
    ckpt = open_checkpoint(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in ckpt.path.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy(f, out / f.name)
    tensors = {raw: (fn(ckpt.raw_to_canonical[raw], t) if fn else t).contiguous()
               for raw, t in ckpt.source.iter_tensors()}
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(out / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def relative_shift(w: torch.Tensor, eps: float, seed: int, orthogonal: bool = False) -> torch.Tensor:
    """W + ε‖W‖·N/‖N‖ (N Gaussian; with `orthogonal`, N ⟂ W so cos(W, W₁) = 1/√(1+ε²) exactly)."""
    g = torch.Generator().manual_seed(seed)
    w64 = w.double()
    n = torch.randn(w.shape, generator=g, dtype=torch.float64)
    if orthogonal:
        n -= (n * w64).sum() / (w64 * w64).sum() * w64
    return (w64 + eps * w64.norm() * n / n.norm()).to(w.dtype)


def shift_one(name: str, eps: float, seed: int = 1) -> Transform:
    """A transform that shifts only tensor `name` by relative ε."""
    return lambda canon, t: relative_shift(t, eps, seed) if canon == name else t


def llava_from_llama(llama_dir: str | Path, out: str | Path, grow: int = 2,
                     fn: Transform | None = None) -> Path:
    """A real tiny LLaVA whose language model holds the Llama's weights (vocabulary grown by `grow` rows).

    The LLaVA is built with `tiny_llava(text_config=...)`, then its LM tensors are replaced by canonical
    name (embedding/head: the Llama's rows first, the new rows random), then `fn` is applied.
    """
    from transformers import LlamaConfig

    from vlsafe.analysis.tiny import tiny_llava

    llama = open_checkpoint(llama_dir)
    cfg = LlamaConfig.from_pretrained(llama_dir, vocab_size=llama.config["vocab_size"] + grow)
    tmp = Path(str(out) + ".raw")
    tiny_llava(tmp, text_config=cfg)

    def transplant(canon: str, t: torch.Tensor) -> torch.Tensor:
        if canon not in llama.infos:
            return t
        src = llama.get_tensor(canon)
        if src.shape != t.shape:
            t = t.clone()
            t[: src.shape[0]] = src
            src = t
        return fn(canon, src) if fn else src

    write_like(tmp, out, transplant)
    shutil.rmtree(tmp)
    return Path(out)


def tiny_gpt_neox(out: str | Path) -> Path:
    """A random GPT-NeoX (an unrelated architecture: `gpt_neox.layers.N.attention.*`) in HF format."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    GPTNeoXForCausalLM(cfg).save_pretrained(out)
    return Path(out)


def load_all(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint by canonical name (for independent expected values in tests)."""
    ckpt = open_checkpoint(path)
    return dict(ckpt.iter_tensors())
