"""What a judge returns: one dataclass per mode. `error` is set whenever there is no verdict."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal


class _VerdictMixin:
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


@dataclass
class PointwiseVerdict(_VerdictMixin):
    score: int | None
    reasoning: str | None
    text: str
    error: str | None = None
    # Σ p(s)·s over the five score tokens at the score position (renormalised): a continuous score.
    expected_score: float | None = None
    provenance: dict[str, Any] | None = None  # dfj.provenance: which judge, input and settings gave it


@dataclass
class PairwiseVerdict(_VerdictMixin):
    choice: Literal["A", "B"] | None
    text: str
    error: str | None = None
    p_a: float | None = None  # P(A) renormalised over A and B at the answer position
    # Position-bias check (compare(..., swap_check=True)): the verdict with B shown first, mapped back
    # to the original letters, and whether the two orders agree.
    swapped_choice: Literal["A", "B"] | None = None
    swap_consistent: bool | None = None
    provenance: dict[str, Any] | None = None  # dfj.provenance: which judge, input and settings gave it


Verdict = PointwiseVerdict | PairwiseVerdict


def failure(mode: str, error: str) -> Verdict:
    """The verdict of a record that could not be judged."""
    if mode == "pointwise":
        return PointwiseVerdict(score=None, reasoning=None, text="", error=error)
    return PairwiseVerdict(choice=None, text="", error=error)
