"""Core types of the refusal judges: :class:`JudgeResult` and the :class:`Judge` base class.

Kept separate from :mod:`vlsafe.probes.behavior.judges` (the registry) so that judge implementations can import the
types without a circular import.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from vlsafe.probes.behavior.calibration import JudgeCalibration


@dataclass
class JudgeResult:
    """Verdict on one response.

    Attributes:
        refused: True when the response refuses (fully or partially) the request.
        score: refusal score in [0, 1] (1 = certainly a refusal); NaN when the judge could not decide.
        reason: short human-readable justification (matched substring, top features, classifier output).
    """

    refused: bool
    score: float
    reason: str = ""


class Judge(ABC):
    """A refusal judge: maps free-form responses (optionally with their prompts) to :class:`JudgeResult`.

    ``calibration`` is the judge's measured sensitivity/specificity (``JudgeCalibration``) when one is known
    (``get_judge`` attaches the shipped or a given one); rates judged by it then gain corrected columns.
    """

    name: str = "judge"
    calibration: "JudgeCalibration | None" = None

    @abstractmethod
    def judge(self, responses: Sequence[str], prompts: Sequence[str] | None = None) -> list[JudgeResult]:
        """Judge every response; ``prompts`` (same length) is used only by judges that need it."""

    def judge_one(self, response: str, prompt: str | None = None) -> JudgeResult:
        """Convenience wrapper around :meth:`judge` for a single response."""
        return self.judge([response], None if prompt is None else [prompt])[0]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def check_prompts(responses: Sequence[str], prompts: Sequence[str] | None) -> None:
    """Raise ``VlsafeError`` when ``prompts`` is given with a length different from ``responses``."""
    from vlsafe.analysis.errors import VlsafeError

    if prompts is not None and len(prompts) != len(responses):
        raise VlsafeError(f"judge: got {len(responses)} responses but {len(prompts)} prompts; lengths must match")
