"""`vlsafe diff` end to end: every output file, run.json, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from _wshelpers import relative_shift, shift_one, write_like
from vlsafe.experiments.cli import main

TARGET = "model.layers.0.self_attn.q_proj.weight"
FIGURES = ("heatmap_rel_frobenius", "layer_curves", "taskvector_cosine", "dynamics")


def test_diff_writes_all_outputs(tiny_llama_dir: Path, tmp_path: Path) -> None:
    base = write_like(tiny_llama_dir, tmp_path / "llm", lambda n, t: relative_shift(t, 0.05, seed=len(n)))
    posts = [write_like(tiny_llama_dir, tmp_path / f"lvlm-step-{s}", shift_one(TARGET, e))
             for s, e in ((10, 0.01), (20, 0.04))]
    out = tmp_path / "run"
    rc = main(["diff", str(tiny_llama_dir), *map(str, posts), "--base", str(base), "--spectral", "-o", str(out)])
    assert rc == 0
    for f in ("tensors.csv", "layers.csv", "taskvectors.csv", "taskvectors_tensors.csv", "dynamics.csv", "run.json"):
        assert (out / f).is_file(), f
    for stem in FIGURES:
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{stem}.{ext}").stat().st_size > 1000
    assert (out / "figures" / "heatmap_rel_frobenius.pdf").read_bytes().startswith(b"%PDF")

    tensors = pd.read_csv(out / "tensors.csv")
    need = {"tensor", "layer", "module", "shape", "numel", "rel_frobenius", "cosine", "max_abs", "frac_changed",
            "stable_rank", "effective_rank", "top_sigma", "subspace_overlap", "nonfinite", "note", "status",
            "checkpoint_a", "checkpoint_b"}
    assert need <= set(tensors.columns)
    hit = tensors[tensors["tensor"] == TARGET].set_index("checkpoint_b")["rel_frobenius"]
    assert hit["lvlm-step-10"] == pytest.approx(0.01, rel=1e-5) and hit["lvlm-step-20"] == pytest.approx(0.04, rel=1e-5)

    layers = pd.read_csv(out / "layers.csv")
    assert {"layer", "module", "rel_frobenius", "cosine"} <= set(layers.columns)
    assert (layers["module"] == "all").sum() == 2 * 2  # 2 POSTs × 2 layers
    assert layers[layers["layer"].isna()]["module"].tolist().count("embed") == 2

    dyn = pd.read_csv(out / "dynamics.csv")
    q = dyn[(dyn["layer"] == 0)].sort_values("index")
    assert q["step"].tolist() == [0, 10, 20] and q["rel_frobenius"].is_monotonic_increasing

    tv = pd.read_csv(out / "taskvectors.csv")
    assert {"layer", "module", "norm_a", "norm_b", "cosine"} <= set(tv.columns)
    # chain mode: τ_A = PRE − BASE moves every tensor, τ_B = POST − PRE only TARGET
    assert tv[(tv["module"] == "q_proj") & (tv["layer"] == 0)]["norm_b"].gt(0).all()
    assert tv[(tv["module"] == "k_proj")]["norm_b"].eq(0).all()

    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "diff" and run["config"]["spectral"] is True and run["config"]["tv_mode"] == "chain"
    assert set(run["checkpoints"]) == {"llama", "lvlm-step-10", "lvlm-step-20", "llm"}
    assert all(len(c["content_hash"]) == 64 for c in run["checkpoints"].values())
    assert "figures/dynamics.pdf" in run["outputs"]
    assert run["kind"] == "diff" and run["tables"] == {
        "diff_tensors": "tensors.csv", "diff_layers": "layers.csv", "taskvectors": "taskvectors.csv",
        "taskvectors_tensors": "taskvectors_tensors.csv", "dynamics": "dynamics.csv"}


def test_diff_errors_are_one_line(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vlsafe.analysis.tiny import tiny_llama

    wide = tiny_llama(tmp_path / "wide", intermediate_size=96)
    capsys.readouterr()
    assert main(["diff", str(tiny_llama_dir), str(wide), "-o", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlsafe: error: tensor 'model.layers.") and "--allow-mismatch" in err and "\n" not in err
    assert not (tmp_path / "r1" / "tensors.csv").exists()
    assert main(["diff", str(tiny_llama_dir), "-o", str(tmp_path / "r2")]) == 2
    assert "at least one POST" in capsys.readouterr().err
    assert main(["diff", str(tiny_llama_dir), str(wide), "--allow-mismatch", "--no-figures",
                 "-o", str(tmp_path / "r3")]) == 0
    assert (pd.read_csv(tmp_path / "r3" / "tensors.csv")["status"] == "shape_mismatch").sum() == 6



def test_diff_steps_set_the_dynamics_axis(tiny_llama_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    # names without step numbers ("lvlm" last, as in the organism): parsed steps are empty, --steps fills them
    posts = [write_like(tiny_llama_dir, tmp_path / name, shift_one(TARGET, e))
             for name, e in (("lvlm-step-24", 0.01), ("lvlm", 0.04))]
    args = ["diff", str(tiny_llama_dir), *map(str, posts), "--no-figures"]
    assert main([*args, "-o", str(tmp_path / "parsed")]) == 0
    assert pd.read_csv(tmp_path / "parsed" / "dynamics.csv")["step"].isna().all()
    assert main([*args, "--steps", "0,24,128", "-o", str(tmp_path / "given")]) == 0
    dyn = pd.read_csv(tmp_path / "given" / "dynamics.csv")
    assert dyn.groupby("index")["step"].first().tolist() == [0, 24, 128]
    assert json.loads((tmp_path / "given" / "run.json").read_text())["config"]["steps"] == [0, 24, 128]
    capsys.readouterr()
    assert main([*args, "--steps", "0,24", "-o", str(tmp_path / "bad")]) == 2
    assert "2 steps for 3 checkpoints" in capsys.readouterr().err
    assert main([*args, "--steps", "0,x,1", "-o", str(tmp_path / "bad2")]) == 2
    assert "comma-separated integers" in capsys.readouterr().err

@pytest.mark.smollm2
def test_smollm2_per_layer_planted_shift(smollm2_dir: Path, tmp_path: Path) -> None:
    """Real SmolLM2 (30 layers, tied embeddings): o_proj of layer i moved by ε_i = 0.001·(i+1), ⟂ W."""
    def shift(name: str, t):
        if not name.endswith("o_proj.weight"):
            return t
        return relative_shift(t, 0.001 * (int(name.split(".")[2]) + 1), seed=len(name), orthogonal=True)
    moved = write_like(smollm2_dir, tmp_path / "smollm2-moved", shift)
    out = tmp_path / "run"
    assert main(["diff", "default", str(moved), "--no-figures", "-o", str(out)]) == 0
    layers = pd.read_csv(out / "layers.csv")
    o = layers[layers["module"] == "o_proj"].sort_values("layer")
    eps = [0.001 * (i + 1) for i in range(30)]
    assert o["layer"].tolist() == list(range(30))
    assert o["rel_frobenius"].to_numpy() == pytest.approx(eps, rel=1e-4)
    assert o["cosine"].to_numpy() == pytest.approx([1 / math.sqrt(1 + e * e) for e in eps], abs=1e-7)
    rest = layers[~layers["module"].isin(["o_proj", "all"])]
    assert len(rest) == 30 * 8 + 2 and (rest["rel_frobenius"] == 0).all()  # + embed, norm (no lm_head: tied)
    allrows = layers[layers["module"] == "all"].sort_values("layer")
    assert allrows["sq_norm_delta"].to_numpy() == pytest.approx(o["sq_norm_delta"].to_numpy(), rel=1e-12)
    assert allrows["rel_frobenius"].to_numpy() == pytest.approx(
        (o["sq_norm_delta"].to_numpy() / allrows["sq_norm_a"].to_numpy()) ** 0.5, rel=1e-12)


def test_figure_style_api(tmp_path: Path) -> None:
    from PIL import Image

    from vlsafe.analysis.figures import DPI, checkpoint_colors, new_figure, save_figure

    labels = ["llm", "lvlm", "lvlm-safe"]
    colors = checkpoint_colors(labels)
    assert colors == checkpoint_colors(labels) and len(set(colors.values())) == 3
    assert len(set(checkpoint_colors([f"c{i}" for i in range(20)]).values())) == 20
    fig, ax = new_figure("column")
    assert fig.get_figwidth() == pytest.approx(3.3)
    ax.plot([0, 1, 2], [0, 1, 4], color=colors["lvlm"])
    png, pdf = save_figure(fig, tmp_path / "figs", "curve")
    assert png.suffix == ".png" and pdf.suffix == ".pdf"
    assert Image.open(png).info["dpi"][0] == pytest.approx(DPI, abs=1)
    assert b"/Subtype /Image" not in pdf.read_bytes()  # vector, no embedded raster
