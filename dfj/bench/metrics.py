"""Judge quality metrics against gold labels. A parse failure is a miss, never a score.

Pointwise: RMSE, Pearson and Spearman over the records that parsed, plus the parse-failure rate; a
correlation that is undefined (fewer than two parsed records, or a constant side) is None, not 0.
Pairwise: accuracy over all records, a parse failure counting as wrong.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass
class PointwiseQuality:
    n: int
    parsed: int
    parse_failure_rate: float
    rmse: float | None
    pearson: float | None
    spearman: float | None
    exact: float | None  # share of parsed records whose score equals the gold score

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PairwiseQuality:
    n: int
    parsed: int
    parse_failure_rate: float
    accuracy: float | None  # over all records; a parse failure is a miss

    def to_dict(self) -> dict:
        return asdict(self)


def _correlation(kind: str, a: Sequence[float], b: Sequence[float]) -> float | None:
    import numpy as np
    from scipy import stats

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    value = (stats.pearsonr if kind == "pearson" else stats.spearmanr)(a, b)[0]
    return None if math.isnan(value) else float(value)


def pointwise_quality(predicted: Sequence[int | None], gold: Sequence[int]) -> PointwiseQuality:
    if len(predicted) != len(gold):
        raise ValueError("predicted and gold differ in length")
    pairs = [(p, g) for p, g in zip(predicted, gold) if p is not None]
    n, parsed = len(gold), len(pairs)
    if not pairs:
        return PointwiseQuality(n, 0, 1.0 if n else 0.0, None, None, None, None)
    p = [float(a) for a, _ in pairs]
    g = [float(b) for _, b in pairs]
    rmse = math.sqrt(sum((x - y) ** 2 for x, y in zip(p, g)) / parsed)
    exact = sum(x == y for x, y in zip(p, g)) / parsed
    return PointwiseQuality(n, parsed, (n - parsed) / n, rmse, _correlation("pearson", p, g),
                            _correlation("spearman", p, g), exact)


def pairwise_quality(predicted: Sequence[str | None], gold: Sequence[str]) -> PairwiseQuality:
    if len(predicted) != len(gold):
        raise ValueError("predicted and gold differ in length")
    n = len(gold)
    parsed = sum(p is not None for p in predicted)
    if n == 0:
        return PairwiseQuality(0, 0, 0.0, None)
    correct = sum(p is not None and p == g for p, g in zip(predicted, gold))
    return PairwiseQuality(n, parsed, (n - parsed) / n, correct / n)
