"""nnsight 0.8 backend: one trace per batch, block inputs/outputs read in forward order, then `tracer.stop()`.

Text models are wrapped as `nnsight.LanguageModel(model, tokenizer=tok)`; LVLMs (which LanguageModel does not
list for text generation) with the generic `nnsight.NNsight(model)`. Either way the wrapped model is the
caller's own (nnsight adds no weights and leaves the modules in place).

**Remote (NDIF).** `capture(..., backend="nnsight", remote=True)` runs every batch's trace on the NDIF servers
(`trace(..., remote=True)`): the trace body is serialised, run next to the server's copy of the model, and the
gathered activations come back (the body saves its result dict, so nothing else travels). The model is named
by its Hugging Face hub id (`remote_model="org/name"`, else the checkpoint spec or `config._name_or_path` when
they look like one); the API key is read from `NDIF_API_KEY` (or a key saved with
`nnsight.CONFIG.set_default_api_key`). `remote_lm(hub_id)` gives a weightless model (config and tokenizer
only) to capture from, so a 70B model never has to fit here. `remote="local"` is nnsight's serverless dry
run: the trace is serialised and deserialised exactly as for NDIF, with vlsafe's own modules hidden, and run
here — the check that a remote run will work, with no network and no key. Remote runs are text-only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes import models as M
from vlsafe.probes.backends import Gather, HookRequest, by_layer, first

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ATTR = "_vlsafe_nnsight"  # a wrapper built by `remote_lm`, kept on its module


def wrap(lm: Any) -> Any:
    """The nnsight wrapper for `lm` (LanguageModel for text models, NNsight for LVLMs)."""
    built = getattr(lm.model, _ATTR, None)
    if built is not None:
        return built
    import nnsight  # wraps the in-memory module and tokenizer: nothing is fetched from the Hub

    if M.is_lvlm(lm):
        return nnsight.NNsight(lm.model)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nnsight.LanguageModel(lm.model, tokenizer=lm.tokenizer)


# ---- remote ------------------------------------------------------------------------------------------------------
def check_remote(remote: Any) -> bool | str:
    """`False`, `True` (the configured NDIF host), `"local"` (dry run) or an `http(s)://` host URL."""
    if remote is None or remote is False:
        return False
    if remote is True or remote == "local" or isinstance(remote, str) and remote.startswith(("http://", "https://")):
        return remote
    if isinstance(remote, str) and remote.lower() in ("true", "ndif", "1", "yes"):
        return True
    raise VlsafeError(f"remote={remote!r} not understood (use True for NDIF, 'local' for a dry run, or a host URL)")


def api_key() -> str:
    """The NDIF API key from `NDIF_API_KEY` (else nnsight's saved config), installed where nnsight reads it."""
    from nnsight import CONFIG

    key = os.environ.get("NDIF_API_KEY", "").strip() or (CONFIG.API.APIKEY or "").strip()
    if not key:
        raise VlsafeError("remote nnsight capture needs an NDIF API key: export NDIF_API_KEY=<key> (from "
                          "https://login.ndif.us), or use remote='local' for an offline dry run")
    CONFIG.API.APIKEY = key
    return key


def is_hub_id(spec: Any) -> bool:
    """`org/name` that is not an existing local path."""
    return isinstance(spec, str) and bool(_HUB_ID.match(spec)) and not Path(spec).expanduser().exists()


def hub_id(lm: Any, *, remote_model: str | None = None) -> str:
    """The Hugging Face hub id NDIF knows the model by (`remote_model`, else the spec or `_name_or_path`)."""
    if remote_model is not None:
        if not is_hub_id(remote_model):
            raise VlsafeError(f"remote_model {remote_model!r} is not a Hugging Face hub id (org/name)")
        return remote_model
    ckpt = getattr(lm, "checkpoint", None)
    config = getattr(getattr(lm, "model", None), "config", None)
    for cand in (getattr(ckpt, "spec", None), getattr(config, "_name_or_path", None)):
        if is_hub_id(cand):
            return cand
    label = getattr(ckpt, "spec", None) or type(getattr(lm, "model", lm)).__name__
    raise VlsafeError(f"{label}: remote capture needs the model's Hugging Face hub id (NDIF serves hub models); "
                      "pass remote_model='org/name'")


def remote_lm(spec: str) -> Any:
    """A weightless `LoadedModel` (meta-device modules, real tokenizer) for capturing on NDIF.

    Reads the config and tokenizer of `spec` (a hub id, or a local HF dir for a `remote="local"` dry run,
    where nnsight loads the weights itself when the trace runs).
    """
    import warnings

    import nnsight

    from vlsafe.analysis.checkpoints import LoadedModel

    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tok = AutoTokenizer.from_pretrained(str(spec))
            wrapper = nnsight.LanguageModel(str(spec), tokenizer=tok)
        except Exception as e:  # noqa: BLE001 - transformers' pipeline raises bare Exception
            raise VlsafeError(f"{spec}: nnsight cannot build it ({str(e).splitlines()[0][:160]})") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    module = wrapper._module
    setattr(module, _ATTR, wrapper)
    return LoadedModel(module, tok, None, None)


# ---- backend -------------------------------------------------------------------------------------------------------
def _envoy(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


class NnsightBackend:
    """Capture `.input` / `.output` of the blocks and their attention/MLP submodules inside `trace`."""

    name = "nnsight"

    def __init__(self, lm: Any, requests: list[HookRequest], *, remote: Any = False,
                 remote_model: str | None = None):
        self.requests = by_layer(list(requests))
        self.remote = check_remote(remote)
        if self.remote and M.is_lvlm(lm):
            raise VlsafeError("remote nnsight capture supports text models only (LVLMs have no NDIF model key here)")
        if self.remote and self.remote != "local":
            api_key()
        self.wrapper = wrap(lm)
        if self.remote and self.remote != "local":
            self.wrapper.repo_id = hub_id(lm, remote_model=remote_model)
        model = lm.model
        names = {id(m): n for n, m in model.named_modules()}
        ad = M.adapter(model)
        self.paths: dict[int, dict[str, str]] = {}
        for layer in self.requests:
            parts = ad.block(layer)
            self.paths[layer] = {"block": names[id(parts.module)], "attn": names[id(parts.attn)],
                                 "mlp": names[id(parts.mlp)]}

    def run(self, batch: Any, gather: Gather) -> dict[HookRequest, torch.Tensor]:
        import nnsight

        out: dict[HookRequest, torch.Tensor] = {}
        kw = {"remote": self.remote} if self.remote else {}
        with torch.no_grad():
            with self.wrapper.trace(**batch.model_inputs(), use_cache=False, **kw) as tracer:
                for layer, kinds in self.requests.items():
                    p = self.paths[layer]
                    block = _envoy(self.wrapper, p["block"])
                    if "resid_pre" in kinds:
                        out[("resid_pre", layer)] = gather(block.input)
                    if "attn_out" in kinds:
                        out[("attn_out", layer)] = gather(first(_envoy(self.wrapper, p["attn"]).output))
                    if "mlp_out" in kinds:
                        out[("mlp_out", layer)] = gather(first(_envoy(self.wrapper, p["mlp"]).output))
                    if "resid_post" in kinds:
                        out[("resid_post", layer)] = gather(first(block.output))
                nnsight.save(out)  # a remote run returns saved values only
                tracer.stop()
        return out

    def close(self) -> None:
        self.wrapper = None

    def __enter__(self) -> "NnsightBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make(lm: Any, requests: list[HookRequest], *, remote: Any = False,
         remote_model: str | None = None) -> NnsightBackend:
    return NnsightBackend(lm, requests, remote=remote, remote_model=remote_model)
