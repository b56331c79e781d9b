# %% [markdown]
# # 03 · Merge playground
#
# **Question.** Can weight merging give an adapted LVLM its safety back without retraining, and does it help to
# touch only the layers that moved?
#
# We merge with mergekit's semantics (`linear`, `task_arithmetic`, `ties`, `slerp`) from a mergekit-style YAML
# mapping through vlsafe's streaming executor (one tensor group in memory, atomic HF output), reload every result
# with plain `transformers`, and compare logits. Then a layer-targeted plan built from the measured weight shift
# restores the top-k shifted layers of the LVLM from the aligned LLM, is exported as mergekit YAML, and keeps the
# vision tower bit for bit.
#
# Cast (tiny, built below; `REAL = True` uses the model organism): `aligned` = a safety-aligned LLM; `lvlm` = a
# LLaVA built from it whose language model moved (one layer a lot: planted); `lvlm-safe` = the LVLM after a safety
# fine-tune.

# %%
REAL = False  # True: the model organism's checkpoints instead of tiny planted ones
SEED = 0
TOP_K = 1  # layers restored by the targeted plan (try 4-6 on a 30-layer model)
PROGRESS = REAL

from pathlib import Path

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
OUT = Path("runs") / "nb03_merge"
ORGANISM = ROOT / "runs" / "demo" / "organism"  # `vlsafe demo` or `vlsafe organism -o ...`

# %%
# %matplotlib inline
import shutil

from vlsafe.experiments.notebook import setup

shutil.rmtree(OUT / "merged", ignore_errors=True)  # merges refuse to overwrite a foreign folder; start clean
setup(SEED, OUT)  # offline, quiet, seeded: before anything imports transformers

import json

import pandas as pd
import torch
import yaml
from IPython.display import Markdown, display

# %% [markdown]
# ## 1 · Checkpoints
#
# Tiny: `lvlm` is a real LLaVA whose language model is `aligned`'s (transplanted by name) plus τ_VL = 8 % relative
# change on layer `PLANTED_LAYER` and 0.2 % elsewhere; `lvlm-safe` adds 2 % noise to every language-model tensor.

# %%
from vlsafe.analysis.tiny import tiny_llama, tiny_llava_from

PLANTED_LAYER, N_LAYERS = 1, 4


def noisy(p: torch.Tensor, eps: float, gen: torch.Generator) -> torch.Tensor:
    n = torch.randn(p.shape, generator=gen)
    return p + eps * p.norm() * n / n.norm()


def build_tiny(root: Path) -> dict:
    aligned = tiny_llama(root / "aligned", layers=N_LAYERS, seed=SEED)
    lvlm, processor, _ = tiny_llava_from(aligned, root / "lvlm-init", seed=SEED + 1)  # LM transplanted by name
    gen = torch.Generator().manual_seed(SEED)
    paths = {"aligned": aligned}
    with torch.no_grad():
        for i, block in enumerate(lvlm.model.language_model.layers):
            for p in block.parameters():
                p.copy_(noisy(p, 0.08 if i == PLANTED_LAYER else 2e-3, gen))
        for name, eps in (("lvlm", 0.0), ("lvlm-safe", 0.02)):
            for p in lvlm.model.language_model.parameters():
                p.copy_(noisy(p, eps, gen))
            lvlm.save_pretrained(root / name)
            processor.save_pretrained(root / name)
            paths[name] = root / name
    return paths


if REAL and not (ORGANISM / "lvlm" / "config.json").is_file():
    raise FileNotFoundError(f"{ORGANISM}: no model organism; build it first (`vlsafe demo`, or notebook 04 "
                            "with REAL = True)")
if REAL:
    CK = {"aligned": ORGANISM / "llm-aligned", "lvlm": ORGANISM / "lvlm", "lvlm-safe": ORGANISM / "lvlm-safety-posthoc"}
else:
    CK = build_tiny(OUT / "checkpoints")
CK = {k: str(v) for k, v in CK.items()}
display(pd.Series(CK, name="path").to_frame())

# %% [markdown]
# ## 2 · Four merge methods from one YAML template
#
# The mapping is what you would hand to `mergekit-yaml` (plus `vlsafe merge CONFIG.yaml -o DIR` reads the same
# file). `linear` and `slerp` interpolate the LVLM and its safety-tuned version (the paper's remedy);
# `task_arithmetic` and `ties` add the safety task vector *and* pull toward the aligned LLM, relative to the LVLM
# (the LLM contributes language-model tensors only; the tower and projector are copied from the base).

