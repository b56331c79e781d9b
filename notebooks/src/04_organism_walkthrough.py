# %% [markdown]
# # 04 · The model organism, step by step
#
# **Question.** Can we watch safety erode while an aligned LLM is adapted into a LLaVA-style LVLM on purely benign
# vision-language data — offline, on a CPU, with every checkpoint on disk for the other notebooks to dissect?
#
# The organism is a recipe (`experiments/configs/organism-<profile>.yaml`): a base LLM is safety-aligned
# (`llm-aligned`), gets a vision tower pretrained on synthetic scenes (`vision`), a projector (`lvlm-stage1`), then
# LLaVA stage-2 training on scene Q&A and harmless chat (`lvlm`, saving `lvlm-step-N` on the way), and two
# remedies (`lvlm-safety-posthoc`, `lvlm-safety-mixed`). Every checkpoint is then evaluated (refusal on harmful
# prompts with and without an image, over-refusal, compliance, visual QA accuracy) with Wilson intervals.
#
# `REAL = False` runs the `tiny` profile: random tiny models, every stage in well under a minute, numbers without
# behavioural meaning. `REAL = True` runs the `full` profile on SmolLM2 (see section 5 for the cost) in the same
# folder `vlsafe demo` uses, so either one reuses what the other built.

# %%
REAL = False  # True: the full profile on SmolLM2 (long; cached per stage)
SEED = 0
PROGRESS = REAL

from pathlib import Path

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
PROFILE = "full" if REAL else "tiny"
OUT = ROOT / "runs" / "demo" / "organism" if REAL else Path("runs") / "nb04_organism"
REPORT_DIR = Path("runs") / f"nb04_report_{PROFILE}"

# %%
# %matplotlib inline
from vlsafe.experiments.notebook import setup

setup(SEED, precision=3)  # offline, quiet, seeded: before anything imports transformers

import json
import os
import time
import warnings

import pandas as pd
from IPython.display import HTML, IFrame, display

warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from the training stack

# %% [markdown]
# ## 1 · The recipe
#
# `load_config` validates the YAML (unknown keys and inconsistent sizes are one-line errors); `overrides` changes
# dotted keys, e.g. `{"alignment_strength": "strong"}` for the strongly aligned regime.

# %%
from vlsafe.experiments.organism import build_organism, load_config
from vlsafe.experiments.organism.api import STAGE_NAMES

cfg = load_config(PROFILE)
print("stages:", " → ".join(STAGE_NAMES))
display(pd.DataFrame({
    "base model": [cfg.base.spec], "alignment": [cfg.alignment_strength],
    "align steps": [cfg.align.sft.steps], "stage-1 steps": [cfg.stage1.sft.steps],
    "stage-2 steps": [cfg.stage2.sft.steps], "saved steps": [cfg.stage2.save_steps],
    "image size": [cfg.images.size], "eval harmful/borderline/harmless/vqa":
        [f"{cfg.eval.harmful}/{cfg.eval.borderline}/{cfg.eval.harmless}/{cfg.eval.vqa}"]}).T.rename(
    columns={0: PROFILE}))

# %% [markdown]
# ## 2 · Synthetic images with exact ground truth
#
# The vision data are scenes of identical shapes of one colour on a plain background, drawn without
# anti-aliasing, so each attribute (shape, colour, count, position, background) is exactly known — and checkable
# from the pixels. Visual QA asks about one attribute per held-out scene.

# %%
import numpy as np

from vlsafe.analysis.figures import new_figure, paper_style
from vlsafe.experiments.organism.data import vqa_items
from vlsafe.experiments.organism.images import BACKGROUNDS, COLOURS, render, sample_scenes

scenes = sample_scenes(6, seed=SEED, size=cfg.images.size)
images = [render(s) for s in scenes]
fig, axes = new_figure("page", height=1.6, ncols=len(scenes))
with paper_style():
    for ax, s, img in zip(axes, scenes, images):
        ax.imshow(img)
        ax.set_title(s.caption().replace(" on the ", "\non the "), fontsize=5)
        ax.axis("off")
