"""One-forward pairwise verdicts (p_a), probability-weighted scores and the position-bias check."""

import math

import numpy as np
import pytest
from PIL import Image

from dfj.judge import Judge
from test_judge_contract import ScriptedRuntime

IMG = Image.new("RGB", (40, 40), (9, 9, 9))


def test_swap_check_maps_the_swapped_verdict_back_to_the_original_letters():
    runtime = ScriptedRuntime(["<answer>A</answer>", "<answer>A</answer>"])  # position bias: always A
    verdict = Judge(runtime, "pairwise").compare(IMG, "fake", "first", "second", swap_check=True)
    assert verdict.choice == "A" and verdict.swapped_choice == "B" and verdict.swap_consistent is False
    assert "Response A:" in runtime.calls[1][1] and runtime.calls[1][1].index("second") < runtime.calls[1][1].index("first")
    runtime = ScriptedRuntime(["<answer>B</answer>", "<answer>A</answer>"])
    verdict = Judge(runtime, "pairwise").compare(IMG, "fake", "first", "second", swap_check=True)
    assert verdict.choice == "B" and verdict.swapped_choice == "B" and verdict.swap_consistent is True
    runtime = ScriptedRuntime(["<answer>B</answer>"])
    assert Judge(runtime, "pairwise").compare(IMG, "fake", "a", "b").swap_consistent is None


@pytest.fixture(scope="module")
def trained():
    import dfj
    from dfj.data import read_split
    from dfj.testing import trained_tiny_judge, trained_tiny_split

    return {mode: (dfj.load_judge(str(trained_tiny_judge(mode))), read_split(trained_tiny_split(mode, "test")).records)
            for mode in ("pointwise", "pairwise")}


@pytest.mark.slow
def test_one_forward_pairwise_gives_the_greedy_choice_on_every_record(trained):
    judge, records = trained["pairwise"]
    for record in records[:40]:
        greedy = judge.compare(record.image, record.label, record.response_a, record.response_b)
        fast = judge.compare(record.image, record.label, record.response_a, record.response_b, fast=True)
        assert greedy.ok and fast.ok
        assert fast.choice == greedy.choice and fast.text == greedy.text
        assert 0.0 <= fast.p_a <= 1.0 and (fast.p_a >= 0.5) == (fast.choice == "A")


@pytest.mark.slow
def test_expected_score_is_the_hand_computed_sum_from_logprobs(trained):
    judge, records = trained["pointwise"]
    runtime = judge.runtime
    for record in records[:5]:
        verdict = judge.score(record.image, record.label, record.response, expected_score=True)
        assert verdict.ok and 1.0 <= verdict.expected_score <= 5.0
        head = verdict.text[: verdict.text.index("<score>") + len("<score>")]
        digits = [runtime.tokenize(head + str(s))[-1] for s in range(1, 6)]
        rows = judge.logprobs(record.image, record.label, record.response, continuation=head + str(verdict.score))
        p = np.exp(rows[-1][digits].astype(np.float64))
        assert verdict.expected_score == pytest.approx(float((p * np.arange(1, 6)).sum() / p.sum()), abs=1e-6)
        assert abs(verdict.expected_score - verdict.score) < 1.0  # greedy picks the most likely score


@pytest.mark.slow
def test_swap_check_on_the_trained_judge(trained):
    judge, records = trained["pairwise"]
    verdicts = [judge.compare(r.image, r.label, r.response_a, r.response_b, fast=True, swap_check=True) for r in records[:10]]
    assert all(v.swapped_choice in ("A", "B") and v.swap_consistent == (v.swapped_choice == v.choice) for v in verdicts)
    assert not math.isnan(sum(v.p_a for v in verdicts))
