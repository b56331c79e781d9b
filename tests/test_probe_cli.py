"""`vlsafe probe`: outputs and their contracts, LLM vs its own LVLM (text-only identical, image moves it), bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from _wshelpers import llava_from_llama
from vlsafe.analysis.checkpoints import open_checkpoint
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.tiny import tiny_llama
from vlsafe.experiments.cli import main
from vlsafe.probes.directions import load_directions

FAST = ["--n", "12", "--folds", "3", "--pairs", "40"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_cli")
    llm = tiny_llama(root / "llm", layers=3, seed=7)
    return llm, llava_from_llama(llm, root / "lvlm")


@pytest.fixture(scope="module")
def run(pair, tmp_path_factory):
    llm, lvlm = pair
    out = tmp_path_factory.mktemp("run") / "probe"
    assert main(["probe", str(llm), str(lvlm), "--image", "blank", "-o", str(out), *FAST]) == 0
    return out


def test_probe_writes_the_contracted_files(run, pair):
    for name in ("directions.safetensors", "layers.csv", "similarity.csv", "safety_layers.csv", "drift.csv",
                 "transfer.csv", "run.json", "figures/probe_accuracy.png", "figures/direction_cosine.png",
                 "figures/safety_layers.png", "figures/projections.png"):
        assert (run / name).is_file(), name
    layers = pd.read_csv(run / "layers.csv")
    assert list(layers.columns[:7]) == ["checkpoint", "layer", "position", "probe_accuracy", "probe_auroc",
                                        "control_accuracy", "direction_norm"]
    assert sorted(layers["checkpoint"].unique()) == ["llm", "lvlm", "lvlm+blank"]
    assert sorted(layers["layer"].unique()) == [0, 1, 2] and (layers["n"] == 24).all()
    curves = pd.read_csv(run / "safety_layers.csv")
    assert set(curves["pair"]) == {"N-N", "M-M", "N-M"} and len(curves) == 3 * 3 * 3
    rec = json.loads((run / "run.json").read_text())
    assert rec["command"] == "probe" and set(rec["checkpoints"]) == {"llm", "lvlm"}
    assert rec["kind"] == "probe" and rec["tables"] == {
        "probe_layers": "layers.csv", "safety_layers": "safety_layers.csv", "similarity": "similarity.csv",
        "drift": "drift.csv", "transfer": "transfer.csv"}
    assert rec["config"]["labels"] == ["llm", "lvlm", "lvlm+blank"] and rec["seed"] == 0
    assert set(rec["onset_layers"]) == {"llm", "lvlm", "lvlm+blank"}
    sets = load_directions(run / "directions.safetensors")
    assert list(sets) == ["llm", "lvlm", "lvlm+blank"]
    assert sets["lvlm+blank"].extra["image"] == "blank" and sets["llm"].n_harmful == 12
    load_directions(run / "directions.safetensors", checkpoint=open_checkpoint(pair[0]), allow_other_model=True)


def test_llm_and_its_lvlm_agree_text_only_and_differ_with_an_image(run):
    sim = pd.read_csv(run / "similarity.csv")
    assert list(sim.columns[:4]) == ["layer", "checkpoint_a", "checkpoint_b", "direction_cosine"]
    text = sim[(sim.checkpoint_a == "llm") & (sim.checkpoint_b == "lvlm") & (sim.layer > 0)]
    assert len(text) == 2 and (text["direction_cosine"] > 1 - 1e-5).all()      # same LM weights, same prompts
    image = sim[(sim.checkpoint_a == "llm") & (sim.checkpoint_b == "lvlm+blank") & (sim.layer > 0)]
    assert len(image) == 2 and (image["direction_cosine"] < 0.999).all()
    sets = load_directions(run / "directions.safetensors")
    torch.testing.assert_close(sets["llm"].raw, sets["lvlm"].raw, atol=1e-6, rtol=1e-4)
    layers = pd.read_csv(run / "layers.csv").set_index(["checkpoint", "layer"])
    pd.testing.assert_series_equal(layers.loc["llm", "probe_accuracy"], layers.loc["lvlm", "probe_accuracy"])
    drift = pd.read_csv(run / "drift.csv")
    assert set(drift["direction_from"]) == {"llm"}
    assert set(drift["activations_from"]) == {"llm", "lvlm", "lvlm+blank"}
    transfer = pd.read_csv(run / "transfer.csv")
    assert set(transfer["test_on"]) == {"lvlm", "lvlm+blank"}


def test_probe_bad_input(pair, tmp_path, capsys):
    llm, _ = pair
    narrow = tiny_llama(tmp_path / "narrow", hidden=32, layers=1)
    assert main(["probe", str(llm), str(narrow), "-o", str(tmp_path / "a"), *FAST]) == 2
    assert "different hidden sizes" in capsys.readouterr().err
    assert main(["probe", str(llm), "--layers", "0-7", "-o", str(tmp_path / "b"), *FAST]) == 2
    assert "layer 3 out of range (valid layers: 0..2)" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"id": "x", "prompt": "Only one prompt here", "label": 1}\n')
    assert main(["probe", str(llm), "--harmful", str(empty), "-o", str(tmp_path / "c"), *FAST]) == 2
    assert "need at least 2" in capsys.readouterr().err
    assert main(["probe", str(llm), "--positions", "first", "-o", str(tmp_path / "d"), *FAST]) == 2
    assert "--positions: 'first' is not" in capsys.readouterr().err
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_direction_file_from_another_model_is_refused(run, tmp_path):
    other = open_checkpoint(tiny_llama(tmp_path / "other", layers=3, seed=99))
    with pytest.raises(VlsafeError, match=r"directions.safetensors \[llm\]: computed on .* not on"):
        load_directions(run / "directions.safetensors", checkpoint=other)


def test_remote_dry_run_matches_a_local_capture(pair, tmp_path, capsys):
    llm, lvlm = pair
    local, remote = tmp_path / "local", tmp_path / "remote"
    args = [str(llm), "--no-figures", "--layers", "1-2", *FAST]
    assert main(["probe", *args, "-o", str(local)]) == 0
    assert main(["probe", *args, "-o", str(remote), "--remote", "local"]) == 0  # nnsight's serialised dry run
    a, b = (load_directions(p / "directions.safetensors") for p in (local, remote))
    (name,) = a
    assert torch.allclose(a[name].raw, b[name].raw, atol=1e-5)
    assert json.loads((remote / "run.json").read_text())["config"]["remote"] == "local"
    for extra, msg in ((["--select"], "drop --select"), (["--backend", "transformer_lens"], "cannot run remotely")):
        assert main(["probe", *args, "-o", str(tmp_path / "bad"), "--remote", "local", *extra]) == 2
        assert msg in capsys.readouterr().err
    assert main(["probe", str(lvlm), "--image", "blank", "-o", str(tmp_path / "bad"), "--remote", "local",
                 *FAST]) == 2
    assert "text-only" in capsys.readouterr().err and not (tmp_path / "bad").exists()