display(fig)
pixels = [np.asarray(img).reshape(-1, 3) for img in images]
truth = pd.DataFrame([{k: v for k, v in s.to_dict().items() if k != "boxes"} for s in scenes])
truth["object pixels"] = [int((p == COLOURS[s.colour]).all(1).sum()) for p, s in zip(pixels, scenes)]
truth["background pixels"] = [int((p == BACKGROUNDS[s.background]).all(1).sum()) for p, s in zip(pixels, scenes)]
display(truth)
assert (truth["object pixels"] + truth["background pixels"] == cfg.images.size ** 2).all()  # exact palette colours
questions = vqa_items(scenes, seed=SEED)
display(pd.DataFrame([{"question": q.prompt.splitlines()[0], "answer": q.answer} for q in questions]))

# %% [markdown]
# ## 3 · Build the stages
#
# Each stage is written to `OUT/<stage>/` through a temporary folder and a rename, with a `stage.json` holding
# the hash of its config section and upstream stages. A rerun skips finished stages; an interrupted build resumes;
# a config change rebuilds only what depends on it. The CLI equivalent is
# `vlsafe organism --profile tiny -o runs/nb04_organism`.

# %%
plan_rows = []
on_plan = lambda spec, reason, est: plan_rows.append(  # noqa: E731
    {"stage": spec.name, "action": "cached" if reason is None else f"build ({reason})", "estimate_s": round(est, 1)})
t0 = time.perf_counter()
results, metrics = build_organism(cfg, OUT, progress=PROGRESS, on_plan=on_plan)
build_seconds = time.perf_counter() - t0
stages = pd.DataFrame([r.__dict__ for r in results])[["stage", "status", "seconds", "estimate_s"]]
display(stages.round(1))
print(f"built in {build_seconds:.0f} s")

# %%
from vlsafe.analysis.checkpoints import open_checkpoint

ckpts = {d.name: open_checkpoint(d) for d in sorted(OUT.iterdir()) if (d / "config.json").is_file()}
display(pd.DataFrame([{"checkpoint": n, "family": c.family.name, "layers": c.num_layers, "hidden": c.hidden_size,
                       "parameters": c.num_parameters,
                       "stage.json": json.loads((OUT / n / "stage.json").read_text())["status"]
                       if (OUT / n / "stage.json").is_file() else "—"} for n, c in ckpts.items()]))

# %% [markdown]
# A second call finds every stage and every checkpoint's metrics cached:

# %%
t0 = time.perf_counter()
again, _ = build_organism(cfg, OUT, progress=False)
resume_seconds = time.perf_counter() - t0
statuses = sorted({r.status for r in again})
print(f"second call: {resume_seconds:.1f} s, statuses {statuses}")
assert statuses == ["cached"]

# %% [markdown]
# ## 4 · Metrics
#
# `OUT/metrics.csv`: one row per (checkpoint, metric) with the count, rate and 95 % Wilson interval; `chance` for
# visual QA. The wide view below is what `vlsafe organism` prints. Along the stage-2 steps this is the paper's
# Figure 2 axis (safety vs adaptation step).

# %%
from vlsafe.experiments.organism.metrics import summary_table

metrics = pd.read_csv(OUT / "metrics.csv")
display(summary_table(metrics))
steps = metrics.dropna(subset=["stage2_step"])
fig, ax = new_figure("column", height=2.2)
with paper_style():
    for name, g in steps.groupby("metric", sort=False):
        g = g.sort_values("stage2_step")
        (line,) = ax.plot(g["stage2_step"], g["rate"], marker="o", label=name)
        ax.fill_between(g["stage2_step"], g["ci_low"], g["ci_high"], color=line.get_color(), alpha=0.12, lw=0)
    ax.set(xlabel="stage-2 step", ylabel="rate", title=f"organism ({PROFILE}) along adaptation")
    ax.legend(fontsize=5)
display(fig)

