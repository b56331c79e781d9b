"""The "Where safety is lost" report section: sentences generated from the numbers, parts only for tables present."""

from __future__ import annotations

import numpy as np
import pandas as pd

from vlsafe.experiments.report.locate_section import findings, locate_section


def _patching(values: dict[tuple[int, str], float], image: str = "none") -> pd.DataFrame:
    return pd.DataFrame([{"layer": l, "component": c, "direction": "restore", "image": image, "recovered": v,
                          "ci_low": v - 0.1, "ci_high": v + 0.1, "n": 10, "n_dropped": 0}
                         for (l, c), v in values.items()])


def test_findings_follow_the_numbers() -> None:
    pt = _patching({(0, "resid"): 0.1, (1, "resid"): 0.3, (2, "resid"): 0.7, (0, "attn_out"): 0.05,
                    (1, "mlp_out"): 0.42, (2, "attn_out"): 0.2})
    corr = pd.DataFrame([{"signal_a": "a", "signal_b": "b", "spearman": 0.8, "ci_low": 0.5, "ci_high": 0.95,
                          "n_layers": 30},
                         {"signal_a": "a", "signal_b": "c", "spearman": 0.1, "ci_low": -0.3, "ci_high": 0.4,
                          "n_layers": 30}])
    text = findings({"patching": pt, "signals_corr": corr})
    assert any("layer 1 mlp_out (0.42 [0.32, 0.52]" in s for s in text), text
    assert any("half the gap from layer 2 on" in s for s in text), text
    assert any("a and b agree" in s for s in text) and not any("a and c" in s for s in text)
    assert any("1 of 2 signal pairs" in s for s in text)


def test_undefined_recovery_is_said_and_section_renders() -> None:
    pt = _patching({(0, "resid"): np.nan, (0, "attn_out"): np.nan})
    pt["n_dropped"] = 5
    text = findings({"patching": pt})
    assert text == ["Patching (text only): recovery undefined at every site — the two checkpoints score alike on "
                    "these prompts (5 prompts dropped)."]
    sig = pd.DataFrame({"layer": [0, 1, 2], "weight_shift": [0.1, 0.2, 0.3]})
    tags = []
    html = locate_section({"patching": pt, "signals": sig},
                          figure=lambda key, fig, caption: tags.append(key) or f"<figure>{caption}</figure>")
    assert "Where safety is lost" in html and "recovery undefined" in html
    assert tags == ["signals", "patching"] and "<figure>Recovered fraction" in html
    assert "No vlsafe locate run" in locate_section({})
