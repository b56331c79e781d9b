"""`-o` folders that would lose or mix data are refused before any work, with one line: an existing file, an input
checkpoint's own folder, and, for the commands that replace their folder whole (gate, export-remedy, safelora,
merge), a folder holding an input or a foreign folder with files in it. Before this, `vlsafe gate CKPT -o CKPT`
deleted the model's weights and exited 0. Also: other bad input found by the CLI audit, one line each."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from test_eval_cli import _error
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.runinfo import check_out_dir
from vlsafe.analysis.tiny import tiny_llama
from vlsafe.experiments.cli import main


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    return tiny_llama(tmp_path / "m", layers=2, seed=3)


def _files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


def test_check_out_dir_rules(tmp_path: Path) -> None:
    (tmp_path / "file.csv").write_text("x\n")
    with pytest.raises(VlsafeError, match="is not a folder"):
        check_out_dir(tmp_path / "file.csv")
    ckpt = tmp_path / "runs" / "ckpt"
    ckpt.mkdir(parents=True)
    for out, replaces in ((ckpt, False), (ckpt, True), (tmp_path / "runs", True)):  # the input, or a folder
        with pytest.raises(VlsafeError, match="is or holds an input"):                # replaced whole holding it
            check_out_dir(out, inputs=[str(ckpt)], replaces=replaces)
    check_out_dir(tmp_path / "runs", inputs=[str(ckpt)], replaces=False)  # files added beside it delete nothing
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(VlsafeError, match="not an earlier vlsafe run folder"):
        check_out_dir(foreign)
    check_out_dir(foreign, replaces=False)                    # commands that only add files may write there
    (foreign / "run.json").write_text("{}")
    check_out_dir(foreign)                                    # an earlier run: replaced, as documented
    check_out_dir(tmp_path / "new", inputs=["default", "org/model-id", None])  # not local paths: nothing to hold
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")


def test_gate_into_its_own_checkpoint_is_refused_and_deletes_nothing(model: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    before = _files(model)
    assert "is or holds an input" in _error(capsys, ["gate", str(model), "--layer", "1", "-o", str(model)])
    assert _files(model) == before


def test_gate_into_a_foreign_folder_is_refused(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert "not an earlier vlsafe run folder" in _error(capsys, ["gate", str(model), "--layer", "1",
                                                                 "-o", str(foreign)])
    assert (foreign / "keep.txt").read_text() == "mine"


def test_export_remedy_into_its_checkpoint_is_refused(model: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    vec = tmp_path / "v.safetensors"
    save_file({"v": torch.tensor(np.ones(64), dtype=torch.float32)}, str(vec))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"kind": "steer", "layers": [1], "alpha": 1.0, "direction": {"file": str(vec)}}))
    before = _files(model)
    assert "is or holds an input" in _error(capsys, ["export-remedy", str(spec), "--checkpoint", str(model),
                                                     "-o", str(model)])
    assert _files(model) == before


@pytest.mark.parametrize("command", ["diff", "probe", "eval", "locate", "organism", "demo"])
def test_out_naming_a_file_is_one_line(command: str, model: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "out.csv"
    target.write_text("x\n")
    argv = {"diff": ["diff", str(model), str(model)], "probe": ["probe", str(model)],
            "eval": ["eval", str(model), "--prompts", "harmful-test"], "locate": ["locate", str(model), str(model)],
            "organism": ["organism", "--profile", "tiny"], "demo": ["demo", "--profile", "tiny"]}[command]
    assert "is not a folder" in _error(capsys, [*argv, "-o", str(target)])
    assert target.read_text() == "x\n"


def test_judge_out_naming_a_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = tmp_path / "r.csv"
    rows.write_text("response\nI'm sorry, I can't help with that.\n")
    assert "is a folder" in _error(capsys, ["judge", str(rows), "--column", "response", "-o", str(tmp_path)])


def test_diff_rejects_a_task_vector_mode_before_writing(model: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert "--tv-mode 'bogus'" in _error(capsys, ["diff", str(model), str(model), "--base", str(model),
                                                  "--tv-mode", "bogus", "-o", str(out)])
    assert not out.exists()


def test_malformed_config_json_is_one_line(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "config.json").write_text('{"model_type": "llama",')
    err = _error(capsys, ["info", str(broken)])
    assert "config.json: not valid JSON" in err and "line 1" in err


def test_counts_below_one_are_refused_up_front(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vlsafe.experiments.sweep_config import validate
    from vlsafe.probes.behavior.datasets import load_prompts

    with pytest.raises(VlsafeError, match="cannot sample -3 prompts"):
        load_prompts("harmful-train").sample(-3)
    for key in ("limit", "batch_size", "max_new_tokens"):
        raw = {"eval": {key: -8}, "grid": [{"name": "a", "method": "checkpoint", "config": str(model)}]}
        with pytest.raises(VlsafeError, match=key):
            validate(raw, "sweep.yaml")
    # the range is checked while the options are parsed, before the (missing) config is even looked at
    assert "Invalid value for '--threads'" in _error(capsys, ["merge", str(tmp_path / "none.yaml"), "-o",
                                                              str(tmp_path / "o"), "--threads", "0"])
    assert "Invalid value" not in _error(capsys, ["merge", str(tmp_path / "none.yaml"), "-o", str(tmp_path / "o"),
                                                  "--threads", "1"])
    assert not (tmp_path / "o").exists()


def test_a_mistyped_var_is_refused(tmp_path: Path) -> None:
    """`--var organsim=…` used to be ignored, so the sweep ran on the YAML's default organism."""
    from vlsafe.experiments.sweep_config import load_sweep
    from vlsafe.experiments.tune import load_tune_config

    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"vars": {"organism": "runs/organism"}, "eval": {"mode": "fast"},
                                   "grid": [{"name": "a", "method": "checkpoint", "config": "${organism}/lvlm"},
                                            {"name": "b", "method": "checkpoint", "config": "${other}"}]}))
    with pytest.raises(VlsafeError, match=r"--var organsim: .* \(did you mean organism\?\)"):
        load_sweep(cfg, {"organsim": "x"})
    load_sweep(cfg, {"organism": "x", "other": "y"})          # defined, or used without a default: fine
    tune = tmp_path / "t.yaml"
    tune.write_text(yaml.safe_dump({"vars": {"model": "m"}, "model": "${model}", "data": []}))
    with pytest.raises(VlsafeError, match="--var mdl: .* has no variable 'mdl'"):
        load_tune_config(tune, {"mdl": "x"})


