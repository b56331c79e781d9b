# %% [markdown]
# # 02 · Safety directions and probes
#
# **Question.** Where in the residual stream do harmful and harmless requests separate, along which direction, and
# does that direction survive in the language model of an LVLM built from the same LLM?
#
# Steps: capture residual streams for the shipped harmful and harmless prompt sets; difference-in-means directions
# per layer (Arditi et al.); cross-validated linear probes per layer with a shuffled-label control; safety-layer
# cosine curves (Li et al.); directional ablation vs weight orthogonalisation, which must give the same logits;
# and the direction cosine between an LLM and an LVLM's language model, layer by layer.
#
# With `REAL = False` the model is a tiny random Llama (its "safety direction" is only a lexical contrast; the
# numbers show the mechanics, not a finding) and the LVLM is built from it with only its last two layers changed,
# so the direction cosine must be exactly 1 up to the first changed layer. With `REAL = True` the model is the
# embedded SmolLM2-135M-Instruct (`default`), compared with the model organism's LLM and LVLM.

# %%
REAL = False  # True: SmolLM2 ("default") and the model organism instead of tiny models
SEED = 0
N = 128 if REAL else 24  # prompts per set (use >= 100 per class for probe conclusions)
PROGRESS = REAL

from pathlib import Path

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
OUT = Path("runs") / "nb02_directions"
REAL_MODEL = "default"  # or an HF dir / hub id, e.g. "meta-llama/Llama-2-7b-chat-hf"
# LLM vs LVLM pair for section 6 (same hidden size), e.g. the organism, or the paper's pair
# ("meta-llama/Llama-2-7b-chat-hf", "llava-hf/llava-1.5-7b-hf").
ORGANISM = ROOT / "runs" / "demo" / "organism"
REAL_PAIR = (ORGANISM / "llm-aligned", ORGANISM / "lvlm")

# %%
# %matplotlib inline
import copy
from vlsafe.experiments.notebook import setup

setup(SEED, OUT)  # offline, quiet, seeded: before anything imports transformers

import json

import pandas as pd
import torch
from IPython.display import display

# %% [markdown]
# ## 1 · Model and prompts
#
# `vlsafe.probes.models.load` gives a runnable model with a left-padding tokenizer (eager attention, for exact batched vs
# single-prompt parity). The prompt sets ship with vlsafe in fixed train/val/test splits; `sample` is seeded.

# %%
from vlsafe.analysis.tiny import tiny_llama
from vlsafe.probes.behavior.datasets import load_prompts
from vlsafe.probes.models import load

missing = [str(p) for p in REAL_PAIR if isinstance(p, Path) and not p.exists()] if REAL else []
if missing:
    raise FileNotFoundError(f"{missing[0]}: not built; build the organism first (`vlsafe demo`, or notebook 04 with "
                            "REAL = True) or set REAL_PAIR to other checkpoints")
N_LAYERS, CHANGED_FROM = 4, 2  # tiny: the LVLM's language model differs from the LLM only in layers >= 2
SPEC = REAL_MODEL if REAL else tiny_llama(OUT / "llm", layers=N_LAYERS, seed=SEED)
lm = load(SPEC)
harmful = load_prompts("harmful-train").sample(N, seed=SEED)
harmless = load_prompts("harmless-train").sample(N, seed=SEED)
L = lm.checkpoint.num_layers
print(f"{lm.checkpoint!r}\n{len(harmful)} harmful, {len(harmless)} harmless prompts, e.g.")
display(pd.DataFrame({"harmful": harmful.prompts[:3], "harmless": harmless.prompts[:3]}))

# %% [markdown]
# ## 2 · Capture residual streams (hooks backend, TransformerLens names)
#
# `capture` accepts vlsafe hook kinds (`resid_pre`, `resid_post`, `attn_out`, `mlp_out`) or TransformerLens names,
# which fix their own layer. `resid_pre` at layer ℓ is the residual entering block ℓ, i.e. Hugging Face's
# `hidden_states[ℓ]`; we check that on one batch. The `hooks` backend is plain PyTorch forward hooks;
# `transformer_lens` and `nnsight` backends give the same values.

