"""Dispatch sweep points to a Ray cluster: one Ray task per point with its own resources, results gathered
back in point order; points already done are answered locally and never dispatched (resume unchanged).

>>> from vlsafe.experiments.sweep_ray import run_points_ray
>>> rows = run_points_ray(points, run_point, address="auto", resources={"num_cpus": 4, "num_gpus": 1},
...                       done=cached_row)      # cached_row(point) -> its finished result, or None to run it

`address`: `"auto"` (the cluster this machine belongs to: `ray start --head`, or `RAY_ADDRESS`), `"local"` (a
private Ray instance on this machine), `"ray://HOST:10001"` (Ray client) or `"HOST:6379"`. An already
initialised Ray session (a notebook, a test) is used as it is. `resources` is a dict or a function of the point
returning one: `num_cpus`, `num_gpus`, `memory` (bytes), `accelerator_type`, `max_retries`, `runtime_env`, …;
any other key is a custom Ray resource (`{"num_cpus": 1, "big_disk": 1}`); default one CPU per point.

On a real cluster, every node needs the same vlsafe installed (`pip install 'vlsafe[ray]'`), and the sweep
folder and the input checkpoints must sit on a filesystem all nodes see under the same path: `run_point_fn`
runs on the worker and writes its point folder there. A failing point does not stop the others; once all have
finished, the first failure is raised as a one-line `VlsafeError` naming the point (a resumed sweep redoes only
the failed points).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from vlsafe.analysis.errors import VlsafeError

TASK_OPTIONS = {"num_cpus", "num_gpus", "memory", "resources", "accelerator_type", "max_retries",
                "retry_exceptions", "runtime_env", "scheduling_strategy", "label_selector", "name"}
_INSTALL = "pip install 'vlsafe[ray]'"


def available() -> bool:
    """True when `ray` can be imported."""
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        return False


def _ray() -> Any:
    if not available():
        raise VlsafeError(f"Ray is not installed: {_INSTALL} (or run the sweep without --ray)")
    import ray

    return ray


def connect(address: str = "auto", **init_kwargs: Any) -> Any:
    """Join (or, for `"local"`, start) a Ray cluster unless this process already has a Ray session."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, **init_kwargs}
    try:
        ray.init(address=None if address in ("local", "", None) else address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise VlsafeError(f"cannot reach a Ray cluster at {address!r} ({str(e).splitlines()[0][:160]}); start one "
                          "with `ray start --head`, or use --ray local") from None
    return ray


def task_options(resources: dict[str, Any] | Callable[[Any], dict[str, Any]] | None, point: Any) -> dict[str, Any]:
    """`.options(...)` keywords for `point`: known task options pass through, other keys are custom resources."""
    res = resources(point) if callable(resources) else resources
    res = {"num_cpus": 1} if res is None else dict(res)
    if not isinstance(res, dict):
        raise VlsafeError(f"Ray resources must be a mapping, got {type(res).__name__}")
    out = {k: v for k, v in res.items() if k in TASK_OPTIONS}
    custom = {k: v for k, v in res.items() if k not in TASK_OPTIONS}
    if custom:
        out["resources"] = {**out.get("resources", {}), **custom}
    return out


def _call(fn: Callable[[Any], Any], point: Any, cwd: str | None) -> Any:
    """The Ray task body (module level, so workers import it rather than unpickling a closure). Runs in the
    driver's working directory when the worker sees it (shared filesystem), so relative paths mean the same."""
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    return fn(point)


def _failure(error: Exception) -> str:
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, VlsafeError):
        return str(cause)
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


def run_points_ray(points: Sequence[Any], run_point_fn: Callable[[Any], Any], address: str = "auto",
                   resources: dict[str, Any] | Callable[[Any], dict[str, Any]] | None = None, *,
                   done: Callable[[Any], Any] | None = None, label: Callable[[Any], str] = str,
                   progress: bool = True, cwd: str | None = None) -> list[Any]:
    """`[run_point_fn(p) for p in points]`, each call a Ray task with `resources`; results in point order.

    `done(point)` returns a finished point's result (then it is not dispatched) or None. `run_point_fn` and the
    points are pickled to the workers (cloudpickle): module-level functions travel by reference, closures by value.
    Tasks run in `cwd` (default: this process's working directory) when the worker has that folder.
    """
    cwd = os.getcwd() if cwd is None else cwd
    ray = connect(address)
    results: list[Any] = [None] * len(points)
    todo = []
    for i, point in enumerate(points):
        cached = done(point) if done is not None else None
        if cached is not None:
            results[i] = cached
        else:
            todo.append(i)
    if not todo:
        return results
    task, fn_ref = ray.remote(_call), ray.put(run_point_fn)
    pending = {task.options(**task_options(resources, points[i])).remote(fn_ref, points[i], cwd): i for i in todo}
    failures: list[tuple[int, str]] = []
    with tqdm(total=len(pending), desc=f"sweep (ray, {len(pending)} tasks)", unit="point", disable=not progress) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayError as e:
                    failures.append((i, _failure(e)))
                bar.update(1)
    if failures:
        i, why = min(failures)
        more = f" ({len(failures) - 1} more point(s) failed)" if len(failures) > 1 else ""
        raise VlsafeError(f"sweep point {label(points[i])} failed on Ray: {why}{more}")
    return results
