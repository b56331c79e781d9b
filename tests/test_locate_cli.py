"""`vlsafe locate` end to end on tiny models: tables, run.json, figures; bad input = one-line error, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from vlsafe.analysis.tiny import tiny_llama, tiny_llava_from
from vlsafe.experiments.cli import main

from test_patching import PLANTED_LAYER, planted_pair


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("locate")
    src, tgt = planted_pair(root)
    lvlm, processor, _ = tiny_llava_from(tgt, root / "init", seed=5)
    lvlm.save_pretrained(root / "lvlm")
    processor.save_pretrained(root / "lvlm")
    return {"root": root, "src": src, "tgt": tgt, "lvlm": root / "lvlm"}


def test_locate_writes_every_table(dirs, capsys) -> None:
    root = dirs["root"]
    assert main(["diff", str(dirs["src"]), str(dirs["lvlm"]), "-o", str(root / "diff"), "--no-figures"]) == 0
    out = root / "run"
    rc = main(["locate", str(dirs["src"]), str(dirs["lvlm"]), "-o", str(out), "--image", "blank", "--n", "4",
               "--n-boot", "50", "--diff", str(root / "diff")])
    assert rc == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "locate"
    assert run["tables"] == {"patching": "patching.csv", "shift": "shift.csv", "signals": "signals.csv",
                             "signals_corr": "signals_corr.csv"}
    pt = pd.read_csv(out / "patching.csv")
    assert list(pt.columns[:8]) == ["layer", "component", "direction", "image", "recovered", "ci_low", "ci_high", "n"]
    assert set(pt["image"]) == {"none", "blank"} and set(pt["direction"]) == {"restore", "break"}
    text = pt[(pt.image == "none") & (pt.direction == "restore")].set_index(["layer", "component"])["recovered"]
    assert text.loc[(PLANTED_LAYER, "attn_out")] >= 0.9               # the planted site, through the LVLM
    assert pt["positions"].str.contains("text positions").all()
    sh = pd.read_csv(out / "shift.csv")
    assert {"blank", "noise:0", "scene", "caption"} == set(sh["condition"])
    assert set(sh["label"]) == {"harmful", "harmless"}
    # layer 0's input is the embedding of the same post-instruction tokens: no refusal direction there (NaN)
    assert sh[sh.layer == 0]["refusal_projection"].isna().all() and sh[sh.layer > 0]["refusal_projection"].notna().all()
    sig = pd.read_csv(out / "signals.csv")
    assert len(sig) == 3 and {"weight_shift", "patching_attn_out", "patching_attn_out_blank",
                              "image_shift_refusal_scene"} <= set(sig.columns)
    assert any("direction_drift absent" in n for n in run["notes"])
    corr = pd.read_csv(out / "signals_corr.csv")
    assert {"signal_a", "signal_b", "spearman", "ci_low", "ci_high"} <= set(corr.columns)
    assert (out / "shift_vectors.safetensors").is_file()
    assert (out / "figures" / "patching.png").is_file() and (out / "figures" / "signals.png").is_file()


def test_locate_attribution_screen(dirs, capsys) -> None:
    """`--method attribution`: the same grid as first-order estimates, labelled as such in every output."""
    out = dirs["root"] / "atp"
    rc = main(["locate", str(dirs["src"]), str(dirs["tgt"]), "-o", str(out), "--n", "4", "--n-boot", "50",
               "--method", "attribution"])
    assert rc == 0, capsys.readouterr().err
    pt = pd.read_csv(out / "patching.csv")
    assert (pt["method"] == "attribution").all() and len(pt) == 3 * 3 * 2
    restore = pt[pt.direction == "restore"].set_index(["layer", "component"])["recovered"]
    parts = restore.drop(index="resid", level="component").abs()
    assert parts.idxmax() == (PLANTED_LAYER, "attn_out")            # ranks the planted site first
    sig = pd.read_csv(out / "signals.csv")
    assert {"atp_attn_out", "atp_resid"} <= set(sig.columns) and not any(c.startswith("patching_") for c in sig)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["method"] == "attribution"
    assert any("first-order estimates" in n for n in run["notes"])


def test_locate_bf16_records_its_precision(dirs, capsys) -> None:
    out = dirs["root"] / "bf16"
    rc = main(["locate", str(dirs["src"]), str(dirs["tgt"]), "-o", str(out), "--n", "4", "--n-boot", "50",
               "--precision", "bf16", "--no-figures"])
    assert rc == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["precision"] == "bf16" and any("bf16 autocast" in n for n in run["notes"])
    restore = pd.read_csv(out / "patching.csv").query("direction == 'restore'")
    assert restore.set_index(["layer", "component"])["recovered"].loc[(PLANTED_LAYER, "attn_out")] >= 0.9


@pytest.mark.parametrize("case", ["hidden", "image_on_text", "empty", "family", "method", "atp_opening",
                                  "precision"])
def test_bad_input_one_line_nothing_written(dirs, case, tmp_path, capsys) -> None:
    src = str(dirs["src"])
    args = {"hidden": [src, str(tiny_llama(tmp_path / "w", layers=3, hidden=32))],
            "image_on_text": [src, str(dirs["tgt"]), "--image", "blank"],
            "family": [src, "QWEN"]}.get(case)
    if case == "family":
        from vlsafe.analysis.tiny import tiny_qwen2_vl

        args[1] = str(tiny_qwen2_vl(tmp_path / "q", layers=3))
    if case == "precision":
        args = [src, str(dirs["tgt"]), "--precision", "half"]
    if case in ("method", "atp_opening"):
        args = [src, str(dirs["tgt"]), "--method", "fast" if case == "method" else "attribution"]
        args += ["--score", "opening"] if case == "atp_opening" else []
    if case == "empty":
        (tmp_path / "empty.jsonl").write_text("")
        args = [src, str(dirs["tgt"]), "--prompts", str(tmp_path / "empty.jsonl")]
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["locate", *args, "-o", str(out)]) == 2
    text = capsys.readouterr().err
    err = [line for line in text.splitlines() if line.startswith("vlsafe:")]    # (progress bars aside)
    assert len(err) == 1 and err[0].startswith("vlsafe: error:") and "Traceback" not in text, text
    want = {"hidden": "hidden", "image_on_text": "text-only", "empty": "empty", "family": "families",
            "method": "unknown patching method 'fast'", "atp_opening": "needs the first_token score",
            "precision": "precision 'half' is not one of"}[case]
    assert want in err[0]
    assert not out.exists()
