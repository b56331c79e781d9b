"""Distributed sweeps: a 2-point toy sweep (linear merges of two tiny Llamas, then their logits) dispatched to a
local Ray instance gives the serial results; done points are not dispatched; a failing point is a one-line
error naming it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vlsafe.analysis.errors import VlsafeError

ray = pytest.importorskip("ray")

from vlsafe.experiments.sweep_ray import run_points_ray, task_options  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def llamas(tiny_llama_dir, tmp_path_factory):
    from vlsafe.analysis.tiny import tiny_llama

    return str(tiny_llama_dir), str(tiny_llama(tmp_path_factory.mktemp("ray_inputs") / "b", seed=1))


def make_point_fn(a: str, b: str, out: Path):
    """A sweep point function (a closure, so Ray ships it by value): merge, then logits on a fixed prompt."""

    def run_point(alpha: float) -> dict:
        import torch

        from vlsafe.analysis.checkpoints import open_checkpoint
        from vlsafe.analysis.merging import MergePlan, run_merge

        plan = MergePlan.from_dict({"merge_method": "linear", "dtype": "float32", "models": [
            {"model": a, "parameters": {"weight": 1 - alpha}}, {"model": b, "parameters": {"weight": alpha}}]})
        ckpt = open_checkpoint(run_merge(plan, out / f"alpha{alpha}", progress=False))
        with open(out / "calls.txt", "a") as f:
            f.write(f"{alpha}\n")
        lm = ckpt.load_model()
        with torch.inference_mode():
            logits = lm.model(torch.tensor([[5, 6, 7, 8]])).logits[0, -1]
        return {"alpha": alpha, "hash": ckpt.content_hash(), "logits": [round(float(x), 5) for x in logits[:8]],
                "cwd": os.getcwd(), "pid": os.getpid()}

    return run_point


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "pid"} for r in rows]


def test_ray_sweep_equals_serial_and_skips_done_points(local_ray, llamas, tmp_path):
    serial_fn = make_point_fn(*llamas, tmp_path / "serial")
    serial = [serial_fn(alpha) for alpha in (0.25, 0.75)]
    assert serial[0]["hash"] != serial[1]["hash"]  # the two points really are different models

    fn = make_point_fn(*llamas, tmp_path / "ray")
    rows = run_points_ray([0.25, 0.75], fn, resources={"num_cpus": 1}, progress=False)
    assert _strip(rows) == _strip(serial)
    assert all(r["pid"] != os.getpid() for r in rows)  # ran in Ray workers, not here

    (tmp_path / "ray" / "calls.txt").unlink()
    resumed = run_points_ray([0.25, 0.75], fn, done=lambda a: rows[0] if a == 0.25 else None, progress=False)
    assert _strip(resumed) == _strip(serial)
    assert (tmp_path / "ray" / "calls.txt").read_text().split() == ["0.75"]  # only the unfinished point ran


def test_failing_point_names_the_point(local_ray):
    def run_point(p: int) -> int:
        if p == 2:
            raise VlsafeError("layer 9 out of range")
        return p * 10

    with pytest.raises(VlsafeError, match=r"sweep point p2 failed on Ray: layer 9 out of range") as err:
        run_points_ray([1, 2], run_point, label=lambda p: f"p{p}", progress=False)
    assert "\n" not in str(err.value)


def test_task_options_split_custom_resources():
    opts = task_options(lambda p: {"num_cpus": 2, "num_gpus": p, "big_disk": 1}, 1)
    assert opts == {"num_cpus": 2, "num_gpus": 1, "resources": {"big_disk": 1}}
    assert task_options(None, "x") == {"num_cpus": 1}


def test_sweep_cli_with_ray_matches_serial(tmp_path: Path) -> None:
    """The tiny sweep config through `vlsafe sweep --ray local` gives the serial run's pareto.csv."""
    pytest.importorskip("ray")
    import pandas as pd

    from vlsafe.experiments.cli import main

    cfg = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "sweep-tiny.yaml"
    assert main(["sweep", str(cfg), "-o", str(tmp_path / "serial"), "--quiet"]) == 0
    assert main(["sweep", str(cfg), "-o", str(tmp_path / "ray"), "--quiet", "--ray", "local"]) == 0
    a = pd.read_csv(tmp_path / "serial" / "pareto.csv").drop(columns=["model"])
    b = pd.read_csv(tmp_path / "ray" / "pareto.csv").drop(columns=["model"])
    pd.testing.assert_frame_equal(a, b)