# %% [markdown]
# ## 5 · Switching to the full profile
#
# Set `REAL = True` in the first cell: the same cells build the `full` profile (SmolLM2-135M-Instruct, safety SFT,
# a CLIP-style tower, LLaVA stages 1 and 2, both remedies) in `runs/demo/organism`, the folder `vlsafe demo` uses.
# The first build takes on the order of half an hour or more on 2 CPU cores (the config's own estimate below, from
# speeds measured on the reference machine); every stage and every checkpoint's metrics are cached, so a rerun
# takes seconds and an interrupted build resumes. `load_config("full", overrides={"alignment_strength":
# "strong"})` builds the strongly aligned regime (it keeps its own cache keys).

# %%
from vlsafe.experiments.organism.metrics import estimate_seconds
from vlsafe.experiments.organism.stages import specs

full = load_config("full")
full_build = sum(s.estimate(full) for s in specs())
print(f"full profile estimate: build ~{full_build / 60:.0f} min + metrics ~{estimate_seconds(full) / 60:.0f} min "
      f"(2 cores; tiny profile: ~{sum(s.estimate(cfg) for s in specs()):.0f} s)")

# %% [markdown]
# ## 6 · Report
#
# `build_report(DIR)` writes one self-contained HTML page for any run directory. We gather a small run folder: the
# organism's metrics, the weight shift `llm-aligned` → `lvlm`, the task vectors of adaptation vs post-hoc safety
# tuning, and a `run.json` naming each table's kind and file: the report reads exactly the tables a `run.json`
# lists (see `vlsafe.analysis.runinfo.TABLE_KINDS`), whatever their file names.

# %%
from vlsafe.analysis.runinfo import write_csv, write_run_json
from vlsafe.analysis.taskvectors import aggregate_task_vectors, task_vectors
from vlsafe.analysis.weightshift import aggregate_layers, diff_checkpoints
from vlsafe.experiments.report import build_report

write_csv(REPORT_DIR / "organism" / "metrics.csv", metrics)
shift = aggregate_layers(diff_checkpoints(ckpts["llm-aligned"], [ckpts["lvlm"]], labels=["llm-aligned", "lvlm"],
                                          progress=PROGRESS))
write_csv(REPORT_DIR / "diff" / "layers.csv", shift)
tv = task_vectors(ckpts["llm-aligned"], ckpts["lvlm"], ckpts["lvlm-safety-posthoc"], mode="chain",
                  labels=["llm-aligned", "lvlm", "lvlm-safety-posthoc"], progress=PROGRESS)
write_csv(REPORT_DIR / "taskvec" / "taskvectors.csv", aggregate_task_vectors(tv))
write_run_json(REPORT_DIR, kind="notebook", command="notebooks/04_organism_walkthrough",
               tables={"organism_metrics": "organism/metrics.csv", "diff_layers": "diff/layers.csv",
                       "taskvectors": "taskvec/taskvectors.csv"}, config=cfg.model_dump(),
               checkpoints={n: ckpts[n] for n in ("llm-aligned", "lvlm", "lvlm-safety-posthoc")}, seed=SEED)
report = build_report(REPORT_DIR, title=f"vlsafe organism walkthrough ({PROFILE})")
link = os.path.relpath(report, Path.cwd())
display(HTML(f'<a href="{link}" target="_blank">open {link}</a> ({report.stat().st_size / 1e3:.0f} kB, '
             'self-contained)'))
display(IFrame(link, width="100%", height=480))

# %% [markdown]
# ## Summary

# %%
import re

html = report.read_text(encoding="utf-8")
summary = {"real": REAL, "profile": PROFILE, "stages": stages["stage"].tolist(),
           "built_seconds": round(build_seconds, 1),
           "resume_statuses": statuses, "checkpoints": sorted(metrics["checkpoint"].unique()),
           "metrics": sorted(metrics["metric"].unique()), "report": str(report),
           "report_figures": sorted(re.findall(r'class="figure" data-stem="([^"]+)"', html))}
print("VLSAFE_SUMMARY " + json.dumps(summary))
