"""The pieces findings are written with: a rate with its interval, the disjointness test, number wording."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd


@dataclass(frozen=True)
class Finding:
    """One generated sentence: `key` names its kind (stable, for tests), `anchor` the HTML id of its figure,
    `values` the numbers it states, exactly as read from the table."""

    key: str
    text: str
    anchor: str
    values: dict[str, float] = field(default_factory=dict)

    @property
    def link_text(self) -> str:
        """What the anchor points at: `table` (`tab-*` anchors) or `figure`."""
        return "table" if self.anchor.startswith("tab-") else "figure"


@dataclass(frozen=True)
class Rate:
    """A rate with its Wilson 95 % interval (nan when the table has none), n, and the seeds it rests on."""

    value: float
    lo: float = math.nan
    hi: float = math.nan
    n: int | None = None
    runs: str = "one run"


def disjoint(a: Rate, b: Rate) -> bool:
    """True when both intervals are known and do not overlap."""
    if any(math.isnan(x) for x in (a.lo, a.hi, b.lo, b.hi)):
        return False
    return a.hi < b.lo or b.hi < a.lo


def pct(x: float) -> str:
    """A rate in whole percent (`0.583` → `58%`)."""
    return f"{100 * x:.0f}%"


def rate_text(r: Rate, who: str | None = None) -> str:
    """`58% [46, 70] (lvlm, n = 60)`: the rate, its interval and, in brackets, whose it is and n, when known."""
    s = pct(r.value)
    if not (math.isnan(r.lo) or math.isnan(r.hi)):
        s += f" [{100 * r.lo:.0f}, {100 * r.hi:.0f}]"
    tail = [x for x in (who, f"n = {r.n}" if r.n is not None else None) if x]
    return s + (f" ({', '.join(tail)})" if tail else "")


def runs_text(row: pd.Series) -> str:
    """How many seeds a row rests on: its `n_seeds` column when present, else one run."""
    k = row.get("n_seeds")
    if k is None or pd.isna(k) or int(k) == 1:
        return "one run"
    return f"mean of {int(k)} seeds"


def layer_ranges(layers: list[int]) -> str:
    """`[1, 2, 3, 5, 7, 8]` → `1–3, 5, 7–8`."""
    out: list[str] = []
    for x in sorted(layers):
        if out and out[-1].split("–")[-1] == str(x - 1):
            out[-1] = out[-1].split("–")[0] + f"–{x}"
        else:
            out.append(str(x))
    return ", ".join(out)


def concentrated(values: pd.Series) -> list[int] | None:
    """The layers within half of the peak when the profile is concentrated (peak ≥ 2 × median and those layers
    are at most half of all), else None."""
    v = values.dropna()
    if v.empty or v.max() <= 0:
        return None
    top = [int(i) for i in v.index[v >= v.max() / 2]]
    return top if v.max() >= 2 * v.median() and len(top) <= len(v) / 2 else None