# %%
from vlsafe.probes.capture import capture, parse_hook_name
from vlsafe.probes.templates import encode

HOOKS = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{i}.hook_resid_post" for i in range(L)]
display(pd.DataFrame([{"TransformerLens name": h, "vlsafe (kind, layer)": parse_hook_name(h)} for h in HOOKS[:2]]
                     + [{"TransformerLens name": h, "vlsafe (kind, layer)": parse_hook_name(h)}
                        for h in ("blocks.1.hook_attn_out", "blocks.1.mlp.hook_out")]))
kw = dict(hooks=HOOKS, positions="last", batch_size=8, backend="hooks", progress=PROGRESS)
acts_h, acts_b = capture(lm, harmful.prompts, **kw), capture(lm, harmless.prompts, **kw)
print(acts_h)

batch = encode(lm, harmful.prompts[:8])
with torch.no_grad():
    hidden = lm.model(**batch.model_inputs(), output_hidden_states=True).hidden_states
parity = max(float((acts_h.get(f"blocks.{i}.hook_resid_pre")[:8, 0] - hidden[i][:, -1]).abs().max()) for i in range(L))
print(f"max |resid_pre - HF hidden_states| over layers: {parity:.2e}")
assert parity < 1e-4

# %% [markdown]
# ## 3 · Difference-in-means directions
#
# r_ℓ = μ_harmful − μ_harmless at the last token, accumulated in fp64, one per layer (`DirectionSet`, saved as
# safetensors with the model's hash). Layer 0's input at the last token is the same template token for every
# prompt, so its direction is zero.

# %%
from vlsafe.probes.directions import DirectionSet, save_directions

ds = DirectionSet.from_activations(acts_h, acts_b, checkpoint=lm.checkpoint)
save_directions(OUT / "directions.safetensors", {"llm": ds})
display(ds.table(label="llm").set_index("layer")[["direction_norm"]].T)

# %% [markdown]
# ## 4 · Linear probes with a shuffled-label control, and safety-layer curves
#
# Per layer (the same `resid_pre` activations as the directions): logistic regression on standardised
# activations, stratified k-fold accuracy and AUROC; the control runs the same splits on permuted labels and
# should sit near 0.5 (with few prompts it scatters widely).
# Safety-layer curves: last-token cosine over random normal–normal (N-N), malicious–malicious (M-M) and
# normal–malicious (N-M) pairs, from the residual leaving each block.

# %%
from vlsafe.analysis.figures import save_figure
from vlsafe.probes.figures import probe_accuracy_figure, safety_layers_figure
from vlsafe.probes.linear import probe_sets
from vlsafe.probes.safety_layers import cosine_curves, onset_layer

probes = probe_sets(acts_h, acts_b, hook="resid_pre", folds=4, seed=SEED, progress=PROGRESS).assign(checkpoint="llm")
display(probes.set_index("layer")[["probe_accuracy", "probe_auroc", "control_accuracy", "d_prime"]].T)
last = lambda a: a.stack("resid_post")[:, :, 0]  # noqa: E731  [n, L, d] at the last token
curves = cosine_curves(last(acts_b), last(acts_h), pairs=200).assign(checkpoint="llm")
onset = onset_layer(curves)
print("onset layer (N-M below N-N and M-M by > 0.05):", onset)
figs = {"probe_accuracy": probe_accuracy_figure(probes, ["llm"]),
        "safety_layers": safety_layers_figure(curves, ["llm"], {"llm": onset})}
for stem, fig in figs.items():
    save_figure(fig, OUT / "figures", stem)
    display(fig)

# %% [markdown]
# ## 5 · Directional ablation = weight orthogonalisation
#
# Ablation projects r̂ out of every block input, attention output and MLP output with hooks (`ablate_direction`);
# orthogonalisation edits the weights that write into the residual stream so they never write r̂
# (`orthogonalize_model`; `orthogonalize_weights` writes it as a new checkpoint). Both must give the same logits.

# %%
from vlsafe.probes.interventions import ablate_direction, orthogonalize_model

