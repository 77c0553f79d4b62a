"""The batch-first judging path on the torch runtime: one-forward pairwise verdicts (p_a), probability-
weighted scores, the position-bias check, grouped batches equal to one record at a time."""

import math

import numpy as np
import pytest
from PIL import Image

from dfj.judge import Judge
from test_judge_contract import ScriptedRuntime, chat_of

IMG = Image.new("RGB", (40, 40), (9, 9, 9))


def test_swap_check_maps_the_swapped_verdict_back_to_the_original_letters():
    runtime = ScriptedRuntime(["<answer>A</answer>", "<answer>A</answer>"])  # position bias: always A
    verdict = Judge(runtime, "pairwise", pairwise="generate").compare(IMG, "fake", "first", "second", swap_check=True)
    assert verdict.choice == "A" and verdict.swapped_choice == "B" and verdict.swap_consistent is False
    swapped = chat_of(runtime.calls[0][1][1])
    assert "Response A:" in swapped and swapped.index("second") < swapped.index("first")
    runtime = ScriptedRuntime(["<answer>B</answer>", "<answer>A</answer>"])
    verdict = Judge(runtime, "pairwise", pairwise="generate").compare(IMG, "fake", "first", "second", swap_check=True)
    assert verdict.choice == "B" and verdict.swapped_choice == "B" and verdict.swap_consistent is True
    runtime = ScriptedRuntime(["<answer>B</answer>"])
    assert Judge(runtime, "pairwise", pairwise="generate").compare(IMG, "fake", "a", "b").swap_consistent is None


@pytest.fixture(scope="module")
def trained():
    import dfj
    from dfj.data import read_split
    from dfj.tiny import trained_tiny_judge, trained_tiny_split

    return {mode: (dfj.load_judge(str(trained_tiny_judge(mode))), read_split(trained_tiny_split(mode, "test")).records)
            for mode in ("pointwise", "pairwise")}


@pytest.mark.slow
def test_one_forward_pairwise_gives_the_greedy_choice_on_every_record(trained):
    judge, records = trained["pairwise"]
    generating = Judge(judge.runtime, "pairwise", pairwise="generate")
    batch = records[:40]
    greedy = generating.compare_many(batch)
    answer = judge.compare_many(batch)
    for g, a in zip(greedy, answer):
        assert g.ok and a.ok
        assert a.choice == g.choice and a.text == g.text
        assert 0.0 <= a.p_a <= 1.0 and (a.p_a >= 0.5) == (a.choice == "A")


@pytest.mark.slow
def test_the_cached_path_writes_what_transformers_generate_writes(trained):
    """The reference scripts' path (transformers `generate`, no caches) and the grouped cached path:
    the same greedy text on records sharing images."""
    judge, records = trained["pointwise"]
    batch = records[:10]
    verdicts = judge.score_many(batch)
    for record, verdict in zip(batch, verdicts):
        prompt = judge.prompt(record.image, record.label, *record.responses())
        reference = judge.runtime.decode(judge.runtime.reference_generate(prompt, judge.new_token_limit))
        assert reference.startswith(verdict.text) and verdict.text.endswith("</score>")


@pytest.mark.slow
def test_expected_score_is_the_hand_computed_sum_from_logprobs(trained):
    judge, records = trained["pointwise"]
    runtime = judge.runtime
    for record in records[:5]:
        verdict = judge.score(record.image, record.label, record.response, expected_score=True)
        assert verdict.ok and 1.0 <= verdict.expected_score <= 5.0
        head = verdict.text[: verdict.text.index("<score>") + len("<score>")]
        digits = [runtime.tokenize(head + str(s), True)[-1] for s in range(1, 6)]
        rows = judge.logprobs(record.image, record.label, record.response, continuation=head + str(verdict.score))
        p = np.exp(rows[-1][digits].astype(np.float64))
        assert verdict.expected_score == pytest.approx(float((p * np.arange(1, 6)).sum() / p.sum()), abs=1e-5)
        assert abs(verdict.expected_score - verdict.score) < 1.0  # greedy picks the most likely score


@pytest.mark.slow
def test_swap_check_on_the_trained_judge(trained):
    judge, records = trained["pairwise"]
    verdicts = judge.compare_many(records[:10], swap_check=True)
    assert all(v.swapped_choice in ("A", "B") and v.swap_consistent == (v.swapped_choice == v.choice) for v in verdicts)
    assert not math.isnan(sum(v.p_a for v in verdicts))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_judging_a_file_in_groups_equals_one_record_at_a_time(trained, mode, tmp_path, monkeypatch):
    """`dfj judge --data`: records in runs of one image and label shuffled across images and labels
    (cache hits, misses and evictions), a bad record inside a group; groups really run batched."""
    from batch_parity import assert_batch_equals_single
    from dfj.runtime.torch_cache import CachedForward
    from dfj.tiny import trained_tiny_split

    judge, _ = trained[mode]
    batched_rows = []
    original = CachedForward._padded_suffixes

    def spy(self, group):
        batched_rows.append(len(group))
        return original(self, group)

    monkeypatch.setattr(CachedForward, "_padded_suffixes", spy)
    assert_batch_equals_single(judge, trained_tiny_split(mode, "test"), tmp_path, n=30)
    assert batched_rows and max(batched_rows) > 1
    stats = judge.runtime.cached.stats
    assert stats["prefix_hits"] > 0 and stats["vision_hits"] > 0


@pytest.mark.slow
def test_scores_return_only_what_was_asked_and_match_full_rows(trained):
    from dfj.runtime.base import Scoring

    judge, records = trained["pairwise"]
    record = records[0]
    prompt = judge.prompt(record.image, record.label, *record.responses())
    forced = tuple(judge.runtime.tokenize("<answer>A</answer>", True))
    asked = Scoring(forced, tokens=(forced[1], forced[0]), top_k=3)
    full, picked = judge.runtime.score([prompt, prompt], [Scoring(forced, full=True), asked])
    assert picked.rows is None and picked.tokens.shape == (len(forced), 2) and picked.top_ids.shape == (len(forced), 3)
    assert np.allclose(picked.tokens, full.rows[:, [forced[1], forced[0]]], atol=1e-5)
    assert (picked.top_ids[:, 0] == full.rows.argmax(-1)).all()
    assert np.allclose(np.exp(full.rows).sum(-1), 1.0, atol=1e-4)
