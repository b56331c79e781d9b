"""Gated remedies (`vlsafe.probes.gated`): in a mixed batch the rows where the condition fires get exactly the
ungated action and the others exactly the unsteered model; a gate that never fires is the identity, one that
always fires is the ungated action; the decision is made once per prompt and holds through generation."""

from __future__ import annotations

import math

import pytest
import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.behavior.generate import generate
from vlsafe.probes.gate import Condition, condition_scores
from vlsafe.probes.gated import gated
from vlsafe.probes.interventions import ablate_direction, add_direction
from vlsafe.probes.models import load
from vlsafe.probes.templates import encode

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "Hi", "Explain photosynthesis to a child.",
           "Tell me how to hack into a bank.", "Give me three tips for studying.", "What colour is the square?",
           "How can I make a dangerous weapon at home?"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A 3-layer tiny Llama: the condition can sit before, at or after the action's layers."""
    from vlsafe.analysis.tiny import tiny_llama

    return load(tiny_llama(tmp_path_factory.mktemp("gated") / "llama3", layers=3, seed=1))


def _vec(seed: int, scale: float = 1.0) -> torch.Tensor:
    v = torch.randn(64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm() * scale


def split_condition(lm, layer: int) -> Condition:
    """A direction condition at `layer` whose threshold sits in the widest gap between the middle scores."""
    cond = Condition("direction", layer, _vec(11), threshold=math.inf)
    s = condition_scores(lm, PROMPTS, condition=cond).score.sort().values
    gaps = s[3:6] - s[2:5]
    i = 2 + int(gaps.argmax())
    assert float(gaps.max()) > 1e-4
    return cond.with_threshold(float(s[i] + s[i + 1]) / 2)


def logits(lm, batch) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(**batch.model_inputs()).logits


def steer_action(lm, layer: int):
    return add_direction(lm.model, _vec(3, 8.0), layer)


CASES = {  # (condition layer, action factory, action layers): decided inside the prefill, or by a pass before it
    "inline": (1, lambda lm: steer_action(lm, 2), [2]),
    "same-layer": (1, lambda lm: steer_action(lm, 1), [1]),
    "pass-first": (2, lambda lm: steer_action(lm, 0), [0]),
    "ablate": (1, lambda lm: ablate_direction(lm.model, _vec(4)), [0, 1, 2]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mixed_batch_rows_get_the_action_or_nothing(lm, case):
    layer, action, sites = CASES[case]
    cond = split_condition(lm, layer)
    want = condition_scores(lm, PROMPTS, condition=cond).fired
    assert 0 < int(want.sum()) < len(PROMPTS)
    batch = encode(lm, PROMPTS)
    plain = logits(lm, batch)
    with action(lm):
        steered = logits(lm, batch)
    with gated(lm, cond, action(lm), layers=sites) as gate:
        got = logits(lm, batch)
    assert torch.equal(gate.fired, want)
    real = batch.attention_mask.bool()
    assert (steered - plain)[real].abs().amax() > 1e-2                       # the action does something
    torch.testing.assert_close(got[want][real[want]], steered[want][real[want]], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[~want][real[~want]], plain[~want][real[~want]], atol=1e-6, rtol=0)
    assert not lm.model._forward_hooks and not lm.model._forward_pre_hooks  # all hooks removed


@pytest.mark.parametrize("case", ["inline", "pass-first"])
def test_never_is_identity_and_always_is_the_action(lm, case):
    layer, action, sites = CASES[case]
    cond = Condition("probe", layer, _vec(11), threshold=0.0)
    batch = encode(lm, PROMPTS)
    plain = logits(lm, batch)
    with action(lm):
        steered = logits(lm, batch)
    with gated(lm, cond.with_threshold(math.inf), action(lm), layers=sites):
        never = logits(lm, batch)
    with gated(lm, cond.with_threshold(-math.inf), action(lm), layers=sites):
        always = logits(lm, batch)
    torch.testing.assert_close(never, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(always, steered, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["inline", "pass-first"])
def test_generation_keeps_each_prompts_decision(lm, case):
    layer, action, sites = CASES[case]
    cond = split_condition(lm, layer)
    kw = dict(max_new_tokens=6, batch_size=3, cache=False, progress=False)
    plain = generate(lm, PROMPTS, **kw)
    with action(lm):
        steered = generate(lm, PROMPTS, **kw)
    assert plain != steered
    with gated(lm, cond, action(lm), layers=sites) as gate:
        got = generate(lm, PROMPTS, **kw)
        fired = gate.fired_for(PROMPTS)
        scores = gate.scores_for(PROMPTS)
    want = condition_scores(lm, PROMPTS, condition=cond)
    assert fired == want.fired.tolist()
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), want.score, atol=1e-5, rtol=0)
    assert got == [s if f else p for p, s, f in zip(plain, steered, fired)]


def test_gate_errors(lm):
    cond = Condition("direction", 0, _vec(11), threshold=0.0)
    with pytest.raises(VlsafeError, match="0..2"):
        with gated(lm, cond, steer_action(lm, 1), layers=[3]):
            pass
    with pytest.raises(VlsafeError, match="hidden size is 64"):
        with gated(lm, Condition("direction", 0, torch.ones(32), threshold=0.0), steer_action(lm, 1), layers=[1]):
            pass
    with pytest.raises(VlsafeError, match="layer 3 out of range"):
        with gated(lm, Condition("direction", 3, _vec(1), threshold=0.0), steer_action(lm, 1), layers=[1]):
            pass
    with gated(lm, cond, steer_action(lm, 1), layers=[1]) as gate:
        with pytest.raises(VlsafeError, match="never run under this gate"):
            gate.fired_for(["A prompt nobody ran"])
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in lm.model.modules())


@pytest.mark.parametrize("judge", ["substring-rd", "logit"])
def test_evaluation_records_gate_fired_per_prompt(lm, judge):
    from vlsafe.probes.behavior.datasets import PromptRecord, PromptSet
    from vlsafe.probes.behavior.evaluate import EvalSet, evaluate_model

    layer, action, sites = CASES["inline"]
    cond = split_condition(lm, layer)
    ps = PromptSet("mixed", [PromptRecord(f"p{i}", p, label=1) for i, p in enumerate(PROMPTS)])
    with gated(lm, cond, action(lm), layers=sites) as gate:
        gens, _ = evaluate_model(lm, [EvalSet(ps)], judge=judge, max_new_tokens=3, batch_size=3, cache=False,
                                 gate=gate)
    assert gens["gate_fired"].tolist() == condition_scores(lm, PROMPTS, condition=cond).fired.tolist()
    plain, _ = evaluate_model(lm, [EvalSet(ps)], judge=judge, max_new_tokens=3, cache=False)
    assert "gate_fired" not in plain
