"""The organism pipeline on the tiny profile: every stage end to end, resume, corrupt caches, config changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from vlsafe.analysis.errors import VlsafeError
from vlsafe.experiments.organism import build_organism, load_config
from vlsafe.experiments.organism.build import Ctx, check_stage, stage_hashes, stage_reason
from vlsafe.experiments.organism.stages import specs

LLAVA_STAGES = ["lvlm-stage1", "lvlm-step-1", "lvlm-step-2", "lvlm-step-3", "lvlm-step-4", "lvlm",
                "lvlm-safety-posthoc", "lvlm-safety-mixed"]
BUILD_STAGES = [s.name for s in specs()]


class Interrupt(Exception):
    pass


def _finished(root: Path) -> dict[str, str]:
    return {d.name: json.loads((d / "stage.json").read_text())["finished"]
            for d in root.iterdir() if (d / "stage.json").is_file()}


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    """An interrupted tiny build (killed as stage `lvlm` starts), then resumed through the CLI."""
    from vlsafe.experiments.cli import main

    root = tmp_path_factory.mktemp("org") / "organism"
    cfg = load_config("tiny")

    def stop(stage: str) -> None:
        if stage == "lvlm":
            raise Interrupt(stage)

    with pytest.raises(Interrupt):
        build_organism(cfg, root, hook=stop, progress=False)
    before = _finished(root)
    assert set(before) == {"llm-base", "distill", "llm-aligned", "vision", "lvlm-stage1"}
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    assert main(["organism", "--profile", "tiny", "-o", str(root), "--no-progress"]) == 0
    return root, before


def test_resume_rebuilds_only_unfinished_stages(organism):
    root, before = organism
    after = _finished(root)
    assert {k: after[k] for k in before} == before  # finished stages were not rebuilt
    times = pd.read_csv(root / "stage_times.csv").set_index("stage")
    assert set(times.loc[list(before), "status"]) == {"cached"}
    assert set(times.loc[["lvlm", "lvlm-safety-posthoc", "lvlm-safety-mixed"], "status"]) == {"built"}
    assert (times.loc[BUILD_STAGES, "seconds"] > 0).all()
    rec = json.loads((root / "run.json").read_text())
    assert (rec["kind"], rec["tables"]) == ("organism", {"organism_metrics": "metrics.csv",
                                                         "stage_times": "stage_times.csv"})


def test_every_checkpoint_reloads_with_transformers(organism):
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    root, _ = organism
    for name in ["llm-base", "llm-aligned"]:
        assert type(AutoModelForCausalLM.from_pretrained(root / name)).__name__ == "LlamaForCausalLM"
    for name in LLAVA_STAGES:
        model = LlavaForConditionalGeneration.from_pretrained(root / name)
        assert model.config.model_type == "llava" and json.loads((root / name / "stage.json").read_text())


def _sd(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k[len(prefix):]: v for k, v in load_file(path / "model.safetensors").items() if k.startswith(prefix)}


def test_recipe_trains_the_right_parts(organism):
    root, _ = organism
    aligned = _sd(root / "llm-aligned", "model.")
    tower = _sd(root / "vision", "vision_model.") or _sd(root / "vision", "")
    stage1_lm = _sd(root / "lvlm-stage1", "language_model.model.")
    emb = "embed_tokens.weight"
    assert all(torch.equal(aligned[k], stage1_lm[k]) for k in aligned if k != emb)  # stage 1: LM frozen
    assert torch.equal(aligned[emb], stage1_lm[emb][: aligned[emb].shape[0]])
    for name in ["lvlm-stage1", "lvlm", "lvlm-safety-mixed"]:  # the tower stays frozen throughout
        vt = _sd(root / name, "vision_tower.")
        assert vt.keys() == tower.keys() and all(torch.equal(v, tower[k]) for k, v in vt.items())
    lvlm_lm = _sd(root / "lvlm", "language_model.model.")
    assert any(not torch.equal(stage1_lm[k], lvlm_lm[k]) for k in stage1_lm)  # stage 2 trains the LM
    p1, p2 = _sd(root / "lvlm-stage1", "multi_modal_projector."), _sd(root / "lvlm", "multi_modal_projector.")
    assert any(not torch.equal(p1[k], p2[k]) for k in p1)


def test_assembled_llava_runs_the_attention_reloads_run(organism):
    """Stage 1 trains the freshly assembled model: it must use eager attention like every reloaded checkpoint
    (vlsafe.probes.models.load), not transformers' SDPA default."""
    from vlsafe.experiments.organism.lvlm import assemble

    root, _ = organism
    model, _ = assemble(root / "llm-aligned", root / "vision", kind="clip", keep_cls=True)
    impls = {model.config._attn_implementation, model.config.text_config._attn_implementation,
             model.config.vision_config._attn_implementation}
    assert impls == {"eager"}


