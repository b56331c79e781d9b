"""`vlsafe eval --rejudge RUN_DIR`: an earlier run's stored responses judged again equal a fresh run with that judge.

Planted: `planted_refuser` answers every prompt with one refusal sentence, a random tiny Llama never refuses, so
the judges below disagree on known rows (substring-rd calls the refusal one, a substring list of a phrase nobody
writes calls nothing one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from test_eval_cli import _error, planted_refuser
from vlsafe.experiments.cli import main


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLSAFE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from vlsafe.analysis.tiny import tiny_llama

    root = tmp_path_factory.mktemp("rejudge")
    return [str(planted_refuser(root / "refuser")), str(tiny_llama(root / "llama", seed=2))]


def _args(models: list[str]) -> list[str]:
    return [*models, "--prompts", "harmful-test", "harmless-test", "--limit", "3", "--max-new-tokens", "12"]


def _tables(run: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    gens = pd.read_json(run / "generations.jsonl", lines=True)
    return gens, pd.read_csv(run / "metrics.csv"), pd.read_csv(run / "summary.csv")


def test_rejudged_run_equals_a_fresh_run(models: list[str], tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert main(["eval", *_args(models), "--judge", "substring-rd", "--no-cache", "-o", str(first)]) == 0
    nobody = tmp_path / "nobody.txt"
    nobody.write_text("a phrase no model writes\n")
    for judge in ("default", f"substring:{nobody}"):
        fresh, again = tmp_path / f"fresh-{len(judge)}", tmp_path / f"again-{len(judge)}"
        assert main(["eval", *_args(models), "--judge", judge, "-o", str(fresh)]) == 0
        assert main(["eval", "--rejudge", str(first), "--judge", judge, "-o", str(again)]) == 0
        for a, b in zip(_tables(fresh), _tables(again)):
            pd.testing.assert_frame_equal(a, b)
        run = json.loads((again / "run.json").read_text())
        assert run["config"]["judge"] == judge and run["kind"] == "eval"
        assert run["config"]["rejudged_from"] == {"run": str(first), "judge": "substring-rd",
                                                  "judge_name": "substring-rd"}
        assert run["checkpoints"] == json.loads((first / "run.json").read_text())["checkpoints"]
        assert (again / "figures" / "refusal_rates.png").is_file()
    # the planted disagreement is there: the refuser's 6 refusals by substring-rd are none by the phrase list
    before, after = _tables(first)[0], _tables(again)[0]
    assert before["refused"].sum() == 6 and after["refused"].sum() == 0
    assert before["response"].equals(after["response"])


def test_rejudge_in_place_without_the_checkpoints(tmp_path: Path) -> None:
    from vlsafe.analysis.tiny import tiny_llama

    model = tiny_llama(tmp_path / "gone", seed=5)
    run = tmp_path / "run"
    assert main(["eval", str(model), "--prompts", "harmful-test", "--limit", "2", "--max-new-tokens", "4",
                 "--judge", "substring-rd", "-o", str(run)]) == 0
    responses = _tables(run)[0]["response"]
    shutil.rmtree(model)
    assert main(["eval", "--rejudge", str(run), "-o", str(run)]) == 0
    gens = _tables(run)[0]
    assert gens["response"].equals(responses) and set(gens["judge"]) == {"vlsafe"}


def test_rejudge_bad_inputs(models: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    assert main(["eval", *_args(models), "--judge", "substring-rd", "-o", str(run)]) == 0
    capsys.readouterr()
    assert "give none" in _error(capsys, ["eval", models[0], "--rejudge", str(run), "-o", str(out)])
    assert "--rejudge RUN_DIR" in _error(capsys, ["eval", models[0], "-o", str(out)])
    assert "run.json" in _error(capsys, ["eval", "--rejudge", str(tmp_path), "-o", str(out)])
    assert "scores a model" in _error(capsys, ["eval", "--rejudge", str(run), "--judge", "logit", "-o", str(out)])
    record = json.loads((run / "run.json").read_text())
    record["config"]["prompt_set_hashes"]["harmless-test"] = "0" * 64  # the set file changed since the run
    (run / "run.json").write_text(json.dumps(record))
    assert "harmless-test changed since the run" in _error(capsys, ["eval", "--rejudge", str(run), "-o", str(out)])
    del record["config"]["prompt_set_hashes"]
    (run / "run.json").write_text(json.dumps(record))
    lines = (run / "generations.jsonl").read_text().splitlines()
    row = json.loads(lines[4])
    lines[4] = json.dumps({**row, "prompt": "Something else entirely."})
    (run / "generations.jsonl").write_text("\n".join(lines) + "\n")
    err = _error(capsys, ["eval", "--rejudge", str(run), "-o", str(out)])
    assert "stored generation 4" in err and "another prompt" in err
    assert not out.exists()  # nothing written before every check passed