def test_counts_are_checked_before_a_model_loads(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vlsafe.experiments.commands.probe import parse_layers

    with pytest.raises(VlsafeError, match="runs backwards"):
        parse_layers("5-2", 8)
    for argv in (["probe", str(model), "--folds", "1"], ["probe", str(model), "--batch-size", "0"],
                 ["eval", str(model), "--prompts", "harmful-test", "--max-new-tokens", "0"],
                 ["gate", str(model), "--layer", "1", "--max-fpr", "1.5"]):
        assert main([*argv, "-o", str(tmp_path / "o")]) == 2, argv   # a usage error from the option's range
        assert "Invalid value" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture) -> None:
    """click's usage errors (a missing argument, an unknown command, an option's range) were three lines."""
    for argv, want in ((["diff"], "Missing argument"), (["nosuch"], "No such command"),
                       (["eval", "x", "-o", "o", "--batch-size", "0"], "--batch-size")):
        err = _error(capsys, argv)
        assert want in err and "--help" in err


def test_a_broken_jsonl_row_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = tmp_path / "r.jsonl"
    rows.write_text('{"response": "I can\'t help with that."}\n{"response": "ok",\n{"response": "x"}\n')
    err = _error(capsys, ["judge", str(rows), "--column", "response", "-o", str(tmp_path / "o.csv")])
    assert "r.jsonl:2: invalid JSON" in err
    assert not (tmp_path / "o.csv").exists()


def test_options_that_do_not_apply_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Options the chosen mode ignores were accepted silently (the audit's 'conflicting options')."""
    rows = tmp_path / "r.csv"
    rows.write_text("response,label\nI'm sorry, I can't help with that.,1\n")
    out = ["-o", str(tmp_path / "o.csv")]
    judge = ["judge", str(rows), "--column", "response"]
    assert "--judge does not apply" in _error(capsys, [*judge, "--compare", "default,substring-rd", "--judge", "x", *out])
    assert "--calibration does not apply" in _error(capsys, [*judge, "--labels", "label", "--calibration",
                                                             str(rows), *out])
    assert "--category-column does not apply" in _error(capsys, [*judge, "--category-column", "c", *out])
    assert "needs --projection orthonormal" in _error(capsys, ["safelora", str(tmp_path), "--aligned", "a", "--base",
                                                               "b", "--rank", "4", "-o", str(tmp_path / "s")])
    assert "give --ray too" in _error(capsys, ["sweep", str(tmp_path / "s.yaml"), "--ray-cpus", "2",
                                               "-o", str(tmp_path / "w")])
    assert "alternatives" in _error(capsys, ["organism", "--profile", "tiny", "--config", str(rows),
                                             "-o", str(tmp_path / "org")])
    assert not any((tmp_path / n).exists() for n in ("o.csv", "s", "w", "org"))


def test_tune_into_its_own_model_is_refused(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(model), "method": "lora", "steps": 1,
                                   "data": [{"set": "harmful-train", "limit": 2}]}))
    before = _files(model)
    assert "is or holds an input" in _error(capsys, ["tune", str(cfg), "-o", str(model)])
    assert "is or holds an input" in _error(capsys, ["tune", str(cfg), "-o", str(model.parent)])
    assert _files(model) == before
