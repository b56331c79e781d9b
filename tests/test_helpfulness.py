"""Helpfulness metrics: answer log-likelihood = hand computation, compliance rate, task-accuracy hook."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.probes.behavior.helpfulness import answer_loglik, judged_compliance, reference_answers, task_accuracy
from vlsafe.probes.models import load
from vlsafe.probes.templates import encode

PROMPTS = ["Hi", "Write a poem about the sea and the lazy dog.", "How do I bake bread?"]
ANSWERS = ["Sure, here is a short answer.", "The quick brown fox", "I'm sorry, but I can't help with that request."]


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path):
    return load(str(tiny_llama_dir))


def _by_hand(lm, prompt, answer, image=None):
    """One unpadded forward; mean over answer tokens of log softmax(logits[j-1])[token j], in fp64."""
    enc = encode(lm, [prompt], None if image is None else [image])
    ans = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([enc.input_ids[0].tolist() + ans])
    kw = {} if enc.pixel_values is None else {"pixel_values": enc.pixel_values}
    with torch.no_grad():
        logits = lm.model(input_ids=ids, **kw).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    n0 = ids.shape[1] - len(ans)
    return float(np.mean([logp[j - 1, ids[0, j]].item() for j in range(n0, ids.shape[1])]))


def test_answer_loglik_equals_hand_computation(llama):
    got = answer_loglik(llama, PROMPTS, ANSWERS, batch_size=3)  # one left-padded batch of three lengths
    want = [_by_hand(llama, p, a) for p, a in zip(PROMPTS, ANSWERS)]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert len(set(np.round(want, 4))) == 3  # three different values: order restored, not one row repeated


def test_answer_loglik_lvlm_with_blank_image(tiny_llava_dir):
    from vlsafe.probes.behavior.images import make_image

    lvlm = load(str(tiny_llava_dir))
    got = answer_loglik(lvlm, PROMPTS[:2], ANSWERS[:2], images="blank", batch_size=2)
    want = [_by_hand(lvlm, p, a, make_image("blank")) for p, a in zip(PROMPTS[:2], ANSWERS[:2])]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    text_only = answer_loglik(lvlm, PROMPTS[:2], ANSWERS[:2], batch_size=2)
    assert not np.allclose(got, text_only)  # the image really conditions the answer


def test_own_greedy_answers_are_likelier_than_foreign_ones(llama):
    own = reference_answers(llama, PROMPTS, max_new_tokens=8, cache=False, progress=False)
    foreign = own[1:] + own[:1]
    assert answer_loglik(llama, PROMPTS, own).mean() > answer_loglik(llama, PROMPTS, foreign).mean()


def test_answer_loglik_bad_input(llama):
    with pytest.raises(VlsafeError, match="answers for"):
        answer_loglik(llama, PROMPTS, ANSWERS[:2])
    with pytest.raises(VlsafeError, match="answer 1 is empty"):
        answer_loglik(llama, PROMPTS, [ANSWERS[0], " ", ANSWERS[2]])
    with pytest.raises(VlsafeError, match="text-only"):
        answer_loglik(llama, PROMPTS, ANSWERS, images="blank")


def test_compliance_rate_and_wilson():
    from vlsafe.probes.behavior.metrics import wilson_interval

    responses = ["I'm sorry, but I can't help with that.", "Sure! Preheat the oven to 220 C.",
                 "Here is a poem about the sea: waves roll in."]
    res = judged_compliance(responses, judge="substring-rd")
    assert (res["n"], res["complied"]) == (3, 2)
    assert res["compliance_rate"] == pytest.approx(2 / 3)
    assert (res["ci_low"], res["ci_high"]) == pytest.approx(wilson_interval(2, 3))
    with pytest.raises(VlsafeError):
        judged_compliance([])


def test_task_accuracy_hook():
    from vlsafe.probes.behavior.datasets import PromptRecord
    from vlsafe.probes.behavior.metrics import wilson_interval

    recs = [PromptRecord(f"q{i}", "What colour is the square?", meta={"answer": c})
            for i, c in enumerate(["red", "blue", "green", "red"])]
    responses = ["It is red.", "The square is blue.", "I see a red one.", "Red"]
    res = task_accuracy(recs, responses, lambda rec, resp: rec.meta["answer"] in resp.lower())
    assert (res["n"], res["correct"], res["accuracy"]) == (4, 3, 0.75)
    assert (res["ci_low"], res["ci_high"]) == pytest.approx(wilson_interval(3, 4))
    with pytest.raises(VlsafeError, match="4 records but 3 responses"):
        task_accuracy(recs, responses[:3], lambda rec, resp: True)
