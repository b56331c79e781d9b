"""Benchmark: a lower bound on a finished remedies sweep's time on this machine, against the time it took.

Counts the floating-point work of the linear layers alone — every decoder block's seven projections, the LM head
where logits are computed — over real tokens only (no padding, attention, norms, hooks or Python), for the three
kinds of work in a two-stage sweep (`vlsafe.experiments.sweep`):

- **screen**: every point's logit refusal score on `screen.limit` prompts per set (the prompt once, then each
  refusal opening's tokens), the image set only for a model that takes images;
- **tuning**: each `tune` point's optimizer steps (`steps × batch_size` examples of the point's own
  `examples.jsonl`, mean length): the forward, and the input-gradient backward of the blocks at and above the first
  tuned layer (a lower bound: LoRA's own and the head's gradients are left out);
- **judged**: the stored generations of every judged point (prompt tokens + the answer tokens actually generated).

Dividing by the best bf16 GEMM rate measured in the same run (`bench_common.gemm_rates`, a block's seven linear
layers at 552 rows) gives the time the study would take if every GEMM ran at that rate and nothing else cost
anything. Written to `benchmarks/results/sweep_bound.csv` (one row per kind and a total; `measured_s` on the
total: the serial study's wall time from `benchmarks/results/sweep.csv` when given with `--measured`).

    .venv/bin/python benchmarks/bench_sweep_bound.py [--sweep runs/demo/sweep] [--measured 3016]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402

from bench_common import append_rows, gemm_rates  # noqa: E402


def geometry(lm: Any) -> tuple[int, int]:
    """(linear-layer FLOPs per token of one decoder block, of the LM head)."""
    c = getattr(lm.model.config, "text_config", lm.model.config)
    d, f = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * getattr(c, "head_dim", d // c.num_attention_heads)
    block = 2 * (2 * d * d + 2 * d * kv + 3 * d * f)
    return block, 2 * d * c.vocab_size


def prompt_tokens(lm: Any, spec: str, limit: int | None) -> tuple[int, int]:
    """(real tokens, prompts) of a prompt set as the evaluation encodes it (chat template, image tokens)."""
    from vlsafe.probes import templates as T
    from vlsafe.probes.behavior.datasets import load_prompts
    from vlsafe.probes.behavior.generate import load_image

    recs = load_prompts(spec, limit=limit).records
    images = [load_image(r.image) for r in recs] if recs[0].image is not None else None
    total = sum(int(b.attention_mask.sum()) for b in T.batches(lm, [r.prompt for r in recs], images, batch_size=20))
    return total, len(recs)


def example_tokens(lm: Any, text: str, max_length: int) -> float:
    """Mean encoded length of a tuning point's training examples (the text of its `examples.jsonl`)."""
    from vlsafe.experiments.tuning import encode_example

    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return sum(len(encode_example(lm, r, max_length, i)["input_ids"]) for i, r in enumerate(rows)) / len(rows)


def bound(sweep: Path, model: str) -> pd.DataFrame:
    """FLOPs of each kind of work in the finished sweep at `sweep`, whose points have `model`'s geometry and
    processor (the sweep's base LVLM)."""
    from vlsafe.probes import scores as S
    from vlsafe.probes.models import load

    run = json.loads((sweep / "run.json").read_text())
    ev, table = run["config"]["eval"], pd.read_csv(sweep / "pareto.csv")
    lvlm = load(model)
    block, head = geometry(lvlm)
    layers = lvlm.model.config.text_config.num_hidden_layers
    stack = layers * block
    sc = ev["screen"]
    cont = sum(len(s) - 1 for s in S.score_targets(lvlm.processor, sc["score_kind"], sc["openings"]))
    sets = [ev["harmful"], ev["borderline"], ev["harmless"]]
    per_set = {s: prompt_tokens(lvlm, s, sc["limit"]) for s in sets + [ev["harmful_image"]]}

    def screen_flops(image: bool) -> float:
        used = sets + ([ev["harmful_image"]] if image else [])
        return sum(t * stack + n * head + n * cont * (stack + head) for t, n in (per_set[s] for s in used))

    # a judged point keeps its screened counts in screen_*; a screened-only point has them in the plain columns
    images = table["screen_n_harmful_image"].where(table["stage"] == "full", table["n_harmful_image"]).fillna(0) > 0
    screen = sum(screen_flops(bool(img)) for img in images)
    tuning, lengths = 0.0, {}  # mean example length per examples text (the targeted LoRA points share theirs)
    for _, row in table[table["method"] == "tune"].iterrows():
        model = sweep / "points" / row["hash"] / "model"
        cfg = json.loads((model / "tune.json").read_text())["config"]
        first = min(map(int, str(row["layers"]).split()))
        text = (model / "examples.jsonl").read_text()
        if (text, cfg["max_length"]) not in lengths:
            lengths[text, cfg["max_length"]] = example_tokens(lvlm, text, cfg["max_length"])
        n_tok = cfg["steps"] * cfg["batch_size"] * lengths[text, cfg["max_length"]]
        tuning += n_tok * (stack + (layers - first) * block)
    judged, gen_tokens, n_judged = 0.0, 0, 0
    full = {s: prompt_tokens(lvlm, s, ev["limit"]) for s in sets + [ev["harmful_image"]]}
    for _, row in table[table["stage"] == "full"].iterrows():
        for f in (sweep / "points" / row["hash"]).glob("eval-*/generations.jsonl"):
            gens = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            answers = sum(len(lvlm.tokenizer(g["response"], add_special_tokens=False)["input_ids"]) for g in gens)
            used = sets + ([ev["harmful_image"]] if row["n_harmful_image"] > 0 else [])
            judged += sum(full[s][0] * stack + full[s][1] * head for s in used) + answers * (stack + head)
            gen_tokens, n_judged = gen_tokens + answers, n_judged + 1
    return pd.DataFrame([
        {"kind": "screen", "points": len(table), "tflop": screen / 1e12,
         "note": f"up to {sc['limit']} prompts per set"},
        {"kind": "tuning", "points": int((table["method"] == "tune").sum()), "tflop": tuning / 1e12,
         "note": "forward + input-gradient backward above the first tuned layer"},
        {"kind": "judged", "points": n_judged, "tflop": judged / 1e12,
         "note": f"up to {ev['limit']} prompts per set, {gen_tokens} answer tokens generated"}])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", default="runs/demo/sweep", help="a finished two-stage sweep's run directory")
    ap.add_argument("--model", default="runs/demo/organism/lvlm", help="the sweep's base LVLM (geometry, processor)")
    ap.add_argument("--measured", type=float, default=None, help="the study's measured wall time in seconds")
    ap.add_argument("--out", default="benchmarks/results/sweep_bound.csv")
    args = ap.parse_args()
    rate = float(gemm_rates().set_index("dtype").loc["bfloat16", "gflops_best"])
    t = bound(Path(args.sweep), args.model)
    t = pd.concat([t, pd.DataFrame([{"kind": "total", "points": int(t["points"].iloc[0]), "tflop": t["tflop"].sum(),
                                     "note": "linear layers only, real tokens"}])], ignore_index=True)
    t["bound_s"] = (t["tflop"] * 1e12 / (rate * 1e9)).round(0)
    t["tflop"] = t["tflop"].round(2)
    t["measured_s"] = [None] * (len(t) - 1) + [args.measured]
    t["gemm_gflops_bf16"] = rate
    t["sweep"] = args.sweep
    t["date"] = pd.Timestamp.now("UTC").strftime("%Y-%m-%d")
    print(t.to_string(index=False))
    append_rows(Path(args.out), t)


if __name__ == "__main__":
    main()