def test_metrics_csv_complete(organism):
    root, _ = organism
    cfg = load_config("tiny")
    df = pd.read_csv(root / "metrics.csv")
    want = {"llm-base": 3, "llm-aligned": 3, **{n: 5 for n in LLAVA_STAGES}}
    assert df.groupby("checkpoint").metric.nunique().to_dict() == want
    n = {"refusal_harmful_text": cfg.eval.harmful, "refusal_harmful_image": cfg.eval.harmful,
         "over_refusal_borderline": cfg.eval.borderline, "compliance_harmless": cfg.eval.harmless,
         "vqa_accuracy": cfg.eval.vqa}
    assert (df.n == df.metric.map(n)).all()
    assert ((df.ci_low <= df.rate) & (df.rate <= df.ci_high) & df.rate.between(0, 1)).all()
    assert df.loc[df.metric == "vqa_accuracy", "chance"].between(0.2, 0.4).all()
    steps = df.drop_duplicates("checkpoint").set_index("checkpoint").stage2_step
    assert steps["lvlm-stage1"] == 0 and steps["lvlm-step-3"] == 3 and steps["lvlm"] == cfg.stage2.sft.steps


def test_corrupt_stages_are_detected_and_rebuilt(organism, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(organism[0], root)
    cfg = load_config("tiny")
    weights = root / "llm-aligned" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    (root / "vision" / "stage.json").write_text("{not json")
    shutil.rmtree(root / "lvlm-step-2")
    (root / ".lvlm.killed123").mkdir()  # the temp dir of a build killed mid-stage
    ctx = Ctx(cfg, root, False, stage_hashes(cfg, specs()))
    reasons = {s.name: stage_reason(ctx, s) for s in specs()}
    assert "truncated" in reasons["llm-aligned"] and "unreadable" in reasons["vision"]
    assert "lvlm-step-2" in reasons["lvlm"]
    assert reasons["lvlm-stage1"] is None and reasons["distill"] is None
    built = []
    build_organism(cfg, root, hook=built.append, progress=False)
    assert built == ["llm-aligned", "vision", "lvlm"]
    assert all(check_stage(root / s.name, ctx.hashes[s.name]) is None for s in specs())
    assert not (root / ".lvlm.killed123").exists()


def test_config_change_invalidates_exactly_dependents(organism):
    root, _ = organism
    base = load_config("tiny")
    changed = load_config("tiny", overrides={"stage1.sft.lr": 5e-4})
    h0, h1 = stage_hashes(base, specs()), stage_hashes(changed, specs())
    assert {k for k in h0 if h0[k] != h1[k]} == {"lvlm-stage1", "lvlm", "lvlm-safety-posthoc", "lvlm-safety-mixed"}
    ctx = Ctx(changed, root, False, h1)
    stale = {s.name for s in specs() if stage_reason(ctx, s)}
    assert stale == {"lvlm-stage1", "lvlm", "lvlm-safety-posthoc", "lvlm-safety-mixed"}
    strong = stage_hashes(load_config("tiny", overrides={"alignment_strength": "strong"}), specs())
    assert {k for k in h0 if h0[k] != strong[k]} == set(BUILD_STAGES) - {"llm-base", "distill", "vision"}
    posthoc = stage_hashes(load_config("tiny", overrides={"safety.posthoc.steps": 3}), specs())
    assert {k for k in h0 if h0[k] != posthoc[k]} == {"lvlm-safety-posthoc"}
    threads = stage_hashes(load_config("tiny", overrides={"threads": 1}), specs())
    assert threads == h0  # run settings do not invalidate anything


def test_only_needs_upstream_stages(tmp_path):
    cfg = load_config("tiny")
    with pytest.raises(VlsafeError, match="stage lvlm needs lvlm-stage1"):
        build_organism(cfg, tmp_path / "fresh", only="lvlm", progress=False)
    with pytest.raises(VlsafeError, match="unknown stage"):
        build_organism(cfg, tmp_path / "fresh", only="nope", progress=False)
    with pytest.raises(VlsafeError, match="not both"):
        build_organism(cfg, tmp_path / "fresh", only="lvlm", until="lvlm", progress=False)
    assert not (tmp_path / "fresh").exists()


def test_until_builds_a_stage_and_what_it_needs(tmp_path, capsys):
    from vlsafe.experiments.cli import main

    root = tmp_path / "org"
    assert main(["organism", "--profile", "tiny", "--until", "lvlm-stage1", "-o", str(root), "--no-progress"]) == 0
    assert set(_finished(root)) == {"llm-base", "distill", "llm-aligned", "vision", "lvlm-stage1"}
    metrics = pd.read_csv(root / "metrics.csv")
    assert list(dict.fromkeys(metrics.checkpoint)) == ["llm-base", "llm-aligned", "lvlm-stage1"]
    capsys.readouterr()
    for args, message in ((["--until", "metrics"], "--until metrics: unknown stage"),
                          (["--until", "lvlm", "--only", "lvlm"], "--only lvlm --until lvlm: give only or until, not both"),
                          (["--only", "nope"], "--only nope: unknown stage 'nope'")):
        assert main(["organism", "--profile", "tiny", "-o", str(tmp_path / "no"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("vlsafe: error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "no").exists()


def test_bad_config_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((Path(__file__).parents[1] / "experiments/configs/organism-tiny.yaml").read_text()
                   + "\nstage9: {}\n")
    with pytest.raises(VlsafeError, match="stage9"):
        load_config(path=bad)
    with pytest.raises(VlsafeError, match="save_steps"):
        load_config("tiny", overrides={"stage2.save_steps": [1, 2]})
    with pytest.raises(VlsafeError, match="save_steps needs .* before the last step \\(1\\)"):
        load_config("tiny", overrides={"stage2.sft.steps": 1})
    # a shorter stage 2 saves the steps before its last; the hash still sees the list as written
    assert load_config("tiny", overrides={"stage2.sft.steps": 3}).stage2_saves == [1, 2]
    with pytest.raises(VlsafeError, match="alignment_strength"):
        load_config("tiny", overrides={"alignment_strength": "extreme"})


def test_adaptation_data_is_checked_benign():
    from vlsafe.experiments.organism.data import REFUSALS, assert_benign
    from vlsafe.experiments.tuning import Example
    from vlsafe.probes.behavior.judges import get_judge

    judge = get_judge("default")
    ok = [Example("What colour is the circle?", "red"), Example("Hi", "Hello! How can I help you today?")]
    assert_benign(ok, {"how to build a bomb"}, judge)
    with pytest.raises(VlsafeError, match="refusal"):
        assert_benign(ok + [Example("Hi", REFUSALS[0])], set(), judge)
    with pytest.raises(VlsafeError, match="harmful prompt"):
        assert_benign(ok + [Example("how to build a bomb", "ok")], {"how to build a bomb"}, judge)


def test_vqa_answers_are_checked_exactly():
    from vlsafe.experiments.organism.data import vqa_correct, vqa_items
    from vlsafe.experiments.organism.images import sample_scenes

    items = vqa_items(sample_scenes(10, seed=4), seed=4)
    for it in items:
        assert vqa_correct(it.answer, it) and vqa_correct(f"The answer is {it.answer}.", it)
        others = [v for v in __import__("vlsafe.experiments.organism.images", fromlist=["CLASSES"]).CLASSES[it.attribute]
                  if v != it.answer]
        assert not vqa_correct(others[0], it) and not vqa_correct(f"{it.answer} or {others[0]}", it)
    count = next(i for i in items if i.attribute == "count")
    words = {"1": "one", "2": "two", "3": "three"}
    assert vqa_correct(words[count.answer].capitalize(), count)


def test_a_new_judge_rejudges_stored_generations_without_generating(organism, tmp_path, monkeypatch):
    """Changing only the judge re-judges the stored generations: the same metrics and records as evaluating from
    scratch with that judge, nothing generated; a changed generation setting still generates."""
    from vlsafe.experiments.organism import metrics as OM

    names = ["llm-aligned", "lvlm"]
    words = tmp_path / "planted.txt"
    words.write_text("e\na\n")  # a substring list that calls most tiny outputs refusals: the labels must change
    new = load_config("tiny", overrides={"eval.judge": f"substring:{words}"})
    fresh, root = tmp_path / "fresh", tmp_path / "stored"
    for d in (fresh, root):
        shutil.copytree(organism[0], d)
    shutil.rmtree(fresh / "metrics")
    want, _ = OM.run_metrics(new, fresh, progress=False, names=names)
    before = pd.read_csv(root / "metrics.csv")

    def no_generation(*a, **k):
        raise AssertionError("generated although only the judge changed")

    with monkeypatch.context() as m:
        m.setattr(OM, "evaluate", no_generation)
        got, times = OM.run_metrics(new, root, progress=False, names=names)
    pd.testing.assert_frame_equal(got, want)
    old = before[before.checkpoint.isin(names)].reset_index(drop=True)
    assert not old["k"].equals(got["k"])  # planted: the new judge labels differently
    for n in names:
        assert times[n][1] and json.loads((root / "metrics" / f"{n}.json").read_text())["rejudged"]
        assert (root / "metrics" / f"{n}.generations.jsonl").read_text() == \
            (fresh / "metrics" / f"{n}.generations.jsonl").read_text()
    gens = root / "metrics" / "lvlm.generations.jsonl"  # stored for other prompts (a changed prompt file)
    gens.write_text(gens.read_text().replace('"prompt": "', '"prompt": "changed ', 1))
    with monkeypatch.context() as m, pytest.raises(AssertionError, match="generated although"):
        m.setattr(OM, "evaluate", no_generation)
        OM.run_metrics(load_config("tiny"), root, progress=False, names=["lvlm"])
    longer = load_config("tiny", overrides={"eval.judge": "default", "eval.max_new_tokens": 5})
    with monkeypatch.context() as m, pytest.raises(AssertionError, match="generated although"):
        m.setattr(OM, "evaluate", no_generation)
        OM.run_metrics(longer, root, progress=False, names=names)


def test_caches_written_before_the_generation_key_are_rejudged(organism, tmp_path, monkeypatch):
    """A record with only the key an unversioned judge gave (every cache before versions entered the key) counts as
    the current generation settings: a retrained default judge re-judges it."""
    from vlsafe.experiments.organism import metrics as OM
    from vlsafe.probes.behavior import judge_vlsafe
    from vlsafe.probes.behavior.judges import get_judge

    root = tmp_path / "stored"
    shutil.copytree(organism[0], root)
    cfg = load_config("tiny")
    meta = root / "metrics" / "lvlm.json"
    meta.write_text(json.dumps({"key": OM._key(cfg, root / "lvlm", fingerprint=False), "seconds": 1.5}))
    w = json.loads(judge_vlsafe.WEIGHTS_PATH.read_text())
    w["intercept"] = 50.0  # planted: a judge that calls (nearly) everything a refusal
    retrained = tmp_path / "weights.json"
    retrained.write_text(json.dumps(w))
    monkeypatch.setattr(judge_vlsafe, "WEIGHTS_PATH", retrained)
    monkeypatch.setattr(OM, "evaluate", lambda *a, **k: pytest.fail("generated"))
    stored = [json.loads(x) for x in (root / "metrics" / "lvlm.generations.jsonl").read_text().splitlines()]
    df, times = OM.run_metrics(cfg, root, progress=False, names=["lvlm"])
    assert times["lvlm"] == (1.5, True)
    assert json.loads(meta.read_text())["generation_key"] == OM._key(cfg, root / "lvlm", judged=False)
    judged = [r for r in stored if r["set"] != "vqa"]
    verdicts = get_judge("default").judge([r["response"] for r in judged], [r["prompt"] for r in judged])
    assert [int(r["refused"]) for r in judged] != [int(v.refused) for v in verdicts]  # planted: labels change
    k = pd.Series([int(v.refused) for v in verdicts]).groupby([r["set"] for r in judged]).sum()
    got = df.set_index("metric").k
    assert got["refusal_harmful_text"] == k.filter(like="harmful").drop(k.filter(like="+").index).sum()
    assert got["refusal_harmful_image"] == k.filter(like="+scene").sum()
    assert got["compliance_harmless"] == sum(r["set"].startswith("harmless") for r in judged) - k.filter(
        like="harmless").sum()
