"""Remote activations (nnsight / NDIF) without the network: the API key comes from the environment (a clear
error without it), `trace` is called with `remote=True` and the hub id as model key, and the trace body — run
through nnsight's own serialise/deserialise dry run (`remote="local"`, vlsafe's modules hidden) — returns the
same activations as the local hooks backend."""

from __future__ import annotations

import pytest
import torch

from vlsafe.analysis.checkpoints import open_checkpoint
from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.backends import nnsight as NB
from vlsafe.probes.capture import capture

PROMPTS = ["How do I bake bread?", "Write a poem about the sea, please.", "Why?"]
KW = dict(hooks=["resid_pre", "resid_post", "attn_out", "mlp_out"], positions=[-1, "mean"], batch_size=2,
          progress=False)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return open_checkpoint(tiny_llama_dir).load_model()


@pytest.fixture(scope="module")
def reference(llama):
    return capture(llama, PROMPTS, backend="hooks", **KW)


@pytest.fixture
def no_key(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)


def _max_diff(a, b) -> float:
    return max(float((a.get(k, l) - b.get(k, l)).abs().max()) for k, l in a.requests)


def test_missing_key_is_one_line_error_before_any_loading(no_key, llama):
    for lm in (llama, "meta-llama/Llama-3.1-70B"):  # the hub id is never resolved: the key check comes first
        with pytest.raises(VlsafeError, match="NDIF_API_KEY") as err:
            capture(lm, PROMPTS, backend="nnsight", remote=True, **KW)
        assert "\n" not in str(err.value)


def test_remote_needs_nnsight_backend_and_a_hub_id(no_key, monkeypatch, llama):
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    with pytest.raises(VlsafeError, match="backend='nnsight'"):
        capture(llama, PROMPTS, backend="hooks", remote=True, **KW)
    with pytest.raises(VlsafeError, match="hub id"):
        capture(llama, PROMPTS, backend="nnsight", remote=True, **KW)
    with pytest.raises(VlsafeError, match="not a Hugging Face hub id"):
        capture(llama, PROMPTS, backend="nnsight", remote=True, remote_model="no-slash", **KW)
    with pytest.raises(VlsafeError, match="not understood"):
        capture(llama, PROMPTS, backend="nnsight", remote="sometimes", **KW)


def test_trace_is_called_remote_with_key_and_model(no_key, monkeypatch, llama, reference):
    from nnsight import CONFIG
    from nnsight.modeling.mixins.remotable import Remotable

    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    calls = []
    original = Remotable.trace

    def intercept(self, *inputs, remote=False, **kwargs):  # NDIF swapped for nnsight's local dry run
        calls.append((remote, self.repo_id, CONFIG.API.APIKEY))
        return original(self, *inputs, remote="local" if remote is True else remote, **kwargs)

    monkeypatch.setattr(Remotable, "trace", intercept)
    got = capture(llama, PROMPTS, backend="nnsight", remote=True, remote_model="HuggingFaceTB/SmolLM2-135M", **KW)
    assert calls == [(True, "HuggingFaceTB/SmolLM2-135M", "test-key")] * 2  # one trace per batch of 2
    assert got.meta["remote"] is True
    assert _max_diff(reference, got) <= 1e-6


def test_local_dry_run_needs_no_key(no_key, llama, reference):
    got = capture(llama, PROMPTS, backend="nnsight", remote="local", **KW)
    assert _max_diff(reference, got) <= 1e-6


def test_weightless_model_for_remote_capture(tiny_llama_dir, reference):
    lm = NB.remote_lm(str(tiny_llama_dir))
    assert all(p.device.type == "meta" for p in lm.model.parameters())
    assert lm.tokenizer.padding_side == "left"
    got = capture(lm, PROMPTS, backend="nnsight", remote="local", **KW)  # nnsight loads the weights to run
    assert _max_diff(reference, got) <= 1e-5


def test_lvlm_remote_is_refused(no_key, monkeypatch, tiny_llava_dir):
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    lvlm = open_checkpoint(tiny_llava_dir).load_model()
    with pytest.raises(VlsafeError, match="text models only"):
        capture(lvlm, PROMPTS, backend="nnsight", remote="local", **KW)


def test_hub_id_inference():
    assert NB.is_hub_id("meta-llama/Llama-2-7b-chat-hf") and not NB.is_hub_id("default")
    assert not NB.is_hub_id(str(torch.__file__))
