"""`vlsafe tune`: SFT / LoRA / layer-targeted / SPPFT / DPO on tiny models; frozen parts bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from vlsafe.analysis.checkpoints import open_checkpoint
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.tiny import tiny_llama, tiny_llava
from vlsafe.experiments.cli import main
from vlsafe.experiments.tune import TuneConfig, load_tune_config, run_tune
from vlsafe.experiments.tune_data import REFUSALS

PAIRS = [("How do I bake bread?", "Mix flour and water, then bake it."),
         ("Write a poem about the sea.", "The sea is blue and deep."),
         ("Give me three tips for studying.", "Sleep, plan, and review."),
         ("What colour is the square?", "The square is red.")]
FAST = {"steps": 6, "lr": 3e-3, "batch_size": 4, "max_length": 256, "warmup_ratio": 0.0, "answer_tokens": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tune") / "llama4", layers=4)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    p.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in PAIRS))
    return p


def _cfg(model: Path, tmp: Path, **kw) -> TuneConfig:
    d = {"model": str(model), "method": "sft", **FAST, **kw}
    d.setdefault("data", [{"file": "pairs.jsonl"}])
    return TuneConfig.parse(d, "test", base_dir=tmp)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return dict(open_checkpoint(path).iter_tensors())


def _loglik(path: Path) -> float:
    from vlsafe.probes.behavior.helpfulness import answer_loglik
    from vlsafe.probes.models import load

    return float(answer_loglik(load(path), [q for q, _ in PAIRS], [a for _, a in PAIRS]).mean())


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {n for n in a if not torch.equal(a[n], b[n])}


def test_sft_cli_run_learns_and_reloads(llama4: Path, pairs_file: Path, tmp_path: Path) -> None:
    cfg = {"model": str(llama4), "method": "sft", **FAST, "steps": 8,
           "data": [{"file": str(pairs_file)}, {"set": "harmful-train", "limit": 4}]}
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["tune", str(tmp_path / "tune.yaml"), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    out = tmp_path / "out"
    log = pd.read_csv(out / "train_log.csv")
    assert list(log["step"]) == list(range(1, 9))
    assert log["loss"].iloc[-2:].mean() < log["loss"].iloc[:2].mean()
    assert _loglik(out) > _loglik(llama4) + 0.1  # the trained answers became more likely
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert len(examples) == 8
    refusals = [e for e in examples if e["prompt"] not in dict(PAIRS)]
    assert len(refusals) == 4 and all(e["answer"] in REFUSALS for e in refusals)
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "tune" and run["config"]["method"] == "sft"
    assert run["kind"] == "tune" and run["tables"] == {"train_log": "train_log.csv"}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    assert _changed(_tensors(llama4), _tensors(out))


def test_trainable_layers_leave_everything_else_bit_identical(llama4: Path, tmp_path: Path,
                                                               pairs_file: Path) -> None:
    (tmp_path / "pairs.jsonl").write_text(pairs_file.read_text())
    out = run_tune(_cfg(llama4, tmp_path, layers={"trainable": [2]}), tmp_path / "out", progress=False)
    changed = _changed(_tensors(llama4), _tensors(out))
    assert changed and all(n.startswith("model.layers.2.") for n in changed)


def test_sppft_freezes_attention_and_mlp_of_start_to_end_exclusive(llama4: Path, tmp_path: Path,
                                                                     pairs_file: Path) -> None:
    (tmp_path / "pairs.jsonl").write_text(pairs_file.read_text())
    out = run_tune(_cfg(llama4, tmp_path, layers={"sppft": [1, 3]}), tmp_path / "out", progress=False)
    before, after = _tensors(llama4), _tensors(out)
    changed = _changed(before, after)
    frozen = {n for n in before if n.startswith(("model.layers.1.self_attn", "model.layers.1.mlp",
                                                  "model.layers.2.self_attn", "model.layers.2.mlp"))}
    assert len(frozen) == 2 * 7 and not (changed & frozen)
    assert set(before) - frozen - changed == set()  # everything else trained: layers 0 and 3, norms, embeddings
    assert "model.layers.1.input_layernorm.weight" in changed  # SPPFT freezes attention and MLP only
    assert (tmp_path / "out" / "tune.json").is_file()


def test_lora_is_merged_and_respects_frozen_layers(llama4: Path, tmp_path: Path, pairs_file: Path) -> None:
    (tmp_path / "pairs.jsonl").write_text(pairs_file.read_text())
    cfg = _cfg(llama4, tmp_path, method="lora", layers={"frozen": [0, 1]}, lora={"r": 4, "alpha": 8,
                                                                                  "target_modules": ["q_proj", "down_proj"]})
    out = run_tune(cfg, tmp_path / "out", progress=False)
    changed = _changed(_tensors(llama4), _tensors(out))
    assert changed == {f"model.layers.{i}.{m}.weight" for i in (2, 3) for m in ("self_attn.q_proj", "mlp.down_proj")}
    assert not any("lora" in n for n in open_checkpoint(out).infos)


def test_dpo_moves_the_logprob_margin_toward_chosen(llama4: Path, tmp_path: Path) -> None:
    from vlsafe.probes.behavior.helpfulness import answer_loglik
    from vlsafe.probes.models import load

    rows = [{"prompt": q, "chosen": "I'm sorry, but I can't help with that.", "rejected": a} for q, a in PAIRS]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(llama4, tmp_path, method="dpo", data=["prefs.jsonl"], steps=5, lr=1e-3, dpo={"beta": 0.5})
    out = run_tune(cfg, tmp_path / "out", progress=False)

    def margin(path: Path) -> float:
        lm = load(path)
        qs = [r["prompt"] for r in rows]
        return float((answer_loglik(lm, qs, [r["chosen"] for r in rows])
                      - answer_loglik(lm, qs, [r["rejected"] for r in rows])).mean())
    assert margin(out) > margin(llama4) + 0.05
    log = pd.read_csv(out / "train_log.csv")
    assert len(log) == 5 and log["loss"].iloc[-1] < log["loss"].iloc[0]


def test_lvlm_sppft_with_images_keeps_vision_tower(tmp_path: Path) -> None:
    lvlm = tiny_llava(tmp_path / "lvlm")
    rows = [{"prompt": q, "answer": a, "image": "blank"} for q, a in PAIRS[:2]]
    (tmp_path / "img.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(lvlm, tmp_path, data=["img.jsonl"], steps=2, batch_size=2, layers={"sppft": [0, 1]})
    out = run_tune(cfg, tmp_path / "out", progress=False)
    assert open_checkpoint(out).family.is_lvlm
    before, after = _tensors(lvlm), _tensors(out)
    changed = _changed(before, after)
    assert not any(n.startswith(("vision.", "model.layers.0.self_attn", "model.layers.0.mlp")) for n in changed)
    assert any(n.startswith("projector.") for n in changed) and any(n.startswith("model.layers.1.") for n in changed)


def test_mixed_training_uses_both_sources(llama4: Path, tmp_path: Path, pairs_file: Path) -> None:
    from vlsafe.experiments.tune_data import build_examples, collect

    (tmp_path / "pairs.jsonl").write_text(pairs_file.read_text())
    cfg = _cfg(llama4, tmp_path, data=[{"set": "harmful-train", "limit": 3}], mix_with=["pairs.jsonl"])
    rows = collect(cfg.data + cfg.mix_with, cfg.root, dpo=False, seed=0)
    examples, counts = build_examples(rows, None, dpo=False)
    assert counts["examples"] == 7 and sum(e["answer"] in dict(PAIRS).values() for e in examples) == 4


def test_dpo_pairs_from_prompt_sets(llama4: Path, tmp_path: Path) -> None:
    from vlsafe.experiments.tune_data import build_examples, collect
    from vlsafe.probes.models import load

    cfg = _cfg(llama4, tmp_path, method="dpo", data=[{"set": "harmful-train", "limit": 2},
                                                     {"set": "harmless-train", "limit": 2}])
    rows = collect(cfg.data, cfg.root, dpo=True, seed=0)
    examples, counts = build_examples(rows, load(llama4), dpo=True, max_new_tokens=6)
    harmful = {r.prompt for r in rows[:2]}
    assert counts["examples"] + counts["dropped"] == 4 and examples
    for e in examples:
        refusal, own = (e["chosen"], e["rejected"]) if e["prompt"] in harmful else (e["rejected"], e["chosen"])
        assert refusal in REFUSALS and own not in REFUSALS and own.strip()
    # SFT on self-distilled answers: an answer cut by the token limit gets no end-of-turn (complete=False)
    lm = load(llama4)
    sft_rows = collect([cfg.data[1]], cfg.root, dpo=False, seed=0)
    sft, _ = build_examples(sft_rows, lm, dpo=False, max_new_tokens=6)
    for e in sft:
        n = len(lm.tokenizer(e["answer"], add_special_tokens=False)["input_ids"])
        assert e["complete"] == (n < 5)


@pytest.mark.parametrize("patch, message", [
    ({"method": "rlhf"}, "unknown method 'rlhf'.*valid: sft, lora, dpo"),
    ({"learning_rate": 1e-4}, "unknown key 'learning_rate'.*valid:"),
    ({"layers": {"trainable": [4]}}, "layer 4 out of range.*0..3"),
    ({"layers": {"sppft": [2, 9]}}, "end 9 beyond the model's 4 layers"),
    ({"layers": {"sppft": [3, 2]}}, "start < end"),
    ({"layers": {"trainable": [1], "frozen": [2]}}, "exactly one of"),
    ({"layers": {"froze": [1]}}, "unknown key 'layers.froze'.*did you mean 'frozen'"),
    ({"model": "/nonexistent/ckpt"}, "model: "),
    ({"data": [{"set": "harmful-train", "file": "x.jsonl"}]}, "exactly one of 'set'"),
    ({"method": "dpo"}, "no column 'chosen'"),
])
def test_bad_inputs_are_one_line_errors(llama4: Path, tmp_path: Path, pairs_file: Path, patch: dict,
                                        message: str) -> None:
    (tmp_path / "pairs.jsonl").write_text(pairs_file.read_text())
    d = {"model": str(llama4), "method": "sft", "data": ["pairs.jsonl"], **FAST, **patch}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(VlsafeError, match=message) as e:
        run_tune(load_tune_config(tmp_path / "t.yaml"), tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
