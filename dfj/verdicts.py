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


@dataclass
class PairwiseVerdict(_VerdictMixin):
    choice: Literal["A", "B"] | None
    text: str
    error: str | None = None


Verdict = PointwiseVerdict | PairwiseVerdict
