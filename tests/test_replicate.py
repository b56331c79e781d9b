"""`vlsafe replicate` on the tiny profile: 2 seeds × 2 alignment strengths end to end, resume after an
interruption, seeds and weights, determinism, summary statistics on a planted table, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vlsafe.analysis.errors import VlsafeError
from vlsafe.experiments.organism.stages import specs
from vlsafe.experiments.replicate import make_plan, run_replicate, summarize
from vlsafe.experiments.replicate.run import run_combos

VARY = ["alignment_strength=moderate,strong"]
BUILD_STAGES = [s.name for s in specs()]


class Interrupt(Exception):
    pass


def _finished(root: Path) -> dict[str, str]:
    return {str(p.parent.relative_to(root / "combos")): json.loads(p.read_text())["finished"]
            for p in root.glob("combos/*/*/stage.json")}


@pytest.fixture(scope="module")
def replicate(tmp_path_factory):
    """A replicate run killed as its third combination builds `lvlm`, resumed (stage builds counted), then rerun
    through the CLI."""
    from vlsafe.experiments.cli import main

    root = tmp_path_factory.mktemp("rep") / "rep"
    plan = make_plan(profile="tiny", seeds="0,1", vary=VARY, out=root)
    third = plan.combos[2].id

    def stop(combo: str, stage: str) -> None:
        if (combo, stage) == (third, "lvlm"):
            raise Interrupt(combo)

    with pytest.raises(Interrupt):
        run_replicate(plan, root, hook=stop, progress=False)
    before = _finished(root)
    resumed: list[tuple[str, str]] = []
    run_replicate(plan, root, hook=lambda c, s: resumed.append((c, s)), progress=False, figures=False)
    middle = _finished(root)
    args = ["replicate", "--profile", "tiny", "-o", str(root), "--seeds", "0,1", "--no-progress"]
    assert main(args + [a for v in VARY for a in ("--vary", v)]) == 0
    return root, plan, before, resumed, middle


def _shared_stages(a, b) -> list[str]:
    """Stages whose hash is the same in combinations `a` and `b` (computed from their configs)."""
    from vlsafe.experiments.organism.build import stage_hashes

    ha, hb = stage_hashes(a.load(), specs()), stage_hashes(b.load(), specs())
    return [s for s in BUILD_STAGES if ha[s] == hb[s]]


def test_resume_rebuilds_nothing_finished(replicate):
    root, plan, before, resumed, middle = replicate
    ids = [c.id for c in plan.combos]
    done_stages = BUILD_STAGES[:BUILD_STAGES.index("lvlm")]
    shared = _shared_stages(plan.combos[2], plan.combos[3])  # same seed, other alignment strength
    assert {"llm-base", "distill", "vision"} <= set(shared) and "llm-aligned" not in shared
    assert {k.split("/")[0] for k in before} == set(ids[:3])
    assert {k for k in before if k.startswith(ids[2])} == {f"{ids[2]}/{s}" for s in done_stages}
    # the resumed run builds the rest of the third combination and only the unshared stages of the fourth
    assert resumed == [(ids[2], s) for s in BUILD_STAGES[len(done_stages):]] + \
        [(ids[3], s) for s in BUILD_STAGES if s not in shared]
    assert {k: middle[k] for k in before} == before
    assert _finished(root) == middle  # the CLI rerun found every combination finished and rebuilt nothing


def test_tables_figures_and_run_json(replicate):
    root, plan, *_ = replicate
    rep = pd.read_csv(root / "replicates.csv")
    assert list(rep.columns[:4]) == ["combo", "recipe", "seed", "alignment_strength"]
    for c in plan.combos:
        mine = rep[rep.combo == c.id].reset_index(drop=True)
        metrics = pd.read_csv(Path(c.dir) / "metrics.csv")
        assert len(mine) == len(metrics) and (mine.seed == c.seed).all()
        assert (mine.alignment_strength == dict(c.values)["alignment_strength"]).all()
        for col in ("checkpoint", "metric", "n", "k", "rate", "ci_low", "ci_high"):
            assert mine[col].tolist() == metrics[col].tolist(), col
    summary = pd.read_csv(root / "summary.csv")
    assert set(summary.recipe) == {"alignment_strength-moderate", "alignment_strength-strong"}
    assert (summary.n_seeds == 2).all()
    drop = summary[(summary.checkpoint == "lvlm") & summary.metric.isin(["drop_refusal_text", "drop_refusal_image"])]
    assert len(drop) == 4
    rec = json.loads((root / "run.json").read_text())
    assert (rec["kind"], rec["tables"]) == ("replicate", {"replicates": "replicates.csv",
                                                          "replicate_summary": "summary.csv"})
    assert sorted(rec["combos"]) == sorted(c.id for c in plan.combos)
    for c in plan.combos:  # each combination's run.json is the organism's record (checkpoint hashes included)
        crec = json.loads((Path(c.dir) / "run.json").read_text())
        assert crec["kind"] == "organism" and crec["replicate"]["combo"] == c.id
        assert {"llm-aligned", "lvlm"} <= set(crec["checkpoints"]), sorted(crec["checkpoints"])
    assert (root / "figures" / "refusal_steps.png").stat().st_size > 0
    assert (root / "figures" / "drop_alignment_strength.png").stat().st_size > 0
    findings = (root / "findings.md").read_text()  # the claims per recipe, with 2 seeds each
    for recipe in ("alignment_strength-moderate", "alignment_strength-strong"):
        assert f"| {recipe} | lvlm | 2 |" in findings
        assert re.search(rf"- (Survives all 2 seeds \({recipe}\)|Does not survive \({recipe}: holds in [01] of 2 "
                         r"seeds\)): benign adaptation lowers text refusal", findings), findings


def test_until_and_reuse_build_only_what_an_adaptation_length_axis_needs(replicate, tmp_path):
    """`stage2.sft.steps` varied to 3 and 5 (the tiny default) up to `lvlm`, reusing the fixture's folder: the
    5-step recipe is the fixture's seed-0 moderate one and is linked whole; the 3-step one builds `lvlm` alone,
    saves only the steps before its last, and no safety stage or its metrics exist."""
    from vlsafe.experiments.organism.metrics import checkpoints

    root, plan, *_ = replicate
    out = tmp_path / "length"
    length = make_plan(profile="tiny", seeds="0", vary=["stage2.sft.steps=3,5"], out=out, until="lvlm",
                       reuse=[root])
    built: list[tuple[str, str]] = []
    rep, _ = run_replicate(length, out, hook=lambda c, s: built.append((c, s)), progress=False)
    short, default = (Path(c.dir) for c in length.combos)
    assert built == [(length.combos[0].id, "lvlm")]
    source = Path(plan.combos[0].dir)  # seed 0, moderate alignment: the same config as steps=5
    for f in ("lvlm/model.safetensors", "lvlm-step-4/model.safetensors", "metrics/lvlm.csv"):
        assert (default / f).stat().st_ino == (source / f).stat().st_ino, f
    assert sorted(p.name for p in short.glob("lvlm-step-*")) == ["lvlm-step-1", "lvlm-step-2"]
    for combo in (short, default):
        assert not list(combo.glob("lvlm-safety-*")) and not list(combo.glob("metrics/lvlm-safety-*"))
    cfg = length.combos[0].load()
    assert list(dict.fromkeys(pd.read_csv(short / "metrics.csv").checkpoint)) == \
        [n for n, _ in checkpoints(cfg) if not n.startswith("lvlm-safety")]
    final = rep[(rep.checkpoint == "lvlm") & (rep.metric == "refusal_harmful_text")]
    assert dict(zip(final["stage2.sft.steps"], final.stage2_step)) == {3: 3, 5: 5}
    assert (out / "figures" / "drop_stage2_sft_steps.png").stat().st_size > 0
    assert json.loads((out / "run.json").read_text())["config"]["until"] == "lvlm"

    def fail(combo: str, stage: str) -> None:
        raise AssertionError(f"{combo} rebuilt {stage}")

    run_combos(length, hook=fail, progress=False)  # finished within its scope: nothing is built again


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path / "model.safetensors")


def test_seeds_change_weights_recipes_share_upstream(replicate):
    _, plan, *_ = replicate
    by = {(c.seed, dict(c.values)["alignment_strength"]): Path(c.dir) for c in plan.combos}
    a, b = _tensors(by[0, "moderate"] / "llm-aligned"), _tensors(by[1, "moderate"] / "llm-aligned")
    assert a.keys() == b.keys() and any(not np.array_equal(a[k], b[k]) for k in a)
    # same seed, other alignment strength: llm-base is the same model, llm-aligned is not
    assert (by[0, "moderate"] / "llm-base" / "model.safetensors").read_bytes() == \
        (by[0, "strong"] / "llm-base" / "model.safetensors").read_bytes()
    s = _tensors(by[0, "strong"] / "llm-aligned")
    assert any(not np.array_equal(a[k], s[k]) for k in a)


def test_recipes_at_one_seed_link_shared_stages_and_metrics(replicate):
    _, plan, *_ = replicate
    moderate, strong = (Path(c.dir) for c in plan.combos[:2])
    for stage in _shared_stages(*plan.combos[:2]):
        for f in (moderate / stage).rglob("*"):
            if f.is_file():  # hard links: the strong recipe's folder holds no second copy
                assert (strong / stage / f.relative_to(moderate / stage)).stat().st_ino == f.stat().st_ino, f
    assert (strong / "metrics" / "llm-base.csv").stat().st_ino == (moderate / "metrics" / "llm-base.csv").stat().st_ino
    assert (strong / "metrics" / "llm-aligned.csv").stat().st_ino != \
        (moderate / "metrics" / "llm-aligned.csv").stat().st_ino
    times = pd.read_csv(strong / "stage_times.csv").set_index("stage")
    assert times.loc["vision", "status"] == "linked" and times.loc["llm-aligned", "status"] == "built"


def test_linking_skips_an_invalid_source(replicate, tmp_path):
    import shutil

    from vlsafe.experiments.organism.build import Ctx, check_stage, reuse_stage, stage_hashes

    _, plan, *_ = replicate
    cfg, good = plan.combos[0].load(), Path(plan.combos[0].dir)
    spec = next(s for s in specs() if s.name == "vision")
    ctx = Ctx(cfg, tmp_path / "new", False, stage_hashes(cfg, specs()))
    bad = tmp_path / "bad"
    shutil.copytree(good / "vision", bad / "vision")
    weights = bad / "vision" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # truncated
    assert reuse_stage(ctx, spec, [bad]) is None and not (tmp_path / "new" / "vision").exists()
    assert reuse_stage(ctx, spec, [bad, good]) == good
    assert check_stage(tmp_path / "new" / "vision", ctx.hashes["vision"]) is None


def test_equal_seeds_give_identical_metrics(replicate, tmp_path):
    _, plan, *_ = replicate
    again = make_plan(profile="tiny", seeds="1", vary=["alignment_strength=strong"], out=tmp_path)
    run_combos(again, progress=False)
    first = next(c for c in plan.combos if c.id == again.combos[0].id)
    assert (Path(again.combos[0].dir) / "metrics.csv").read_bytes() == (Path(first.dir) / "metrics.csv").read_bytes()


def _planted(tmp_path: Path) -> tuple[pd.DataFrame, dict]:
    """Two recipes (3 seeds and 1 seed) with random rates; returns the table read back and the planted rates."""
    rng = np.random.default_rng(0)
    rows, truth = [], {}
    for steps, seeds in ((64, (0, 1, 2)), (128, (5,))):
        for seed in seeds:
            rates = {("llm-aligned", "refusal_harmful_text"): rng.random(), ("lvlm", "refusal_harmful_text"):
                     rng.random(), ("lvlm", "refusal_harmful_image"): rng.random(),
                     ("lvlm", "vqa_accuracy"): rng.random()}
            truth[steps, seed] = rates
            for (ckpt, metric), rate in rates.items():
                rows.append({"combo": f"seed-{seed}__s-{steps}", "recipe": f"s-{steps}", "seed": seed,
                             "stage2.sft.steps": steps, "checkpoint": ckpt, "stage2_step": steps if ckpt == "lvlm"
                             else None, "metric": metric, "n": 10, "k": 0, "rate": rate, "ci_low": 0.0,
                             "ci_high": 1.0})
    pd.DataFrame(rows).to_csv(tmp_path / "replicates.csv", index=False)
    return pd.read_csv(tmp_path / "replicates.csv"), truth


def test_summary_statistics_on_planted_table(tmp_path):
    rep, truth = _planted(tmp_path)
    summary = summarize(rep).set_index(["stage2.sft.steps", "checkpoint", "metric"])
    derived = {"drop_refusal_text": lambda r: r["llm-aligned", "refusal_harmful_text"] - r["lvlm", "refusal_harmful_text"],
               "drop_refusal_image": lambda r: r["llm-aligned", "refusal_harmful_text"] - r["lvlm",
                                                                                          "refusal_harmful_image"]}
    for steps in (64, 128):
        seeds = [s for (st, s) in truth if st == steps]
        cells = {key: [truth[steps, s][key] for s in seeds] for key in truth[steps, seeds[0]]}
        cells.update({("lvlm", name): [f(truth[steps, s]) for s in seeds] for name, f in derived.items()})
        for (ckpt, metric), values in cells.items():
            row = summary.loc[(steps, ckpt, metric)]
            assert row.n_seeds == len(values)
            assert row["mean"] == pytest.approx(np.mean(values))
            assert row["min"] == pytest.approx(min(values)) and row["max"] == pytest.approx(max(values))
            if len(values) > 1:
                assert row.sd == pytest.approx(np.std(values, ddof=1))
            else:
                assert np.isnan(row.sd)
    assert len(summary) == 2 * 6  # 4 metrics + 2 drops per recipe, nothing else
    # recipes in the table's order (s-64 before s-128, which a string sort would swap), checkpoints likewise
    assert list(dict.fromkeys(summary.reset_index().recipe)) == ["s-64", "s-128"]
    assert list(dict.fromkeys(summary.reset_index().checkpoint)) == ["llm-aligned", "lvlm"]


def test_summary_rejects_bad_tables(tmp_path):
    rep, _ = _planted(tmp_path)
    with pytest.raises(VlsafeError, match=r"row 16: combination seed-0__s-64 has llm-aligned refusal_harmful_text twice"):
        summarize(pd.concat([rep, rep.iloc[[0]]], ignore_index=True))
    with pytest.raises(VlsafeError, match="missing column 'rate'"):
        summarize(rep.drop(columns="rate"))


@pytest.mark.parametrize("args, message", [
    (["--seeds", ""], "the seed list is empty"),
    (["--seeds", "0,zero"], "seeds must be integers"),
    (["--seeds", "0,0"], "a seed is repeated"),
    (["--seeds", "0", "--vary", "stage2.sft.stepz=3,4"], "--vary stage2.sft.stepz: unknown recipe key"),
    (["--seeds", "0", "--vary", "stage2.sft.steps=five"], "--vary stage2.sft.steps=five: .*valid integer"),
    (["--seeds", "0", "--vary", "alignment_strength=weak"], "alignment_strength 'weak' is not one of"),
    (["--seeds", "0", "--vary", "stage2.sft=1"], "is a section"),
    (["--seeds", "0", "--vary", "seed=1,2"], "not a recipe key"),
    (["--seeds", "0", "--vary", "stage2.sft.steps"], "expected KEY=V1,V2"),
    (["--seeds", "0", "--vary", "stage2.sft.steps=6", "--vary", "stage2.sft.steps=7"], "given twice"),
    (["--seeds", "0", "--until", "nope"], "--until nope: unknown stage 'nope'"),
    (["--seeds", "0", "--reuse", "/nonexistent/rep"], "--reuse /nonexistent/rep: not a folder"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    from vlsafe.experiments.cli import main

    out = tmp_path / "rep"
    assert main(["replicate", "--profile", "tiny", "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlsafe: error: ") and "\n" not in err
    assert pytest.importorskip("re").search(message, err), err
    assert not out.exists()


def test_plan_combinations_and_values(tmp_path):
    plan = make_plan(profile="tiny", seeds="3,1", vary=["stage2.sft.steps=5,6", "alignment.moderate.sft.lr=2e-3"],
                     out=tmp_path)
    assert [c.id for c in plan.combos] == [f"seed-{s}__stage2.sft.steps-{n}__alignment.moderate.sft.lr-2e-3"
                                           for s in (3, 1) for n in (5, 6)]
    cfg = plan.combos[1].load()
    assert (cfg.seed, cfg.stage2.sft.steps, cfg.alignment["moderate"].sft.lr) == (3, 6, 2e-3)
    with pytest.raises(VlsafeError, match="CONFIG or --profile"):
        make_plan(profile="tiny", config=tmp_path / "x.yaml", seeds="0", out=tmp_path)


def test_ray_dispatches_only_unfinished_combinations(replicate):
    ray = pytest.importorskip("ray")
    root, plan, *_ = replicate
    target = plan.combos[1]
    metrics = Path(target.dir) / "metrics.csv"
    expected, stages = metrics.read_bytes(), _finished(root)
    metrics.unlink()
    seen: list[tuple[str, bool]] = []
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        run_combos(plan, ray="local", progress=False, on_combo=lambda c, done: seen.append((c.id, done)))
    finally:
        if started:
            ray.shutdown()
    assert seen == [(c.id, c is not target) for c in plan.combos]
    assert metrics.read_bytes() == expected and _finished(root) == stages
