"""Streaming executor: LVLM-aware merges, layer-targeted plans, one tensor group in memory, sharded atomic
output, `vlsafe merge`, and one-line errors for bad inputs."""

from __future__ import annotations

import itertools
import json
import weakref
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlsafe.analysis.checkpoints import open_checkpoint
from vlsafe.analysis.errors import VlsafeError
from vlsafe.analysis.merging import MergePlan, run_merge
from vlsafe.analysis.merging.io import MergeReader, ShardedWriter
from vlsafe.analysis.merging.plans import (diff_scores, first_layer_reaching, layers_from, plan_proportional,
                                            plan_restore_layers)

EXTRA_ROWS = 2  # the LVLM's vocabulary extends the LLM's by two rows (like LLaVA's <image>, <pad>)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import LlamaConfig

    from vlsafe.analysis.tiny import tiny_llama, tiny_llava

    root = tmp_path_factory.mktemp("exec")
    out = {f"llm{i}": tiny_llama(root / f"llm{i}", seed=20 + i) for i in range(3)}
    text = LlamaConfig.from_pretrained(out["llm0"])
    text.vocab_size += EXTRA_ROWS
    out["lvlm"] = tiny_llava(root / "lvlm", text_config=text, seed=31)
    out["lvlm2"] = tiny_llava(root / "lvlm2", text_config=text, seed=32)
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    c = open_checkpoint(path)
    return dict(c.iter_tensors())


def _plan(**kw) -> MergePlan:
    return MergePlan.from_dict({k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()})