LAYER = int(probes.sort_values("probe_accuracy").iloc[-1]["layer"])
r = ds.get(LAYER)  # the resid_pre direction at the layer where the probe reads best
batch = encode(lm, harmful.prompts[:4] + harmless.prompts[:4])
with torch.no_grad():
    base_logits = lm.model(**batch.model_inputs()).logits
    with ablate_direction(lm.model, r):
        ablated = lm.model(**batch.model_inputs()).logits
    ortho = copy.deepcopy(lm.model)  # leave `lm` untouched
    edited = orthogonalize_model(ortho, r)
    orthogonalised = ortho(**batch.model_inputs()).logits
ablation_vs_ortho = float((ablated - orthogonalised).abs().max()) / float(ablated.abs().max())
print(f"direction from layer {LAYER}; edited: {edited}")
print(f"max |logits(ablated) - logits(orthogonalised)| / max |logit| = {ablation_vs_ortho:.1e}   "
      f"(ablated vs unedited model: max |Δlogit| {float((ablated - base_logits).abs().max()):.2e})")
assert ablation_vs_ortho < 1e-5  # equal up to fp32 rounding
del ortho

# %% [markdown]
# ## 6 · The direction in an LLM vs in an LVLM's language model
#
# Capture the same text-only prompts through both models and compare their directions layer by layer
# (`direction_cosines`, by layer index: the shared layer axis). Tiny run: the LVLM's language model is the LLM's
# with layers ≥ `CHANGED_FROM` perturbed, so the cosine is exactly 1 for every layer whose input is unchanged and
# drops after.

# %%
from vlsafe.analysis.tiny import tiny_llava_from
from vlsafe.probes.compare import direction_cosines
from vlsafe.probes.figures import similarity_figure


def lvlm_from(llm_dir: Path, out: Path, changed_from: int, eps: float = 0.2) -> Path:
    """A tiny LLaVA whose language model is the LLM's, with layers >= changed_from perturbed by relative eps."""
    lvlm, processor, _ = tiny_llava_from(llm_dir, out.with_name(out.name + "-init"), seed=SEED + 1)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for block in lvlm.model.language_model.layers[changed_from:]:
            for p in block.parameters():
                n = torch.randn(p.shape, generator=gen)
                p.add_(eps * p.norm() * n / n.norm())
    lvlm.save_pretrained(out)
    processor.save_pretrained(out)
    return out


PAIR = REAL_PAIR if REAL else (SPEC, lvlm_from(SPEC, OUT / "lvlm", CHANGED_FROM))
sets = {}
for label, spec in zip(("llm", "lvlm"), PAIR):
    if spec == SPEC:  # already captured above
        sets[label] = ds
        continue
    model = load(spec)
    h, b = capture(model, harmful.prompts, **kw), capture(model, harmless.prompts, **kw)
    sets[label] = DirectionSet.from_activations(h, b, checkpoint=model.checkpoint)
    del model
similarity = direction_cosines(sets["llm"], sets["lvlm"], label_a="llm", label_b="lvlm")
display(similarity.set_index("layer")[["direction_cosine"]].T)
display(similarity_figure(similarity, ["llm", "lvlm"]))
if not REAL:
    cos = similarity.set_index("layer")["direction_cosine"]
    assert (cos.loc[1:CHANGED_FROM] > 1 - 1e-6).all() and cos.loc[CHANGED_FROM + 1:].max() < 1 - 1e-3

# %% [markdown]
# ## Summary

# %%
summary = {"real": REAL, "n_per_set": len(harmful), "layers": L, "best_probe_layer": LAYER,
           "changed_from": None if REAL else CHANGED_FROM,
           "best_probe_accuracy": float(probes["probe_accuracy"].max()),
           "mean_control_accuracy": float(probes["control_accuracy"].mean()), "capture_vs_hf": parity,
           "ablation_vs_orthogonalisation_rel": ablation_vs_ortho,
           "direction_cosine": {int(k): (None if pd.isna(v) else float(v))
                                for k, v in similarity.set_index("layer")["direction_cosine"].items()}}
print("VLSAFE_SUMMARY " + json.dumps(summary))