# %%
from vlsafe.analysis.merging import MergePlan, run_merge

TEMPLATE = """
linear:
  merge_method: linear
  models:
    - {{model: {lvlm}, parameters: {{weight: 0.5}}}}
    - {{model: {safe}, parameters: {{weight: 0.5}}}}
  dtype: float32
slerp:
  merge_method: slerp
  base_model: {lvlm}
  models: [{{model: {lvlm}}}, {{model: {safe}}}]
  parameters: {{t: 0.5}}
  dtype: float32
task_arithmetic:
  merge_method: task_arithmetic
  base_model: {lvlm}
  models:
    - {{model: {safe}, parameters: {{weight: 0.5}}}}
    - {{model: {aligned}, parameters: {{weight: 0.3}}}}
  dtype: float32
ties:
  merge_method: ties
  base_model: {lvlm}
  models:
    - {{model: {safe}, parameters: {{weight: 0.5, density: 0.5}}}}
    - {{model: {aligned}, parameters: {{weight: 0.3, density: 0.5}}}}
  parameters: {{lambda: 1.0}}
  dtype: float32
"""
configs = yaml.safe_load(TEMPLATE.format(lvlm=CK["lvlm"], safe=CK["lvlm-safe"], aligned=CK["aligned"]))
print(yaml.safe_dump({"ties": configs["ties"]}, sort_keys=False))
merged = {}
for method, cfg in configs.items():
    merged[method] = run_merge(MergePlan.from_dict(cfg, source=method), OUT / "merged" / method, progress=PROGRESS)
print("wrote:", ", ".join(str(p) for p in merged.values()))

# %% [markdown]
# Every output is an ordinary Hugging Face checkpoint of the base's family (plus `mergekit.yaml` and `run.json`).
# Check the linear merge against the formula on one tensor, and that the merges with the text LLM kept the LVLM's
# vision tower and projector bit for bit (the LLM has none, so they are copied from the base). Note: `slerp`, like
# mergekit, falls back to linear interpolation for nearly parallel tensors (cosine > 0.9995), as here.

# %%
from vlsafe.analysis.checkpoints import open_checkpoint

NAME = f"model.layers.{PLANTED_LAYER if not REAL else 0}.self_attn.q_proj.weight"
lv, sf = open_checkpoint(CK["lvlm"]), open_checkpoint(CK["lvlm-safe"])
lin = open_checkpoint(merged["linear"])
linear_error = float((lin.get_tensor(NAME) - (lv.get_tensor(NAME) + sf.get_tensor(NAME)) / 2).abs().max())
vision_names = lv.names("vision") + lv.names("projector")
tower_kept = {m: all(torch.equal(open_checkpoint(merged[m]).get_tensor(n), lv.get_tensor(n)) for n in vision_names)
              for m in ("task_arithmetic", "ties")}
print(f"linear merge vs (lvlm + lvlm-safe)/2 on {NAME}: max |error| = {linear_error:.1e}")
print("vision tower + projector identical to the LVLM's:", tower_kept)
assert linear_error < 1e-6 and all(tower_kept.values())

# %% [markdown]
# ## 3 · Reload with transformers and compare logits
#
# Text-only next-token logits on a few shipped prompts: the distance of each merge to the LVLM, to its safety-tuned
# version and to the aligned LLM (mean KL of the next-token distributions, nats).

# %%
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from vlsafe.analysis.figures import layer_curves, new_figure, paper_style
from vlsafe.probes.behavior.datasets import load_prompts

tok = AutoTokenizer.from_pretrained(CK["lvlm"])
tok.padding_side = "left"
prompts = [p for s in ("harmful-test", "harmless-test") for p in load_prompts(s).sample(4, seed=SEED).prompts]
texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
         for p in prompts]
enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
VOCAB = min(open_checkpoint(CK["aligned"]).infos["model.embed_tokens.weight"].shape[0], len(tok))  # shared rows


@torch.no_grad()
def next_token_logprobs(path: str) -> torch.Tensor:
    cls = AutoModelForImageTextToText if open_checkpoint(path).family.is_lvlm else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    return model(**enc).logits[:, -1, :VOCAB].double().log_softmax(-1)


