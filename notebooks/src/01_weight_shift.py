# %% [markdown]
# # 01 · Where did the weights move?
#
# **Question.** When an LLM is adapted into a LLaVA-style vision-language model, which layers and modules of its
# language model move, and does a later safety-tuning update point along the adaptation or against it?
#
# We open checkpoints lazily (names, shapes, dtypes; tensors are streamed one at a time), pair the LLM with the
# LVLM's language model **by canonical name**, and measure per tensor and per layer: relative Frobenius change,
# cosine, task-vector geometry over three checkpoints, and the shift along a sequence of training steps.
#
# With `REAL = False` everything runs on tiny random checkpoints built below in a few seconds, with the answer
# planted: exactly one layer is moved a lot, every other tensor only a little. With `REAL = True` the same cells
# run on real checkpoints (see the first code cell).

# %%
REAL = False  # True: the real checkpoints below instead of tiny planted ones
SEED = 0
PROGRESS = REAL  # progress bars for the long streaming passes

from pathlib import Path

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()  # the repository (outputs: runs/)
OUT = Path("runs") / "nb01_weight_shift"
# REAL = True: the paper's pair (local HF dirs or hub ids already in the HF cache) ...
REAL_PRE, REAL_POST = "meta-llama/Llama-2-7b-chat-hf", "llava-hf/llava-1.5-7b-hf"
# ... and, for task vectors and dynamics, the model organism (`vlsafe demo` or `vlsafe organism -o ...`).
ORGANISM = ROOT / "runs" / "demo" / "organism"

# %%
# %matplotlib inline
from vlsafe.experiments.notebook import setup

setup(SEED, OUT)  # offline, quiet, seeded: before anything imports transformers

import json

import pandas as pd
import torch
from IPython.display import display

# %% [markdown]
# ## 1 · Checkpoints
#
# The tiny LVLM is a real `LlavaForConditionalGeneration` (CLIP tower, projector) whose language model starts as a
# copy of the tiny LLM, transplanted by name. Then we plant the adaptation update τ_VL: 5 % relative change on
# every tensor of layer `PLANTED_LAYER`, 0.1 % elsewhere. Checkpoints `lvlm-step-10/20/30` hold 1/3, 2/3 and all of
# τ_VL, and a "safety-tuned" LVLM adds τ_S = −½ τ_VL on the planted layer (it undoes half the adaptation
# there) and independent 0.1 % noise elsewhere.

# %%
from vlsafe.analysis.dynamics import parse_step
from vlsafe.analysis.names import layer_module
from vlsafe.analysis.tiny import tiny_llama, tiny_llava_from

PLANTED_LAYER, N_LAYERS = 2, 4
PLANTED_EPS, BACKGROUND_EPS = 0.05, 1e-3  # relative size of τ_VL on the planted layer and elsewhere


def relative_noise(w: torch.Tensor, eps: float, gen: torch.Generator) -> torch.Tensor:
    """A random update of norm eps·‖w‖."""
    n = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    return eps * w.double().norm() * n / n.norm()


def save_lvlm(lvlm, processor, params: dict, path: Path) -> Path:
    """Write the LVLM with its language-model tensors replaced by `params` (text-Llama names)."""
    with torch.no_grad():
        for name, p in lvlm.model.language_model.named_parameters():
            p.copy_(params[name].to(p.dtype))
    lvlm.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny(root: Path) -> dict:
    llm_dir = tiny_llama(root / "llm", layers=N_LAYERS, seed=SEED)
    lvlm, processor, llm = tiny_llava_from(llm_dir, root / "lvlm-init", seed=SEED + 1)  # LM transplanted by name
    gen = torch.Generator().manual_seed(SEED)
    base = {n: p.detach().double() for n, p in llm.model.named_parameters()}
    planted = lambda n: layer_module("model." + n)[0] == PLANTED_LAYER  # noqa: E731
    tau_vl = {n: relative_noise(w, PLANTED_EPS if planted(n) else BACKGROUND_EPS, gen) for n, w in base.items()}
    tau_s = {n: -0.5 * tau_vl[n] if planted(n) else relative_noise(w, BACKGROUND_EPS, gen) for n, w in base.items()}
    paths = {"llm": llm_dir}
    for k, step in enumerate((10, 20, 30), start=1):
        paths[f"lvlm-step-{step}"] = save_lvlm(lvlm, processor, {n: w + k / 3 * tau_vl[n] for n, w in base.items()},
                                               root / f"lvlm-step-{step}")
    paths["lvlm"] = save_lvlm(lvlm, processor, {n: w + tau_vl[n] for n, w in base.items()}, root / "lvlm")
    paths["lvlm-safe"] = save_lvlm(lvlm, processor, {n: w + tau_vl[n] + tau_s[n] for n, w in base.items()},
                                   root / "lvlm-safe")
    return paths


