"""The walkthrough notebooks run top to bottom on tiny models and show what they claim.

Each notebook is executed with nbclient in a fresh kernel that runs *this* interpreter (a temporary kernelspec
put first on JUPYTER_PATH), with a temporary working directory and no network. Its last cell prints one
`VLSAFE_SUMMARY {json}` line; the planted ground truth the notebook builds (a moved layer, a half-undone task
vector, an unchanged prefix of layers) must be recovered there. The committed `.ipynb` files must be exactly what
`notebooks/_build.py` generates from `notebooks/src/`, without outputs.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ["01_weight_shift", "02_directions_and_probes", "03_merge_playground", "04_organism_walkthrough"]
CELL_TIMEOUT = 300


def _builder() -> Any:
    spec = importlib.util.spec_from_file_location("notebooks_build", NB_DIR / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `python3` kernelspec launching this interpreter (the venv's), to be found before any other."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "vlsafe tests", "language": "python"}))
    return root


def _execute(name: str, cwd: Path, jupyter_path: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    probe = ("import json, os, sys\n"
             "print('VLSAFE_KERNEL ' + json.dumps({'executable': sys.executable, 'cwd': os.getcwd()}))")
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def _tagged(nb: nbformat.NotebookNode, tag: str) -> dict[str, Any]:
    lines = [line for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
             if out.get("output_type") == "stream" for line in out.get("text", "").splitlines()
             if line.startswith(tag + " ")]
    assert len(lines) == 1, f"expected one {tag} line, got {len(lines)}"
    return json.loads(lines[0][len(tag) + 1:])


def _outputs(nb: nbformat.NotebookNode, kind: str) -> list[Any]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if out.get("output_type") == kind or kind in out.get("data", {})]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_recovers_planted_truth(name: str, tmp_path: Path, jupyter_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    nb = _execute(name, tmp_path, jupyter_path, monkeypatch)
    kernel = _tagged(nb, "VLSAFE_KERNEL")
    assert Path(kernel["executable"]).resolve() == Path(sys.executable).resolve()
    assert Path(kernel["cwd"]).resolve() == tmp_path.resolve()
    assert not _outputs(nb, "error")
    assert _outputs(nb, "image/png"), "no inline figure"
    assert (tmp_path / "runs").is_dir()  # outputs land in the working directory, not in the repository
    CHECKS[name](_tagged(nb, "VLSAFE_SUMMARY"), tmp_path)


def _check_weight_shift(s: dict[str, Any], cwd: Path) -> None:
    assert not s["real"] and s["top_layer"] == s["planted_layer"]
    eps, background = s["planted_eps"], s["background_eps"]
    assert s["top_rel_frobenius"] == pytest.approx(eps, rel=1e-5)
    assert s["other_max_rel_frobenius"] == pytest.approx(background, rel=1e-3)
    assert s["tv_min_cosine_layer"] == s["planted_layer"]
    assert s["tv_min_cosine"] == pytest.approx(-1.0, abs=1e-6)  # τ_S = −½ τ_VL on the planted layer
    assert s["dynamics_top_layer"] == s["planted_layer"]
    assert s["dynamics_trajectory"] == pytest.approx([0.0, eps / 3, 2 * eps / 3, eps], rel=1e-4, abs=1e-9)
    assert s["vision_tensors_unpaired"] > 0
    assert (cwd / "runs" / "nb01_weight_shift" / "figures" / "weight_heatmap.pdf").is_file()


def _check_directions(s: dict[str, Any], cwd: Path) -> None:
    assert not s["real"] and s["n_per_set"] == 24
    assert s["capture_vs_hf"] < 1e-5
    assert s["ablation_vs_orthogonalisation_rel"] < 1e-5
    cos = {int(k): v for k, v in s["direction_cosine"].items()}
    unchanged = range(1, s["changed_from"] + 1)  # inputs of these blocks are identical in the LLM and the LVLM
    assert all(cos[i] == pytest.approx(1.0, abs=1e-9) for i in unchanged)
    assert all(cos[i] < 1 - 1e-3 for i in cos if i > s["changed_from"])
    assert 0.0 <= s["mean_control_accuracy"] <= 1.0 and s["best_probe_layer"] in cos
    assert (cwd / "runs" / "nb02_directions" / "directions.safetensors").is_file()


def _check_merges(s: dict[str, Any], cwd: Path) -> None:
    assert not s["real"] and s["methods"] == ["linear", "slerp", "task_arithmetic", "ties"]
    assert s["linear_error"] < 1e-6 and s["vision_tower_kept"]
    assert s["restore_layers"] == [s["planted_layer"]]
    assert s["restored_error"] < 1e-6 and s["others_exact"]
    assert s["kl_to_aligned"]["restored"] < s["kl_to_aligned"]["lvlm"]
    assert s["mergekit_yaml_lines"] > 0
    for method in s["methods"]:
        assert (cwd / "runs" / "nb03_merge" / "merged" / method / "mergekit.yaml").is_file()


def _check_organism(s: dict[str, Any], cwd: Path) -> None:
    from vlsafe.experiments.organism import load_config
    from vlsafe.experiments.organism.api import STAGE_NAMES
    from vlsafe.experiments.organism.metrics import METRICS, checkpoints

    assert not s["real"] and s["profile"] == "tiny"
    assert [st for st in s["stages"] if not st.startswith("metrics:")] == list(STAGE_NAMES[:-1])
    assert s["resume_statuses"] == ["cached"]
    assert s["checkpoints"] == sorted(name for name, _ in checkpoints(load_config("tiny")))
    assert s["metrics"] == sorted(METRICS)
    assert (cwd / s["report"]).is_file()
    assert {"report_dynamics", "report_weight_heatmap", "report_taskvec"} <= set(s["report_figures"])


CHECKS = {"01_weight_shift": _check_weight_shift, "02_directions_and_probes": _check_directions,
          "03_merge_playground": _check_merges, "04_organism_walkthrough": _check_organism}


def test_committed_notebooks_match_sources_without_outputs() -> None:
    build = _builder()
    assert [p.stem for p in build.sources()] == NOTEBOOKS
    assert build.main(["--check"]) == 0, "run: python notebooks/_build.py"
    for name in NOTEBOOKS:
        nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code)
        assert nb.cells[0].cell_type == "markdown" and "**Question.**" in nb.cells[0].source
        assert code[0].source.startswith("REAL = False")  # the one switch to real checkpoints


def test_percent_format_parsing() -> None:
    text = "header ignored\n# %% [markdown]\n# # Title\n#\n# text\n\n# %%\n# %matplotlib inline\nx = 1\n\n# %%\n\n"
    assert _builder().parse_cells(text) == [("markdown", "# Title\n\ntext"), ("code", "%matplotlib inline\nx = 1")]
    with pytest.raises(ValueError, match="not commented"):
        _builder().parse_cells("# %% [markdown]\nnot a comment\n")
