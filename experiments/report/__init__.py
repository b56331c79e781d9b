"""The HTML report: discover a run directory's artefacts, draw the paper's figures, write one page."""

from vlsafe.experiments.report.build import build_report

__all__ = ["build_report"]