if REAL and not (ORGANISM / "lvlm" / "config.json").is_file():
    raise FileNotFoundError(f"{ORGANISM}: no model organism; build it first (`vlsafe demo`, or notebook 04 "
                            "with REAL = True)")
if REAL:
    PRE, POST = REAL_PRE, REAL_POST
    TV = [ORGANISM / "llm-aligned", ORGANISM / "lvlm", ORGANISM / "lvlm-safety-posthoc"]
    STEPS = [ORGANISM / "llm-aligned", *sorted(ORGANISM.glob("lvlm-step-*"), key=lambda p: parse_step(p.name))]
else:
    paths = build_tiny(OUT / "checkpoints")
    PRE, POST = paths["llm"], paths["lvlm"]
    TV = [paths["llm"], paths["lvlm"], paths["lvlm-safe"]]
    STEPS = [paths["llm"], paths["lvlm-step-10"], paths["lvlm-step-20"], paths["lvlm-step-30"]]
print("PRE :", PRE, "\nPOST:", POST)

# %% [markdown]
# ## 2 · Open lazily
#
# `open_checkpoint` reads only headers: family, layer count, and for every tensor its canonical name, raw name,
# shape, dtype, layer, module and namespace. The LLaVA's language model (`language_model.model.*` on disk) gets the
# same canonical names as the text Llama; the tower and projector get their own namespaces.

# %%
from vlsafe.analysis.checkpoints import open_checkpoint

pre, post = open_checkpoint(PRE), open_checkpoint(POST)
display(pd.DataFrame([{"checkpoint": c.spec.split("/")[-1], "family": c.family.name, "kind": c.family.kind,
                       "layers": c.num_layers, "hidden": c.hidden_size, "dtype": c.dtype, "tensors": len(c.infos),
                       **{ns: len(c.names(ns)) for ns in ("language", "vision", "projector")}} for c in (pre, post)]))
display(pd.DataFrame([{"canonical": n, "raw (on disk)": i.raw_name, "layer": i.layer, "module": i.module,
                       "shape": i.shape} for n, i in list(post.infos.items()) if i.layer == 0][:4]))

# %% [markdown]
# ## 3 · Per-tensor and per-layer shift
#
# `diff_checkpoints` streams both checkpoints in shard order and accumulates fp64 sums per tensor;
# `aggregate_layers` combines them into numel-weighted per-(layer, module) rows and one `module=all` row per layer.
# Tensors on one side only (the vision tower, the projector) are listed, not compared.

# %%
from vlsafe.analysis.weightshift import aggregate_layers, diff_checkpoints, unpaired

tensors = diff_checkpoints(pre, [post], labels=["llm", "lvlm"], progress=PROGRESS)
layers = aggregate_layers(tensors)
cols = ["tensor", "layer", "module", "shape", "rel_frobenius", "cosine", "max_abs"]
display(tensors[tensors["status"] == "paired"].nlargest(6, "rel_frobenius")[cols])
display(unpaired(tensors).groupby(["status", "module"]).size().rename("tensors").to_frame())

