"""The vlsafe model organism: a safety-aligned LLM and its LLaVA-style adaptation, built offline on CPU.

>>> from vlsafe.experiments.organism import load_config, build_organism
>>> cfg = load_config("tiny")
>>> results, metrics = build_organism(cfg, "runs/organism-tiny")

Stages (each cached in `DIR/<stage>/` with a `stage.json`): llm-base, distill, llm-aligned, vision, lvlm-stage1,
lvlm (+ lvlm-step-N), lvlm-safety-posthoc, lvlm-safety-mixed; then `DIR/metrics.csv`.
"""

from __future__ import annotations

from vlsafe.experiments.organism.api import build_organism, load_config

__all__ = ["build_organism", "load_config"]
