"""The trained tiny judges (issue: quality numbers that mean something without the real weights).

The first run on a machine trains them (about 16 minutes on 2 cores, evaluation included) into the
dfj cache; later runs reuse them. The metrics are measured here, on the held-out synthetic test
split, with greedy verdicts.
"""

import json
import random

import pytest

from dfj.data import read_split
from dfj.synthetic import Scene, detector_response

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def metrics():
    from dfj.testing import trained_tiny_root

    return json.loads((trained_tiny_root() / "metrics.json").read_text())


def test_pointwise_judge_quality(metrics):
    q = metrics["pointwise"]["with_image"]
    assert q["pearson"] >= 0.8 and q["rmse"] <= 0.8, q
    assert q["parse_failure_rate"] <= 0.02, q


def test_pairwise_judge_accuracy(metrics):
    q = metrics["pairwise"]["with_image"]
    assert q["accuracy"] >= 0.85, q


def test_the_pointwise_judge_uses_the_image(metrics):
    """The 200 test records again with the image replaced by flat grey: the pointwise judge gets
    clearly worse, overall and on the records only the pixels decide (a manipulated image, response
    level 5/3 or 2/1: the cited artifact type is right or wrong, and only the image says which).

    What it does not show: that the judge grades by the image there. Its exact-score rate on those
    records is about a coin flip with the image and a little lower without (metrics.json,
    `needs_image`); the pairwise judge's control is reported there and not gated (about 1 point
    overall). Issue 7 stays open on this.
    """
    point = metrics["pointwise"]
    assert point["blank_image"]["n"] == point["with_image"]["n"] == 200
    assert point["blank_image"]["rmse"] >= point["with_image"]["rmse"] + 0.1, point
    assert point["blank_image"]["pearson"] <= point["with_image"]["pearson"] - 0.03, point
    seen, blank = point["needs_image"]["with_image"], point["needs_image"]["blank_image"]
    assert seen["n"] == blank["n"] >= 60, (seen, blank)
    assert blank["rmse"] >= seen["rmse"] + 0.2, (seen, blank)


def test_the_needs_image_subset_is_the_records_the_text_cannot_decide():
    """`meta.needs_image` in the synthetic splits: exactly the manipulated-image records whose levels
    read alike (5/3, 2/1, and for pairs a hedged 4 against a 5 or a 3), none on real images."""
    from dfj.testing import trained_tiny_split

    decided_by_pixels = ({5, 3}, {2, 1}, {5, 4}, {4, 3})
    for mode in ("pointwise", "pairwise"):
        lines = (trained_tiny_split(mode) / "data.jsonl").read_text().splitlines()
        metas = [json.loads(line)["meta"] for line in lines]
        for meta in metas:
            levels = set(meta["levels"])
            expected = meta["artifact"] is not None and (levels != {4} if mode == "pointwise" else levels in decided_by_pixels)
            assert meta["needs_image"] == expected, meta
        assert 0 < sum(m["needs_image"] for m in metas) < len(metas)


def test_training_fits_the_cpu_budget(metrics):
    assert metrics["timings"]["train_total_s"] <= 15 * 60


def test_metrics_are_reproduced_by_a_fresh_evaluation():
    """The cached numbers are what the judge really does: re-judge part of the test split now."""
    import dfj
    from dfj.testing import trained_tiny_judge, trained_tiny_split

    judge = dfj.load_judge(str(trained_tiny_judge("pairwise")))
    records = read_split(trained_tiny_split("pairwise")).records[:40]
    verdicts = judge.compare_many(records)
    accuracy = sum(v.choice == r.gold_choice for v, r in zip(verdicts, records)) / len(records)
    from dfj.testing import trained_tiny_root

    cached = json.loads((trained_tiny_root() / "metrics.json").read_text())["pairwise"]["verdicts"]["with_image"]
    agree = sum(v.choice == c for v, c in zip(verdicts, cached)) / len(records)
    # Greedy on the same weights: the same choices, up to a near-tie flipped by another batch shape.
    assert accuracy >= 0.8 and agree >= 0.95, (accuracy, agree)


def test_splits_are_dfj_layout_and_held_out():
    from dfj.testing import trained_tiny_split

    for mode, per_image in (("pointwise", 5), ("pairwise", 10)):
        train, test = read_split(trained_tiny_split(mode, "train")), read_split(trained_tiny_split(mode, "test"))
        assert not train.errors and not test.errors and train.mode == test.mode == mode
        assert len(test) == len({r.image for r in test}) * per_image
        # Different images: the test images were rendered from another seed.
        train_pixels = {open(r.image, "rb").read() for r in train.records[::per_image]}
        assert not any(open(r.image, "rb").read() in train_pixels for r in test.records[::per_image])


def test_response_levels_need_the_image_to_tell_apart():
    """Levels 5 and 3 (and 2 and 1) use the same wording; only the cited artifact differs."""
    texture_scene, colour_scene = Scene("fake", "texture", "upper left"), Scene("fake", "colour", "upper left")
    fives = {detector_response(random.Random(i), texture_scene, 5) for i in range(50)}
    threes = {detector_response(random.Random(i), colour_scene, 3) for i in range(50)}
    # A level-5 response for one image is word for word a possible level-3 response for another.
    assert fives & threes


def test_training_batches_mark_exactly_the_target_tokens(tmp_path):
    """The loss positions are the target's tokens, found from one processor pass; a target whose
    tokens would merge with the prompt's is refused rather than trained on shifted labels."""
    from PIL import Image
    from transformers import AutoProcessor

    from dfj import prompts
    from dfj.testing import write_processor
    from dfj.training import _batch

    write_processor(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    image = Image.new("RGB", (112, 112), (30, 60, 90))
    chats = [prompts.render_chat("Describe the image."), prompts.render_chat(prompts.render_pairwise("fake", "a", "b"))]
    targets = ["There is a seam.<|im_end|>", "<answer>B</answer><|im_end|>"]
    inputs, positions, labels = _batch(processor, chats, targets, [image, image])
    expected = [processor.tokenizer(t)["input_ids"] for t in targets]
    assert labels.tolist() == expected[0] + expected[1]
    for row, ids in enumerate(expected):  # position p predicts the token at p + 1
        picked = positions[positions[:, 0] == row, 1] + 1
        assert inputs["input_ids"][row, picked].tolist() == ids
    with pytest.raises(ValueError, match="merge with the prompt"):
        _batch(processor, [chats[0] + "ans"], ["wer<|im_end|>"], [image])
