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
    verdict = Judge(runtime, "pairwise", fast=False).compare(IMG, "fake", "first", "second", swap_check=True)
    assert verdict.choice == "A" and verdict.swapped_choice == "B" and verdict.swap_consistent is False
    assert "Response A:" in runtime.calls[1][1] and runtime.calls[1][1].index("second") < runtime.calls[1][1].index("first")
    runtime = ScriptedRuntime(["<answer>B</answer>", "<answer>A</answer>"])
    verdict = Judge(runtime, "pairwise", fast=False).compare(IMG, "fake", "first", "second", swap_check=True)
    assert verdict.choice == "B" and verdict.swapped_choice == "B" and verdict.swap_consistent is True
    runtime = ScriptedRuntime(["<answer>B</answer>"])
    assert Judge(runtime, "pairwise", fast=False).compare(IMG, "fake", "a", "b").swap_consistent is None


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
        greedy = judge.compare(record.image, record.label, record.response_a, record.response_b, fast=False)
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
        assert verdict.expected_score == pytest.approx(float((p * np.arange(1, 6)).sum() / p.sum()), abs=1e-5)
        assert abs(verdict.expected_score - verdict.score) < 1.0  # greedy picks the most likely score


@pytest.mark.slow
def test_swap_check_on_the_trained_judge(trained):
    judge, records = trained["pairwise"]
    verdicts = [judge.compare(r.image, r.label, r.response_a, r.response_b, fast=True, swap_check=True) for r in records[:10]]
    assert all(v.swapped_choice in ("A", "B") and v.swap_consistent == (v.swapped_choice == v.choice) for v in verdicts)
    assert not math.isnan(sum(v.p_a for v in verdicts))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_cached_and_uncached_paths_agree_on_mixed_batches(trained, mode):
    """Records interleaved across images and labels (cache hits, misses and evictions), responses of
    different lengths: identical verdicts, logits within 1e-4."""
    import random

    judge, records = trained[mode]
    mixed = records[:30]
    random.Random(0).shuffle(mixed)
    assert len({r.image for r in mixed}) >= 3 and len({r.label for r in mixed}) >= 2
    fast = judge.judge_many(mixed)
    slow = [judge.score(r.image, r.label, r.response, fast=False) if mode == "pointwise"
            else judge.compare(r.image, r.label, r.response_a, r.response_b, fast=False) for r in mixed]
    assert [v.text for v in fast] == [v.text for v in slow]
    runtime = judge.runtime
    for record, verdict in list(zip(mixed, slow))[:6]:
        pil, chat = judge._prepare(record.image, record.label, record.responses())
        ids = runtime.tokenize(verdict.text)
        cached = runtime.logprobs_ids_cached(pil, chat, ids, judge._prefix_chars(chat, record.label))
        assert np.abs(cached - runtime.logprobs_ids(pil, chat, ids)).max() <= 1e-4
    stats = runtime.cached.stats
    assert stats["prefix_hits"] > 0 and stats["vision_hits"] > 0


@pytest.mark.slow
def test_batched_decoding_of_records_sharing_an_image_gives_the_same_verdicts(trained):
    """score_many decodes the responses of one image together (padded, masked): same outputs."""
    judge, records = trained["pointwise"]
    batch = records[:15]  # three images, five responses each
    before = judge.runtime.cached.seconds["decode"]
    batched = judge.score_many(batch)
    plain = [judge.score(r.image, r.label, r.response, fast=False) for r in batch]
    assert [v.text for v in batched] == [v.text for v in plain]
    assert judge.runtime.cached.seconds["decode"] > before


@pytest.mark.slow
def test_batched_pairwise_of_records_sharing_an_image_gives_the_same_p_a(trained, monkeypatch):
    """compare_many runs the pairs of one image as one padded batch: same choices as greedy, p_a as
    one record at a time (≤ 1e-4); a bad record inside a group gets its own error."""
    from dfj.runtime.torch_cache import CachedForward

    judge, records = trained["pairwise"]
    batch = list(records[:20])
    assert len({r.image for r in batch}) < len(batch)  # several pairs per image: groups form
    bad = dict(image=batch[3].image, label=batch[3].label, response_a="   ", response_b="fine")
    batched_rows = []
    original = CachedForward._padded_suffixes

    def spy(self, group):
        batched_rows.append(len(group))
        return original(self, group)

    monkeypatch.setattr(CachedForward, "_padded_suffixes", spy)
    batched = judge.compare_many(batch[:3] + [bad] + batch[3:])
    assert batched_rows and max(batched_rows) > 1
    assert not batched[3].ok and "record 3" in batched[3].error and "response_a is empty" in batched[3].error
    batched = batched[:3] + batched[4:]
    single = [judge.compare(r.image, r.label, r.response_a, r.response_b) for r in batch]
    greedy = [judge.compare(r.image, r.label, r.response_a, r.response_b, fast=False) for r in batch]
    assert [v.choice for v in batched] == [v.choice for v in single] == [v.choice for v in greedy]
    assert max(abs(a.p_a - b.p_a) for a, b in zip(batched, single)) <= 1e-4
