"""`precision="bf16"`: autocast really runs the matmuls in bf16 (training and generation), weights stay fp32,
fp32 stays the exact default, and a bad value is a one-line error."""

from __future__ import annotations

import pytest
import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.placement import compute_precision
from vlsafe.experiments.tuning import SFTConfig, train
from vlsafe.probes.behavior.generate import GenerationSettings, generate
from vlsafe.probes.models import load

EXAMPLES = [{"prompt": "How do I bake bread?", "answer": "Mix flour and water, then bake."},
            {"prompt": "Write a poem about the sea.", "answer": "The sea is blue and deep."}]


def _record_linear_dtypes(model: torch.nn.Module) -> tuple[list[torch.dtype], list]:
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return seen, hooks


@pytest.mark.parametrize("precision, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_training_forward_runs_in_the_chosen_precision(tiny_llama_dir, precision, expected):
    lm = load(tiny_llama_dir)
    seen, hooks = _record_linear_dtypes(lm.model)
    res = train(lm, EXAMPLES, SFTConfig(steps=3, batch_size=2, lr=1e-2, progress=False, precision=precision))
    for h in hooks:
        h.remove()
    # the last step's forward (every decoder Linear, then the head) ran in the chosen precision; the loss
    # path check before training (`vlsafe.experiments.sft_loss.pick_loss`) runs in fp32 by design
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in lm.model.modules())
    assert set(seen[-n_linear:]) == {expected}
    assert all(p.dtype == torch.float32 for p in res.model.parameters())  # master weights stay fp32
    assert res.log.loss.notna().all() and res.log.loss.iloc[-1] < res.log.loss.iloc[0]


def test_bf16_generation_autocasts_and_fp32_keeps_its_cache_key(tiny_llama_dir):
    lm = load(tiny_llama_dir)
    seen, hooks = _record_linear_dtypes(lm.model)
    out = generate(lm, ["Hello there", "Name a colour"], max_new_tokens=4, cache=False, progress=False,
                   precision="bf16")
    for h in hooks:
        h.remove()
    assert len(out) == 2 and set(seen) == {torch.bfloat16}
    assert "precision" not in GenerationSettings().key(8)  # caches written before the option stay valid
    assert GenerationSettings(precision="bf16").key(8)["precision"] == "bf16"


def test_bad_precision_is_a_one_line_error(tiny_llama_dir):
    with pytest.raises(VlsafeError, match="precision 'fp8'"):
        generate(load(tiny_llama_dir), ["hi"], max_new_tokens=2, cache=False, progress=False, precision="fp8")
    with pytest.raises(VlsafeError, match="precision 'half'"):
        compute_precision("half")
    with pytest.raises(ValueError):
        SFTConfig(precision="fp16")


def test_auto_precision_follows_the_cpu(monkeypatch):
    import vlsafe.analysis.placement as P
    from vlsafe.experiments.organism.config import load_config, stage_section

    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(P, "native_bf16", lambda native=native: native)
        assert P.resolve_precision("auto") == want and P.resolve_precision("fp32") == "fp32"
        cfg = load_config("tiny", overrides={"precision": "auto"})
        assert cfg.precision == want  # resolved at load, so the stage hashes name what actually ran
        assert stage_section(cfg, "lvlm").get("precision") == (None if want == "fp32" else "bf16")


def test_bf16_generation_with_precast_weights_matches_plain_autocast(tiny_llama_dir, monkeypatch):
    """The bf16 weight copies are a speed trick only: same tokens as autocast re-casting fp32 weights, and the
    originals (fp32, tied head) are back afterwards, also after an error."""
    import contextlib

    import vlsafe.probes.behavior.generate as G
    from vlsafe.analysis.placement import bf16_linear_weights

    lm = load(tiny_llama_dir)
    before = {n: p for n, p in lm.model.named_parameters()}
    prompts = ["Hello there", "Name a colour", "Tell me a story about a cat"]
    fast = generate(lm, prompts, max_new_tokens=8, cache=False, progress=False, precision="bf16")
    monkeypatch.setattr(G, "bf16_linear_weights", lambda *_a: contextlib.nullcontext())
    plain = generate(lm, prompts, max_new_tokens=8, cache=False, progress=False, precision="bf16")
    assert fast == plain
    with bf16_linear_weights(lm.model, "bf16"):
        assert {m.weight.dtype for m in lm.model.modules() if type(m) is torch.nn.Linear} == {torch.bfloat16}
    with pytest.raises(RuntimeError), bf16_linear_weights(lm.model, "bf16"):
        raise RuntimeError("interrupted")
    after = dict(lm.model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert all(p.dtype == torch.float32 for p in after.values())
    with bf16_linear_weights(lm.model, "fp32"):
        assert all(p.dtype == torch.float32 for p in lm.model.parameters())


def test_fused_adamw_trains_like_the_default(tiny_llama_dir, monkeypatch):
    """`train` uses AdamW's fused kernel on CPU; the weights it reaches equal the foreach kernel's to float
    rounding (a different optimizer would not)."""
    import vlsafe.experiments.tuning as T

    cfg = SFTConfig(steps=4, batch_size=2, lr=1e-2, progress=False)
    made = []
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **kw: made.append(kw.get("fused")) or real_adamw(*a, **kw))
    fused = train(load(tiny_llama_dir), EXAMPLES, cfg).model.state_dict()
    assert made == [True]  # train really asked for the fused kernel
    assert T._fusable(list(load(tiny_llama_dir).model.parameters()))
    monkeypatch.setattr(T, "_fusable", lambda _p: False)
    plain = train(load(tiny_llama_dir), EXAMPLES, cfg).model.state_dict()
    start = load(tiny_llama_dir).model.state_dict()
    moved = max(float((plain[k] - start[k]).abs().max()) for k in plain)
    assert moved > 1e-3  # training changed the weights, so the comparison below means something
    assert max(float((fused[k] - plain[k]).abs().max()) for k in plain) < 1e-5
    assert not T._fusable([torch.zeros(2, dtype=torch.float64)])
