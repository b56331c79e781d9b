"""Weight shift, spectra and dynamics against planted ground truth in real-format tiny checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from _wshelpers import llava_from_llama, load_all, relative_shift, shift_one, tiny_gpt_neox, write_like
from vlsafe.analysis.checkpoints import open_checkpoint
from vlsafe.analysis.dynamics import dynamics, parse_step
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.spectral import effective_rank, spectrum, stable_rank
from vlsafe.analysis.weightshift import aggregate_layers, diff_checkpoints, unpaired

TARGET = "model.layers.1.mlp.down_proj.weight"
EPS = 0.03
METRICS = ["rel_frobenius", "cosine", "max_abs", "frac_changed", "sq_norm_a", "sq_norm_b", "sq_norm_delta", "dot_ab"]


@pytest.fixture(scope="module")
def shifted_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_like(tiny_llama_dir, tmp_path_factory.mktemp("ws") / "shifted", shift_one(TARGET, EPS))


def _diff(a, b, **kw) -> pd.DataFrame:
    return diff_checkpoints(str(a), [str(b)], progress=False, **kw)


def test_planted_shift_shows_in_exactly_one_row(tiny_llama_dir: Path, shifted_dir: Path) -> None:
    df = _diff(tiny_llama_dir, shifted_dir)
    assert (df["status"] == "paired").all() and len(df) == len(open_checkpoint(tiny_llama_dir).infos)
    hit = df.set_index("tensor").loc[TARGET]
    assert hit["rel_frobenius"] == pytest.approx(EPS, rel=1e-5)
    assert hit["frac_changed"] > 0.9
    w0, w1 = load_all(tiny_llama_dir)[TARGET].double(), load_all(shifted_dir)[TARGET].double()
    assert hit["max_abs"] == pytest.approx(float((w1 - w0).abs().max()), rel=1e-12)
    assert hit["cosine"] == pytest.approx(float((w0 * w1).sum() / (w0.norm() * w1.norm())), abs=1e-12)
    rest = df[df["tensor"] != TARGET]
    assert (rest["rel_frobenius"] == 0).all() and (rest["frac_changed"] == 0).all()
    assert rest["cosine"].to_numpy() == pytest.approx(1.0, abs=1e-12)


def test_layer_aggregate_is_sum_based(tiny_llama_dir: Path, shifted_dir: Path) -> None:
    layers = aggregate_layers(_diff(tiny_llama_dir, shifted_dir)).set_index(["layer", "module"])
    assert layers.loc[(1, "mlp.down_proj"), "rel_frobenius"] == pytest.approx(EPS, rel=1e-5)
    # Expected layer-1 value computed independently: concatenate every layer-1 tensor, fp64.
    a, b = load_all(tiny_llama_dir), load_all(shifted_dir)
    names = [n for n in a if n.startswith("model.layers.1.")]
    va = torch.cat([a[n].double().flatten() for n in names])
    vb = torch.cat([b[n].double().flatten() for n in names])
    assert layers.loc[(1, "all"), "rel_frobenius"] == pytest.approx(float((vb - va).norm() / va.norm()), rel=1e-9)
    assert layers.loc[(1, "all"), "cosine"] == pytest.approx(float(va @ vb / (va.norm() * vb.norm())), abs=1e-12)
    assert layers.loc[(0, "all"), "rel_frobenius"] == 0.0
    other = layers.drop(index=[(1, "mlp.down_proj"), (1, "all")])
    assert (other["rel_frobenius"] == 0).all()
    non_layer = layers.reset_index()
    assert set(non_layer[non_layer["layer"].isna()]["module"]) == {"embed", "norm", "lm_head"}


def test_isotropic_noise_gives_known_cosine(tiny_llama_dir: Path, tmp_path: Path) -> None:
    eps = 0.2
    post = write_like(tiny_llama_dir, tmp_path / "noisy",
                      lambda n, t: relative_shift(t, eps, seed=len(n), orthogonal=True))
    df = _diff(tiny_llama_dir, post)
    want = 1 / math.sqrt(1 + eps**2)
    assert df["cosine"].to_numpy() == pytest.approx(want, abs=1e-6)
    assert df["rel_frobenius"].to_numpy() == pytest.approx(eps, rel=1e-5)
    layers = aggregate_layers(df)
    assert layers["cosine"].to_numpy() == pytest.approx(want, abs=1e-6)


def test_llm_vs_llava_pairs_language_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    lvlm = llava_from_llama(tiny_llama_dir, tmp_path / "llava", grow=2, fn=shift_one(TARGET, EPS))
    df = _diff(tiny_llama_dir, lvlm)
    paired = df[df["status"] == "paired"].set_index("tensor")
    assert paired.loc[TARGET, "rel_frobenius"] == pytest.approx(EPS, rel=1e-5)
    assert (paired.drop(index=TARGET)["rel_frobenius"] == 0).all()
    vocab = open_checkpoint(tiny_llama_dir).config["vocab_size"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert "vocabulary" in paired.loc[name, "note"] and paired.loc[name, "shape"] == f"{vocab}x64"
    ck = open_checkpoint(lvlm)
    only_b = set(unpaired(df).query("status == 'only_in_b'")["tensor"])
    assert only_b == set(ck.names("vision")) | set(ck.names("projector")) and only_b
    assert not (df["status"] == "only_in_a").any()
    rev = _diff(lvlm, tiny_llama_dir)
    assert set(rev.query("status == 'only_in_a'")["tensor"]) == only_b


def test_sharded_equals_single_file_and_chunking_invariant(tiny_llama_dir: Path, shifted_dir: Path,
                                                            tmp_path: Path) -> None:
    sharded = write_like(tiny_llama_dir, tmp_path / "sharded", shards=3)
    assert len(open_checkpoint(sharded).source.files) == 3
    ref = _diff(tiny_llama_dir, shifted_dir).set_index("tensor").sort_index()
    for a, b, kw in [(sharded, shifted_dir, {}), (shifted_dir, sharded, {}),
                     (tiny_llama_dir, shifted_dir, {"chunk_elems": 100, "prefetch": False})]:
        got = _diff(a, b, **kw).set_index("tensor").sort_index()
        if a == shifted_dir:  # reversed direction: compare the symmetric quantities
            assert got["dot_ab"].to_numpy() == pytest.approx(ref["dot_ab"].to_numpy(), rel=1e-12)
            assert got["sq_norm_delta"].to_numpy() == pytest.approx(ref["sq_norm_delta"].to_numpy(), rel=1e-12)
            continue
        pd.testing.assert_frame_equal(got[METRICS], ref[METRICS], rtol=1e-12, atol=0)


def test_bf16_inputs_accumulate_in_fp64(tiny_llama_dir: Path, tmp_path: Path) -> None:
    pre = write_like(tiny_llama_dir, tmp_path / "pre16", lambda n, t: t.bfloat16())
    post = write_like(pre, tmp_path / "post16", lambda n, t: (t.float() * 1.01).bfloat16() if "q_proj" in n else t)
    assert open_checkpoint(post).dtype == "BF16"
    df = _diff(pre, post).set_index("tensor")
    a, b = load_all(pre), load_all(post)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        x, y = a[name].double(), b[name].double()
        assert df.loc[name, "rel_frobenius"] == pytest.approx(float((y - x).norm() / x.norm()), rel=1e-12, abs=0)
        assert df.loc[name, "sq_norm_a"] == pytest.approx(float((x * x).sum()), rel=1e-12)


def test_nonfinite_entries_are_flagged_not_fatal(tiny_llama_dir: Path, tmp_path: Path) -> None:
    def poison(name: str, t: torch.Tensor) -> torch.Tensor:
        if name != TARGET:
            return t
        t = t.clone()
        t.view(-1)[3], t.view(-1)[7] = float("nan"), float("inf")
        return t
    post = write_like(tiny_llama_dir, tmp_path / "nan", poison)
    df = _diff(tiny_llama_dir, post, spectral=True).set_index("tensor")
    row = df.loc[TARGET]
    assert row["nonfinite"] == 2 and "non-finite" in row["note"]
    assert row["rel_frobenius"] == 0.0 and math.isfinite(row["cosine"])
    assert row["spectral_method"].startswith("skipped")
    assert (df.drop(index=TARGET)["nonfinite"] == 0).all()
    layers = aggregate_layers(df.reset_index()).set_index(["layer", "module"])
    assert layers.loc[(1, "all"), "nonfinite"] == 2 and math.isfinite(layers.loc[(1, "all"), "rel_frobenius"])


def test_shape_mismatch_names_tensor_or_reports_row(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from vlsafe.analysis.tiny import tiny_llama

    other = tiny_llama(tmp_path / "wide", intermediate_size=96)
    with pytest.raises(VlsafeError, match=r"tensor 'model\.layers\.\d\.mlp\.\w+_proj\.weight': shape"):
        _diff(tiny_llama_dir, other)
    df = _diff(tiny_llama_dir, other, allow_mismatch=True)
    bad = df[df["status"] == "shape_mismatch"]
    assert len(bad) == 6 and set(bad["module"]) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert bad["rel_frobenius"].isna().all() and (df["status"] == "paired").sum() == len(df) - 6


def test_unrelated_architecture_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    neox = tiny_gpt_neox(tmp_path / "neox")
    with pytest.raises(VlsafeError, match=r"share only \d+ of \d+/\d+ language-model tensor names.*only in A"):
        _diff(tiny_llama_dir, neox)


# ---- spectra --------------------------------------------------------------------------------------------
def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_known_rank_gives_stable_and_effective_rank(rank: int) -> None:
    delta = 0.5 * _orthonormal(96, rank, 0) @ _orthonormal(64, rank, 1).T  # rank r, all σ = 0.5
    sp = spectrum(delta, top_k=8)
    assert sp.method == "exact"
    assert sp.stable_rank == pytest.approx(rank, rel=1e-9)
    assert sp.effective_rank == pytest.approx(rank, rel=1e-6)
    assert sp.sigma[:rank].tolist() == pytest.approx([0.5] * rank, rel=1e-9)


def test_rank_helpers_on_explicit_spectra() -> None:
    s = torch.tensor([3.0, 4.0])
    assert stable_rank(s) == pytest.approx(25 / 16)
    p = torch.tensor([3 / 7, 4 / 7])
    assert effective_rank(s) == pytest.approx(math.exp(-float((p * p.log()).sum())))
    assert math.isnan(effective_rank(torch.zeros(3)))


def test_randomized_spectrum_within_stated_error() -> None:
    u, v = _orthonormal(300, 40, 2), _orthonormal(200, 40, 3)
    s = torch.tensor([0.7**i for i in range(40)], dtype=torch.float64)
    a = (u * s) @ v.T
    sp = spectrum(a.float(), top_k=8, exact_max_numel=1000, niter=4)
    assert sp.method.startswith("randomized")
    err = (sp.sigma - s[:8]).abs().max()
    assert float(err) <= sp.error_bound * float(s[0]) + 1e-6
    assert sp.error_bound < 1e-3
    assert sp.stable_rank == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-3)


def test_subspace_overlap_planted() -> None:
    u0, v0 = _orthonormal(80, 80, 4), _orthonormal(60, 60, 5)
    w0 = (u0[:, :60] * torch.linspace(2, 0.1, 60, dtype=torch.float64)) @ v0.T
    same = u0[:, :4] @ _orthonormal(60, 4, 6).T  # ΔW in W₀'s top-4 left subspace
    other = u0[:, 10:14] @ _orthonormal(60, 4, 7).T  # ⟂ to it
    assert spectrum(same, w0, top_k=4).subspace_overlap == pytest.approx(1.0, abs=1e-9)
    assert spectrum(other, w0, top_k=4).subspace_overlap == pytest.approx(0.0, abs=1e-9)


def test_diff_spectral_columns_on_planted_low_rank(tiny_llama_dir: Path, tmp_path: Path) -> None:
    def low_rank(name: str, t: torch.Tensor) -> torch.Tensor:
        if name != TARGET:
            return t
        return (t.double() + 0.05 * _orthonormal(t.shape[0], 2, 8) @ _orthonormal(t.shape[1], 2, 9).T).float()
    post = write_like(tiny_llama_dir, tmp_path / "lowrank", low_rank)
    df = _diff(tiny_llama_dir, post, spectral=True).set_index("tensor")
    row = df.loc[TARGET]
    assert row["stable_rank"] == pytest.approx(2, rel=1e-3) and row["effective_rank"] == pytest.approx(2, rel=1e-3)
    assert [float(x) for x in row["top_sigma"].split(";")][:2] == pytest.approx([0.05, 0.05], rel=1e-3)
    assert 0.0 <= row["subspace_overlap"] <= 1.0
    assert (df.drop(index=TARGET).query("shape.str.contains('x')")["spectral_method"] == "zero").all()
    assert pd.isna(df.loc["model.norm.weight", "spectral_method"])  # 1-D tensors have no spectrum


# ---- dynamics -------------------------------------------------------------------------------------------
def test_parse_step() -> None:
    assert parse_step("lvlm-step-40") == 40
    assert parse_step("/x/llava-tulu2sft-ckpt-5600/") == 5600
    assert parse_step("checkpoint_500") == 500
    assert parse_step("llm") is None


def test_dynamics_recovers_monotone_shifts(tiny_llama_dir: Path, tmp_path: Path) -> None:
    eps = {10: 0.01, 20: 0.02, 40: 0.05}  # layer 0 moves, layer 1 stays
    posts = [write_like(tiny_llama_dir, tmp_path / f"run-step-{s}",
                        lambda n, t, e=e: relative_shift(t, e, seed=len(n)) if ".layers.0." in n else t)
             for s, e in eps.items()]
    dyn = dynamics([str(tiny_llama_dir), *map(str, posts)], progress=False)
    l0 = dyn[(dyn["layer"] == 0)].sort_values("index")
    assert l0["step"].tolist() == [0, 10, 20, 40]
    assert l0["rel_frobenius"].tolist() == pytest.approx([0.0, *eps.values()], rel=1e-5)
    assert l0["cosine"].is_monotonic_decreasing
    assert (dyn[dyn["layer"] == 1]["rel_frobenius"] == 0).all()
    assert set(dyn[dyn["layer"].isna()]["module"]) == {"embed", "norm", "lm_head"}


def test_pickle_checkpoint_streams_like_safetensors(tiny_llama_dir: Path, shifted_dir: Path, tmp_path: Path) -> None:
    """A `.bin` state dict (opened with allow_pickle) pairs and measures exactly like its safetensors twin."""
    import shutil

    pkl = tmp_path / "pickled"
    pkl.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", pkl / "config.json")
    torch.save(load_all(tiny_llama_dir), pkl / "pytorch_model.bin")
    ck = open_checkpoint(pkl, allow_pickle=True)
    got = diff_checkpoints(ck, [str(shifted_dir)], progress=False, chunk_elems=1000).set_index("tensor").sort_index()
    ref = _diff(tiny_llama_dir, shifted_dir).set_index("tensor").sort_index()
    pd.testing.assert_frame_equal(got[METRICS], ref[METRICS], rtol=1e-12, atol=0)
