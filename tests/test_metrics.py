import math

import pytest

from dfj.bench.metrics import pairwise_quality, pointwise_quality


def test_pointwise_by_hand():
    q = pointwise_quality([1, 2, 4, 5], [1, 3, 3, 5])
    assert q.rmse == pytest.approx(math.sqrt(2 / 4))
    assert q.exact == 0.5 and q.parse_failure_rate == 0.0
    # Pearson by hand: means 3 and 3; cov = (4 + 0 + 0 + 4) / 4 = 2; var p = 2.5, var g = 2
    assert q.pearson == pytest.approx(8 / math.sqrt(10 * 8))
    assert q.spearman == pytest.approx(0.9486832980505138)


def test_parse_failures_are_misses_not_scores():
    q = pointwise_quality([None, 3, None, 5], [1, 3, 2, 4])
    assert (q.n, q.parsed, q.parse_failure_rate) == (4, 2, 0.5)
    assert q.rmse == pytest.approx(math.sqrt(1 / 2))
    assert pointwise_quality([None, None], [1, 2]).to_dict() == {
        "n": 2, "parsed": 0, "parse_failure_rate": 1.0, "rmse": None, "pearson": None, "spearman": None, "exact": None}


def test_undefined_correlations_are_none():
    assert pointwise_quality([3, 3, 3], [1, 2, 5]).pearson is None  # constant prediction
    assert pointwise_quality([1, 2, 3], [4, 4, 4]).spearman is None  # constant gold
    assert pointwise_quality([2], [2]).pearson is None  # one point
    ties = pointwise_quality([1, 1, 2, 2], [1, 2, 1, 2])
    assert ties.pearson == pytest.approx(0.0) and ties.spearman == pytest.approx(0.0)


def test_pairwise_accuracy_counts_failures_as_wrong():
    q = pairwise_quality(["A", "B", None, "A"], ["A", "A", "B", "A"])
    assert (q.accuracy, q.parsed, q.parse_failure_rate) == (0.5, 3, 0.25)
    assert pairwise_quality([], []).accuracy is None
    with pytest.raises(ValueError):
        pairwise_quality(["A"], [])


def test_spearman_uses_average_ranks_for_ties():
    # ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]; against [1, 2, 3, 4]: cov 4.5, var 4.5 and 5 (sums)
    q = pointwise_quality([1, 2, 2, 3], [1, 2, 3, 4])
    assert q.spearman == pytest.approx(4.5 / math.sqrt(4.5 * 5))