# %%
per_layer = layers[layers["module"] == "all"].set_index("layer")["rel_frobenius"].astype(float)
top_layer = int(per_layer.idxmax())
display(per_layer.to_frame().T)
print(f"layer that moved most: {top_layer}")
if not REAL:
    assert top_layer == PLANTED_LAYER, f"expected the planted layer {PLANTED_LAYER}, got {top_layer}"
    ratio = per_layer[top_layer] / per_layer.drop(top_layer).max()
    print(f"planted layer {PLANTED_LAYER} recovered; its shift is {ratio:.0f}x the next layer's")

# %% [markdown]
# ## 4 · Figures
#
# The paper-style figures of `vlsafe.analysis.figures` take these tables directly: a layer × module heatmap and per-layer
# curves (left: all modules; right: per module). `save_figure` writes PNG + vector PDF.

# %%
from vlsafe.analysis.figures import layer_curves, layer_module_heatmap, save_figure

heat, curves = layer_module_heatmap(layers), layer_curves(layers)
saved = save_figure(heat, OUT / "figures", "weight_heatmap") + save_figure(curves, OUT / "figures", "layer_curves")
display(heat, curves)
print("saved:", ", ".join(p.name for p in saved))

# %% [markdown]
# ## 5 · Task vectors over three checkpoints
#
# τ_A = LVLM − LLM (adaptation) and τ_B = safety-tuned − LVLM (`mode="chain"`, the paper's τ_VL vs τ_safety).
# A layer where the cosine is strongly negative is one the safety update pushes back; near zero means the two
# updates are unrelated there. Only language-model tensors are compared (shared vocabulary rows).

# %%
from vlsafe.analysis.figures import taskvector_figure
from vlsafe.analysis.taskvectors import aggregate_task_vectors, task_vectors

tv = task_vectors(*TV, mode="chain", labels=["llm", "lvlm", "lvlm-safe"], progress=PROGRESS)
tv_layers = aggregate_task_vectors(tv)
tv_all = tv_layers[tv_layers["module"] == "all"].set_index("layer")[["norm_a", "norm_b", "cosine"]]
display(tv_all)
display(taskvector_figure(tv_layers, labels=["llm", "lvlm", "lvlm-safe"]))
if not REAL:
    assert tv_all["cosine"].idxmin() == PLANTED_LAYER and tv_all.loc[PLANTED_LAYER, "cosine"] < -0.9

# %% [markdown]
# ## 6 · Dynamics over training steps
#
# `dynamics` diffs every checkpoint against the first one (step 0) in one streaming pass; steps are parsed from
# names like `lvlm-step-20`. On the tiny run the planted layer grows linearly, 1/3 of its final shift per step.

# %%
from vlsafe.analysis.dynamics import dynamics
from vlsafe.analysis.figures import dynamics_figure

dyn = dynamics(STEPS, progress=PROGRESS)
dyn_layers = dyn.dropna(subset=["layer"])
display(dyn_layers.pivot(index="step" if dyn["step"].notna().all() else "index", columns="layer",
                         values="rel_frobenius"))
display(dynamics_figure(dyn))

# %% [markdown]
# ## Summary
#
# The last cell prints one JSON line (read back by `tests/test_notebooks.py`).

# %%
last_step = dyn_layers[dyn_layers["index"] == dyn_layers["index"].max()]
dyn_top = int(last_step.set_index("layer")["rel_frobenius"].astype(float).idxmax())
trajectory = dyn_layers[dyn_layers["layer"] == dyn_top].sort_values("index")["rel_frobenius"].tolist()
summary = {"real": REAL, "top_layer": top_layer, "planted_layer": None if REAL else PLANTED_LAYER,
           "planted_eps": None if REAL else PLANTED_EPS, "background_eps": None if REAL else BACKGROUND_EPS,
           "top_rel_frobenius": float(per_layer.max()),
           "other_max_rel_frobenius": float(per_layer.drop(top_layer).max()),
           "vision_tensors_unpaired": int((unpaired(tensors)["module"] == "vision").sum()),
           "tv_min_cosine_layer": int(tv_all["cosine"].idxmin()), "tv_min_cosine": float(tv_all["cosine"].min()),
           "dynamics_top_layer": dyn_top, "dynamics_trajectory": trajectory}
print("VLSAFE_SUMMARY " + json.dumps(summary))
