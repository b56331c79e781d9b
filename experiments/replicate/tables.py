"""`replicates.csv` (every combination × checkpoint × metric, with its Wilson interval) and `summary.csv`
(per recipe and checkpoint: mean, sample standard deviation, min, max and number of seeds of every metric).

The drops are metrics of their own in `summary.csv`, computed per seed before summarising:
`drop_refusal_text` = llm-aligned's `refusal_harmful_text` − the checkpoint's `refusal_harmful_text`, and
`drop_refusal_image` = llm-aligned's `refusal_harmful_text` − the checkpoint's `refusal_harmful_image` (the text
LLM has no image input), for every checkpoint that has the metric except llm-base and llm-aligned. `sd` is empty
when a recipe has a single seed. Columns besides the fixed ones of `replicates.csv` are the varied recipe keys.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from vlsafe.analysis.errors import VlsafeError

REPLICATE_COLUMNS = ("combo", "recipe", "seed", "checkpoint", "stage2_step", "metric", "prompt_set", "image", "n",
                     "k", "rate", "ci_low", "ci_high", "chance")
SUMMARY_STATS = ("n_seeds", "mean", "sd", "min", "max")
DROPS = {"drop_refusal_text": "refusal_harmful_text", "drop_refusal_image": "refusal_harmful_image"}
ALIGNED, REFERENCE = "llm-aligned", "refusal_harmful_text"
_NEEDED = ("combo", "recipe", "seed", "checkpoint", "stage2_step", "metric", "rate")


def replicates_table(runs: list[tuple[Any, pd.DataFrame]]) -> pd.DataFrame:
    """One row per combination × checkpoint × metric from each combination's `metrics.csv`.

    `runs` pairs each `Combo` (seed, varied values) with its metrics table; varied keys become columns."""
    frames = []
    for combo, metrics in runs:
        head = {"combo": combo.id, "recipe": combo.recipe, "seed": combo.seed, **dict(combo.values)}
        frames.append(metrics.assign(**head))
    df = pd.concat(frames, ignore_index=True)
    keys = [k for k, _ in runs[0][0].values] if runs else []
    cols = ["combo", "recipe", "seed", *keys] + [c for c in REPLICATE_COLUMNS[3:]]
    df = df.reindex(columns=cols)
    df["stage2_step"] = df["stage2_step"].astype("Int64")
    return df


def varied_keys(rep: pd.DataFrame) -> list[str]:
    """The varied recipe keys of a replicates table (its columns besides the fixed ones)."""
    return [c for c in rep.columns if c not in REPLICATE_COLUMNS]


def _check(rep: pd.DataFrame, where: str) -> None:
    missing = [c for c in _NEEDED if c not in rep.columns]
    if missing:
        raise VlsafeError(f"{where}: missing column {missing[0]!r}")
    dup = rep.duplicated(["combo", "checkpoint", "metric"])
    if dup.any():
        r = rep[dup].iloc[0]
        raise VlsafeError(f"{where}: row {int(dup.to_numpy().nonzero()[0][0])}: combination {r.combo} has "
                          f"{r.checkpoint} {r.metric} twice")
    seeds = rep.drop_duplicates("combo").groupby("recipe")["seed"]
    if (seeds.count() != seeds.nunique()).any():
        raise VlsafeError(f"{where}: a recipe lists the same seed in two combinations")


def drops(rep: pd.DataFrame) -> pd.DataFrame:
    """Per combination and checkpoint: the drops from llm-aligned's text refusal (rows shaped like `rep`'s)."""
    keys = ["combo", "recipe", "seed", *varied_keys(rep)]
    aligned = rep[(rep.checkpoint == ALIGNED) & (rep.metric == REFERENCE)].set_index("combo")["rate"]
    out = []
    for name, metric in DROPS.items():
        rows = rep[(rep.metric == metric) & ~rep.checkpoint.isin(["llm-base", ALIGNED]) & rep.combo.isin(aligned.index)]
        rows = rows[keys + ["checkpoint", "stage2_step"]].assign(metric=name, rate=aligned.loc[rows.combo].to_numpy()
                                                                 - rows["rate"].to_numpy())
        out.append(rows)
    return pd.concat(out, ignore_index=True)


def summarize(rep: pd.DataFrame, *, where: str = "replicates.csv") -> pd.DataFrame:
    """Per recipe × checkpoint × metric (drops included): n_seeds, mean, sd (ddof 1), min, max of `rate`; recipes,
    checkpoints and metrics in the order `rep` first lists them (a plan's value order: 64, 128, 256, not 128, 256,
    64)."""
    _check(rep, where)
    keys = varied_keys(rep)
    both = pd.concat([rep, drops(rep)], ignore_index=True)
    orders = {"recipe": dict.fromkeys(rep.recipe), "checkpoint": dict.fromkeys(rep.checkpoint),
              "metric": dict.fromkeys(list(rep.metric) + list(DROPS))}
    rank = {col: {v: i for i, v in enumerate(seen)} for col, seen in orders.items()}
    group = ["recipe", *keys, "checkpoint", "metric"]
    stats = both.groupby(group, sort=False, dropna=False)["rate"].agg(
        n_seeds="count", mean="mean", sd=lambda s: s.std(ddof=1), min="min", max="max").reset_index()
    stats = stats.sort_values(list(rank), key=lambda s: s.map(rank[s.name]), kind="stable")
    return stats.reset_index(drop=True)[group + list(SUMMARY_STATS)]
