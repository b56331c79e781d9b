"""The wheel ships one import namespace: `vlsafe` (with `vlsafe.analysis`, `vlsafe.probes`, `vlsafe.experiments`),
never generic top-level names, and it imports from a folder that holds a user's own `analysis/` package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a clean copy: setuptools would reuse a stale build/ folder of the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".*", "build", "runs", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True, text=True)
    (whl,) = out.glob("vlsafe-*.whl")
    return whl


def test_wheel_has_only_the_vlsafe_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"vlsafe", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for needed in ("vlsafe/py.typed", "vlsafe/analysis/families/llava.json", "vlsafe/probes/behavior/judge_weights.json",
                   "vlsafe/probes/behavior/prompts/harmful.jsonl", "vlsafe/probes/behavior/judge_calibration.json",
                   "vlsafe/experiments/configs/organism-tiny.yaml",
                   "vlsafe/experiments/cli.py"):
        assert needed in names, needed
    for init in sorted(p.relative_to(REPO) for top in ("analysis", "probes", "experiments")
                       for p in (REPO / top).rglob("__init__.py")):
        assert f"vlsafe/{init.as_posix()}" in names, f"{init.parent} is not shipped (add it to pyproject's packages)"


def test_installed_wheel_imports_beside_a_users_analysis_package(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True)
    user = tmp_path / "notebook_dir"
    (user / "analysis").mkdir(parents=True)
    (user / "analysis" / "__init__.py").write_text("OWNER = 'user'\n")
    script = (
        "import analysis, vlsafe, vlsafe.analysis.names as names\n"
        "from vlsafe.probes.behavior.datasets import load_prompts\n"
        "assert analysis.OWNER == 'user', analysis.__file__\n"
        f"assert vlsafe.__file__.startswith({str(site)!r}), vlsafe.__file__\n"
        "assert 'llava' in names.families()\n"
        "assert len(load_prompts('harmful-test', limit=3)) == 3\n"
        "assert callable(vlsafe.open_checkpoint) and callable(vlsafe.evaluate)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    res = subprocess.run([sys.executable, "-c", script], cwd=user, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