def test_lvlm_plus_llm_merges_language_model_only(models, tmp_path):
    alpha = 0.3
    lvlm, llm = models["lvlm"], models["llm0"]
    out = run_merge(_plan(merge_method="task_arithmetic", base_model=lvlm,
                          models=[{"model": str(llm), "parameters": {"weight": alpha}}]), tmp_path / "m", progress=False)
    merged, before = load_file(out / "model.safetensors"), load_file(lvlm / "model.safetensors")
    assert set(merged) == set(before)  # the LVLM's raw names and layout
    for k in before:
        if k.startswith(("vision_tower.", "multi_modal_projector.")):
            assert torch.equal(merged[k], before[k]), k
    emb = "language_model.model.embed_tokens.weight"
    assert torch.equal(merged[emb][-EXTRA_ROWS:], before[emb][-EXTRA_ROWS:])
    assert not torch.equal(merged[emb][:-EXTRA_ROWS], before[emb][:-EXTRA_ROWS])

    from transformers import AutoModelForImageTextToText, AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

    reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "LlavaForConditionalGeneration"
    # reference: a LLaVA whose language model is the LLM-space merge, transplanted by in-memory names
    ref = LlavaForConditionalGeneration.from_pretrained(lvlm).eval()
    text_llm = LlamaForCausalLM.from_pretrained(llm).eval()
    with torch.no_grad():
        pairs = list(zip(ref.model.language_model.state_dict().items(), text_llm.model.state_dict().items()))
        pairs.append((("lm_head", ref.lm_head.weight), ("lm_head", text_llm.lm_head.weight)))
        for (k, p), (k2, q) in pairs:
            assert k == k2
            rows = q.shape[0]
            p[:rows] += alpha * (q - p[:rows])
    ids = AutoTokenizer.from_pretrained(out)(["How do I bake bread?"], return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = reloaded(input_ids=ids).logits, ref(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-5
    run = json.loads((out / "run.json").read_text())
    copied = {t["module"] for t in run["tensors"] if t["action"] == "copy"}
    assert copied == {"vision", "projector"} and run["command"] == "merge"
    assert run["kind"] == "merge" and run["tables"] == {}
    assert (out / "mergekit.yaml").is_file() and (out / "processor_config.json").is_file()


def test_two_lvlms_merge_every_tensor(models, tmp_path):
    out = run_merge(_plan(merge_method="linear", models=[{"model": str(models["lvlm"]), "parameters": {"weight": 1}},
                                                         {"model": str(models["lvlm2"]), "parameters": {"weight": 1}}]),
                    tmp_path / "m", progress=False)
    a, b, m = (load_file(p / "model.safetensors") for p in (models["lvlm"], models["lvlm2"], out))
    for k in a:
        assert torch.allclose(m[k], (a[k] + b[k]) / 2, atol=1e-6), k
    assert {t["action"] for t in json.loads((out / "run.json").read_text())["tensors"]} == {"merge"}


def test_restore_plan_touches_exactly_the_chosen_layers(models, tmp_path):
    plan = plan_restore_layers(str(models["llm0"]), str(models["llm1"]), layers=[1], alpha=0.5)
    out = run_merge(plan, tmp_path / "m", progress=False)
    a, b, m = (_weights(p) for p in (models["llm0"], models["llm1"], out))
    for k in a:
        if k.startswith("model.layers.1."):
            assert torch.allclose(m[k], a[k] + 0.5 * (b[k] - a[k]), atol=1e-6), k
            assert torch.equal(a[k], b[k]) or not torch.equal(m[k], a[k]), k  # (norms start at 1 in both)
        else:
            assert torch.equal(m[k], a[k]), k


def test_proportional_plan_from_a_diff_table(models, tmp_path):
    table = tmp_path / "layers.csv"
    pd.DataFrame({"layer": [0, 0, 1, 1], "module": ["all", "q_proj", "all", "q_proj"],
                  "rel_frobenius": [0.2, 0.9, 0.8, 0.1], "cosine": [0.9] * 4}).to_csv(table, index=False)
    plan = plan_proportional(diff_scores(table), 0.6, base=str(models["llm0"]), target=str(models["llm1"]))
    out = run_merge(plan, tmp_path / "m", progress=False)
    a, b, m = (_weights(p) for p in (models["llm0"], models["llm1"], out))
    lam = {0: 0.6 * 0.2 / 0.8, 1: 0.6}
    for k in a:
        layer = int(k.split(".")[2]) if k.startswith("model.layers.") else None
        want = a[k] if layer is None else a[k] + lam[layer] * (b[k] - a[k])
        assert torch.allclose(m[k], want, atol=1e-6), k


def test_first_layer_reaching_and_layers_from():
    scores = pd.Series({0: 0.5, 1: 0.7, 2: 0.81, 3: 0.79, 4: 0.95})
    assert first_layer_reaching(scores, 0.8) == 2
    assert first_layer_reaching(scores, 0.81) == 2                    # reaching includes equality
    assert first_layer_reaching({3: 0.9, 1: 0.85}, 0.8) == 1          # by layer, not by insertion order
    with pytest.raises(VlsafeError, match="no layer reaches 0.99"):
        first_layer_reaching(scores, 0.99)
    assert layers_from(3, 4, 5) == [3, 4]
    with pytest.raises(VlsafeError, match="outside a 5-layer model"):
        layers_from(5, 1, 5)


def test_streaming_keeps_at_most_two_tensor_groups_alive(models, tmp_path, monkeypatch):
    """Pipelined: while one group computes, the next loads and the previous output writes; never more."""
    import threading

    lock = threading.Lock()
    alive: dict[int, str] = {}
    seen = {"reads": 0, "peak_group": 0, "peak_names": 0}
    original = MergeReader.get

    def tracked(self, name):
        with lock:
            stale = {n for n in alive.values() if n != name}
            assert len(stale) <= 1, f"{sorted(stale)} still alive while reading {name}"
        t = original(self, name)
        with lock:
            seen["reads"] += 1
            key = seen["reads"]
            alive[key] = name
            weakref.finalize(t, lambda k=key: alive.pop(k, None))
            seen["peak_group"] = max(seen["peak_group"], len(alive))
            seen["peak_names"] = max(seen["peak_names"], len(set(alive.values())))
        return t

    written: dict[int, str] = {}
    counter = itertools.count()
    write = ShardedWriter.write

    def tracked_write(self, name, tensor):
        with lock:
            assert len(written) <= 1, f"outputs {sorted(written.values())} still alive while writing {name}"
            key = next(counter)
            written[key] = name
            weakref.finalize(tensor, lambda k=key: written.pop(k, None))
        return write(self, name, tensor)

    monkeypatch.setattr(MergeReader, "get", tracked)
    monkeypatch.setattr(ShardedWriter, "write", tracked_write)
    plan = _plan(merge_method="ties", base_model=models["llm0"],
                 models=[{"model": str(models[f"llm{i}"]), "parameters": {"weight": 0.5, "density": 0.5}} for i in (1, 2)])
    run_merge(plan, tmp_path / "m", progress=False)
    n_tensors = len(open_checkpoint(models["llm0"]).infos)
    assert seen["reads"] == 3 * n_tensors
    assert 3 <= seen["peak_group"] <= 6 and seen["peak_names"] <= 2


def test_ties_index_tie_break_from_yaml(models, tmp_path, monkeypatch):
    from vlsafe.analysis.merging import operators

    seen: list[str] = []
    prune = operators.magnitude_prune

    def recording(delta, density, rescale=False, tie_break="sort"):
        seen.append(tie_break)
        return prune(delta, density, rescale, tie_break)

    monkeypatch.setattr(operators, "magnitude_prune", recording)
    ms = [{"model": str(models[f"llm{i}"]), "parameters": {"weight": 0.5, "density": 0.4}} for i in (1, 2)]
    exact = run_merge(_plan(merge_method="ties", base_model=models["llm0"], models=ms), tmp_path / "sort",
                      progress=False)
    assert seen and set(seen) == {"sort"}
    seen.clear()
    plan = _plan(merge_method="ties", base_model=models["llm0"], models=ms, parameters={"tie_break": "index"})
    fast = run_merge(plan, tmp_path / "index", progress=False)
    assert seen and set(seen) == {"index"}                 # the YAML's choice reaches every trim
    a, b = _weights(exact), _weights(fast)
    # random fp32 weights have no ties at the trim threshold: the same entries survive, so the same merge
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "mergekit ignores it" in plan.to_mergekit_yaml()
    bad = _plan(merge_method="ties", base_model=models["llm0"], models=ms, parameters={"tie_break": "random"})
    with pytest.raises(VlsafeError, match="tie_break 'random'"):
        run_merge(bad, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_sharded_output_round_trips(models, tmp_path):
    plan = _plan(merge_method="task_arithmetic", base_model=models["llm0"],
                 models=[{"model": str(models["llm1"]), "parameters": {"weight": 0.5}}])
    one = run_merge(plan, tmp_path / "one", progress=False)
    many = run_merge(plan, tmp_path / "many", out_shard_size="40KB", progress=False)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    a, b = _weights(one), _weights(many)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(many)).__name__ == "LlamaForCausalLM"


def test_cli_merge_and_errors(models, tmp_path, capsys):
    from vlsafe.experiments.cli import main

    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": str(models["llm0"]),
                                   "models": [{"model": str(models["llm1"])}], "parameters": {"t": [0.0, 1.0]}}))
    assert main(["merge", str(cfg), "-o", str(tmp_path / "out"), "--out-shard-size", "60KB", "--quiet"]) == 0
    out = tmp_path / "out"
    assert {"run.json", "mergekit.yaml", "model.safetensors.index.json", "config.json"} <= {p.name for p in out.iterdir()}
    m, a, b = (_weights(p) for p in (out, models["llm0"], models["llm1"]))
    assert torch.equal(m["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"])  # t=0
    assert torch.allclose(m["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"], atol=1e-6)
    cfg.write_text("merge_method: slerp\nmodels: [{model: x}]\n")
    assert main(["merge", str(cfg), "-o", str(tmp_path / "bad")]) == 2
    assert "merge_method 'slerp' needs a base_model" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def _nothing_written(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not any(p.name.startswith(f".{name}.") for p in parent.iterdir())


def test_bad_inputs_fail_before_writing(models, tmp_path):
    from vlsafe.analysis.tiny import tiny_llama

    odd = tiny_llama(tmp_path / "odd", seed=1, intermediate_size=96)
    short = tiny_llama(tmp_path / "short", seed=1, layers=1)
    cases = [
        (dict(models=[{"model": str(tmp_path / "missing"), "parameters": {"weight": 1}}]), "missing: no such file"),
        (dict(models=[{"model": str(odd), "parameters": {"weight": 1}}]),
         r"model\.layers\.\d\.mlp\.\w+_proj\.weight: shape \(\d+, \d+\) in .*odd does not match"),
        (dict(models=[{"model": str(models["llm1"]), "parameters": {"weight": 1}}], layers=[9]),
         "layer 9 out of range"),
        (dict(base_model=models["lvlm"], models=[{"model": str(short), "parameters": {"weight": 1}}]),
         r"model\.layers\.1\.[\w.]+: language-model tensor missing from .*short"),
    ]
    for kw, match in cases:
        kw = {"base_model": models["llm0"], **kw}
        with pytest.raises(VlsafeError, match=match):
            run_merge(_plan(merge_method="task_arithmetic", **kw), tmp_path / "o", progress=False)
        assert _nothing_written(tmp_path, "o")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    plan = _plan(merge_method="linear", models=[{"model": str(models["llm0"]), "parameters": {"weight": 1}}])
    with pytest.raises(VlsafeError, match="not an earlier vlsafe run folder"):
        run_merge(plan, foreign, progress=False)
    with pytest.raises(VlsafeError, match="output folder is or holds an input"):
        run_merge(plan, models["llm0"], progress=False)


def test_failure_mid_merge_leaves_nothing(models, tmp_path, monkeypatch):
    import vlsafe.analysis.merging.executor as ex

    calls = {"n": 0}
    real = ex.methods.apply

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise VlsafeError("density 2 is outside (0, 1]")
        return real(*args, **kwargs)

    monkeypatch.setattr(ex.methods, "apply", flaky)
    plan = _plan(merge_method="task_arithmetic", base_model=models["llm0"],
                 models=[{"model": str(models["llm1"]), "parameters": {"weight": 0.5}}])
    with pytest.raises(VlsafeError, match=r"^model\.[\w.]+: density 2 is outside"):
        run_merge(plan, tmp_path / "o", progress=False)
    assert _nothing_written(tmp_path, "o")


@pytest.mark.smollm2
def test_smollm2_streams_and_reloads(smollm2_dir, tmp_path):
    plan = MergePlan.from_dict({"merge_method": "task_arithmetic", "base_model": "default",
                                "models": [{"model": "default", "parameters": {"weight": 0.5}}]})
    out = run_merge(plan, tmp_path / "m", out_shard_size="200MB", progress=False)
    merged, base = open_checkpoint(out), open_checkpoint("default")
    assert merged.family.name == "llama" and merged.infos.keys() == base.infos.keys()  # tied head: no lm_head added
    assert len(merged.source.files) == 3
    for name in ("model.embed_tokens.weight", "model.layers.17.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(merged.get_tensor(name), base.get_tensor(name))  # θ + 0.5·(θ − θ) = θ exactly
    assert str(smollm2_dir) in (out / "mergekit.yaml").read_text()  # 'default' exported as its converted dir
    assert merged.load_model().model.config.num_hidden_layers == 30


def test_selection_typos_are_errors(models, tmp_path):
    for kw, match in ((dict(modules=["mpl"]), r"modules: 'mpl' matches no tensor .*modules there: .*mlp.down_proj"),
                      (dict(layers=[]), r"select no tensor")):
        plan = _plan(merge_method="task_arithmetic", base_model=models["llm0"],
                     models=[{"model": str(models["llm1"]), "parameters": {"weight": 0.5}}], **kw)
        with pytest.raises(VlsafeError, match=match):
            run_merge(plan, tmp_path / "o", progress=False)
        assert _nothing_written(tmp_path, "o")


def test_tokenizer_source_and_chat_template(models, tmp_path):
    import shutil

    donor = tmp_path / "donor"
    shutil.copytree(models["llm1"], donor)
    cfg = json.loads((donor / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 1234
    (donor / "tokenizer_config.json").write_text(json.dumps(cfg))
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    plan = _plan(merge_method="task_arithmetic", base_model=models["llm0"], tokenizer_source=str(donor),
                 chat_template=template, dtype="bfloat16",
                 models=[{"model": str(models["llm1"]), "parameters": {"weight": 0.5}}])
    out = run_merge(plan, tmp_path / "m", progress=False)
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 1234
    assert (out / "chat_template.jinja").read_text() == template
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # dtype without out_dtype: as mergekit
    assert open_checkpoint(out).dtype == "BF16"


def test_direct_io_merge_equals_buffered_merge(models, tmp_path, monkeypatch):
    """Inputs larger than memory are read with O_DIRECT (the shared `vlsafe.analysis.streaming` reader); the merged
    weights are bit-identical to buffered reads, the tied-head fallback included."""
    import os

    import vlsafe.analysis.streaming as S

    src = open_checkpoint(models["llm1"]).source.files[0]
    try:
        os.close(os.open(src, os.O_RDONLY | os.O_DIRECT))
    except (OSError, AttributeError):
        pytest.skip(f"the file system of {src} refuses O_DIRECT")
    plan = _plan(merge_method="ties", base_model=models["llm0"],
                 models=[{"model": str(models[f"llm{i}"]), "parameters": {"weight": 0.5, "density": 0.5}}
                         for i in (1, 2)])
    monkeypatch.setenv("VLSAFE_DIRECT_IO", "0")
    buffered = _weights(run_merge(plan, tmp_path / "buffered", progress=False))
    monkeypatch.setenv("VLSAFE_DIRECT_IO", "1")
    monkeypatch.setattr(S, "DIRECT_MIN_BYTES", 0)  # tiny tensors: send every read through O_DIRECT
    used = []
    real = S.read_direct
    monkeypatch.setattr(S, "read_direct", lambda *a: used.append(a[2]) or real(*a))
    direct = _weights(run_merge(plan, tmp_path / "direct", progress=False))
    assert len(used) >= 3 * len(buffered) - 3  # every input tensor (a tied head may be absent) came via O_DIRECT
    assert buffered.keys() == direct.keys() and all(torch.equal(buffered[k], direct[k]) for k in buffered)
