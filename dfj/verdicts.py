"""What a judge returns: one dataclass per mode. `error` is set whenever there is no verdict."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal


@dataclass
class PointwiseVerdict:
    score: int | None
    reasoning: str | None
    text: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PairwiseVerdict:
    choice: Literal["A", "B"] | None
    text: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Verdict = PointwiseVerdict | PairwiseVerdict
