"""Task-vector geometry: per-layer cosines planted by construction are recovered (siblings, chain, LLaVA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _wshelpers import llava_from_llama, load_all, write_like
from vlsafe.analysis.checkpoints import open_checkpoint
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.taskvectors import aggregate_task_vectors, task_vectors

# planted cos(τ_A, τ_B) per layer (None = outside layers: embed, norm, lm_head)
COS = {0: 0.8, 1: -0.3, None: 0.5}
SCALE = 0.05  # ‖τ‖ relative to ‖W‖


def _layer(name: str) -> int | None:
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


def _taus(base: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """τ_A random; τ_B = c·τ_A + √(1−c²)·τ⊥ with ‖τ⊥‖ = ‖τ_A‖ in every tensor, so each layer's cosine is c."""
    ta, tb = {}, {}
    for k, (name, w) in enumerate(base.items()):
        g = torch.Generator().manual_seed(k)
        a = torch.randn(w.shape, generator=g, dtype=torch.float64)
        a *= SCALE * w.double().norm() / a.norm()
        o = torch.randn(w.shape, generator=g, dtype=torch.float64)
        o -= (o * a).sum() / (a * a).sum() * a
        o *= a.norm() / o.norm()
        c = COS[_layer(name)]
        ta[name], tb[name] = a, c * a + (1 - c * c) ** 0.5 * o
    return ta, tb


@pytest.fixture(scope="module")
def planted(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tv")
    base = load_all(tiny_llama_dir)
    ta, tb = _taus(base)
    a = write_like(tiny_llama_dir, root / "a", lambda n, t: (t.double() + ta[n]).float())
    sib = write_like(tiny_llama_dir, root / "b_sibling", lambda n, t: (t.double() + tb[n]).float())
    chain = write_like(a, root / "b_chain", lambda n, t: (t.double() + tb[n]).float())
    return {"base": tiny_llama_dir, "a": a, "sibling": sib, "chain": chain, "tau_a": ta}


def _check(layers, tau_a: dict[str, torch.Tensor] | None = None) -> None:
    allrows = layers[layers["module"] == "all"].set_index("layer")
    assert allrows.loc[0, "cosine"] == pytest.approx(COS[0], abs=1e-4)
    assert allrows.loc[1, "cosine"] == pytest.approx(COS[1], abs=1e-4)
    outside = layers[layers["layer"].isna()]
    assert outside["cosine"].to_numpy() == pytest.approx(COS[None], abs=1e-4)
    modules = layers[layers["layer"].notna() & (layers["module"] != "all")]
    assert modules["cosine"].to_numpy() == pytest.approx(modules["layer"].map(COS).astype(float).to_numpy(), abs=1e-4)
    if tau_a is not None:
        want = sum(float(t.pow(2).sum()) for n, t in tau_a.items() if _layer(n) == 1) ** 0.5
        assert allrows.loc[1, "norm_a"] == pytest.approx(want, rel=1e-4)
        assert allrows.loc[1, "norm_b"] == pytest.approx(want, rel=1e-4)  # ‖τ_B‖ = ‖τ_A‖ by construction


def test_siblings_recover_planted_cosines(planted: dict) -> None:
    tv = task_vectors(str(planted["base"]), str(planted["a"]), str(planted["sibling"]), mode="siblings",
                      progress=False)
    assert len(tv) == len(open_checkpoint(planted["base"]).infos)
    _check(aggregate_task_vectors(tv), planted["tau_a"])


def test_chain_recovers_planted_cosines(planted: dict) -> None:
    tv = task_vectors(str(planted["base"]), str(planted["a"]), str(planted["chain"]), mode="chain", progress=False)
    _check(aggregate_task_vectors(tv), planted["tau_a"])
    # the same three checkpoints read as siblings give a different (wrong for this construction) answer
    sib = aggregate_task_vectors(task_vectors(str(planted["base"]), str(planted["a"]), str(planted["chain"]),
                                              mode="siblings", progress=False))
    assert sib.query("module == 'all' and layer == 1")["cosine"].item() > 0.5


def test_llava_descendants_exclude_vision_and_use_shared_vocab(planted: dict, tmp_path: Path) -> None:
    """τ_VL = LVLM − LLM and τ_S = SAFE − LVLM where both descendants are LLaVAs with a grown vocabulary."""
    lvlm = llava_from_llama(planted["a"], tmp_path / "lvlm", grow=2)
    ta, tb = _taus(load_all(planted["base"]))

    def safe(name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in tb:
            return t
        t = t.double().clone()
        t[: tb[name].shape[0]] += tb[name]  # the added vocabulary rows move arbitrarily: must be ignored
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            t[tb[name].shape[0]:] += 10.0
        return t.float()
    lvlm_safe = write_like(lvlm, tmp_path / "lvlm_safe", safe)
    tv = task_vectors(str(planted["base"]), str(lvlm), str(lvlm_safe), mode="chain", progress=False)
    assert set(tv["tensor"]) == set(open_checkpoint(planted["base"]).infos)
    assert not tv["tensor"].str.startswith(("vision.", "projector.")).any()
    assert tv.set_index("tensor").loc["model.embed_tokens.weight", "note"].startswith("vocabulary")
    _check(aggregate_task_vectors(tv), ta)


def test_bad_mode_is_refused(planted: dict) -> None:
    with pytest.raises(VlsafeError, match="mode 'sideways'"):
        task_vectors(str(planted["base"]), str(planted["a"]), str(planted["chain"]), mode="sideways")


def test_nonfinite_entries_are_counted_and_left_out(planted: dict, tmp_path: Path) -> None:
    name = "model.layers.0.mlp.up_proj.weight"

    def poison(n: str, t: torch.Tensor) -> torch.Tensor:
        if n != name:
            return t
        t = t.clone()
        t.view(-1)[[0, 5]] = torch.tensor([float("nan"), float("inf")])
        return t
    bad = write_like(planted["sibling"], tmp_path / "bad", poison)
    tv = task_vectors(str(planted["base"]), str(planted["a"]), str(bad), mode="siblings", progress=False)
    row = tv.set_index("tensor").loc[name]
    assert row["nonfinite"] == 2 and "2 non-finite entries excluded" in row["note"]
    w0, wa, wb = (load_all(p)[name].double().reshape(-1) for p in (planted["base"], planted["a"], bad))
    ok = torch.isfinite(wb)
    ta, tb = (wa - w0)[ok], (wb - w0)[ok]
    assert row["cosine"] == pytest.approx(float(ta @ tb / (ta.norm() * tb.norm())), rel=1e-12)
    assert tv["nonfinite"].sum() == 2