refs = {name: next_token_logprobs(CK[name]) for name in ("lvlm", "lvlm-safe", "aligned")}
kl = lambda p, q: float((p.exp() * (p - q)).sum(-1).mean())  # noqa: E731
rows = [{"merge": m, **{f"KL to {r}": kl(lp, refs[r]) for r in refs}}
        for m, lp in ((m, next_token_logprobs(str(p))) for m, p in merged.items())]
logit_table = pd.DataFrame(rows).set_index("merge")
display(logit_table)
fig, ax = new_figure("column", height=2.2)
with paper_style():
    logit_table.plot.bar(ax=ax, rot=0, logy=True)
    ax.set(xlabel="", ylabel="mean KL (nats)", title="next-token distance of each merge")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=3)
display(fig)

# %% [markdown]
# ## 4 · A layer-targeted plan from the measured weight shift
#
# Diff the aligned LLM against the LVLM, take the `TOP_K` layers that moved most, and move only those back:
# θ_ℓ = θ_LVLM,ℓ + α(θ_aligned,ℓ − θ_LVLM,ℓ), α = 1 (full restore). Everything else — other layers,
# embeddings, vision tower, projector — stays the LVLM's. The plan exports to plain mergekit YAML (per-layer filters).

# %%
from vlsafe.analysis.merging.plans import diff_scores, plan_restore_layers, top_k_layers
from vlsafe.analysis.weightshift import aggregate_layers, diff_checkpoints

shift = aggregate_layers(diff_checkpoints(CK["aligned"], [CK["lvlm"]], labels=["aligned", "lvlm"], progress=PROGRESS))
scores = diff_scores(shift)
restore_layers = top_k_layers(scores, k=TOP_K)
display(scores.to_frame().T, layer_curves(shift))
print("restore layers:", restore_layers)
if not REAL:
    assert restore_layers == [PLANTED_LAYER]
plan = plan_restore_layers(CK["lvlm"], CK["aligned"], restore_layers, alpha=1.0)
restored = run_merge(plan, OUT / "merged" / "restore_top_k", progress=PROGRESS)
exported = (restored / "mergekit.yaml").read_text()
display(Markdown(f"`mergekit.yaml` written next to the weights ({len(exported.splitlines())} lines):\n\n"
                 f"```yaml\n{chr(10).join(exported.splitlines()[:24])}\n```"))

# %% [markdown]
# Check the result tensor by tensor: the restored layers equal the aligned LLM's (up to fp32 rounding of
# θ_LVLM + (θ_aligned − θ_LVLM)), every other tensor (tower and projector included) is the LVLM's bit for bit;
# then its logits move toward the aligned LLM.

# %%
rs, al = open_checkpoint(restored), open_checkpoint(CK["aligned"])
restored_error = max(float((rs.get_tensor(n) - al.get_tensor(n)).abs().max())
                     for n, i in rs.infos.items() if i.layer in restore_layers)
others_ok = all(torch.equal(rs.get_tensor(n), lv.get_tensor(n)) for n, i in rs.infos.items()
                if i.layer not in restore_layers)
restored_ok = restored_error < 1e-6 and others_ok
print(f"restored layers vs aligned LLM: max |error| = {restored_error:.1e}; all other tensors == LVLM: {others_ok}")
assert restored_ok
restored_lp = next_token_logprobs(str(restored))
kl_restored, kl_lvlm = kl(restored_lp, refs["aligned"]), kl(refs["lvlm"], refs["aligned"])
display(pd.DataFrame({"KL to aligned LLM": {"lvlm": kl_lvlm, f"lvlm, layers {restore_layers} restored": kl_restored}}))

# %% [markdown]
# ## Summary

# %%
summary = {"real": REAL, "methods": sorted(merged), "linear_error": linear_error,
           "vision_tower_kept": all(tower_kept.values()), "restore_layers": restore_layers,
           "planted_layer": None if REAL else PLANTED_LAYER, "restored_error": restored_error,
           "others_exact": others_ok,
           "kl_to_aligned": {"lvlm": kl_lvlm, "restored": kl_restored},
           "kl_table": {m: {k: float(v) for k, v in r.items()} for m, r in logit_table.iterrows()},
           "mergekit_yaml_lines": len(exported.splitlines())}
print("VLSAFE_SUMMARY " + json.dumps(summary))
