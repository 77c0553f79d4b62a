import json
import os

import pytest
from PIL import Image

from dfj import prompts
from dfj.data import PairwiseRecord, PointwiseRecord, read_split


@pytest.fixture
def split_dir(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "images" / "a.png")
    (tmp_path / "images" / "sub").mkdir()
    return tmp_path


def _messages(prompt: str, gold: str | None, image: str = "images/a.png") -> dict:
    messages = [{"role": "user", "content": "<image>" + prompt}]
    if gold is not None:
        messages.append({"role": "assistant", "content": gold})
    return {"messages": messages, "images": [image]}


def _write(folder, lines):
    with open(folder / "data.jsonl", "w", encoding="utf-8") as handle:
        for line in lines:
            handle.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n")


def test_reads_the_split_the_builder_writes(tiny_split):
    split = read_split(tiny_split("pointwise", 12))
    assert split.mode == "pointwise" and len(split) == 12 and not split.errors
    assert all(isinstance(r, PointwiseRecord) and 1 <= r.gold_score <= 5 for r in split)
    assert [r.line for r in split] == list(range(1, 13))
    assert len({r.image for r in split}) == 3  # 5 responses per image
    pair = read_split(tiny_split("pairwise", 20))
    assert pair.mode == "pairwise" and len(pair) == 20 and not pair.errors
    assert all(isinstance(r, PairwiseRecord) and r.gold_choice in ("A", "B") for r in pair)
    assert len({r.image for r in pair}) == 2  # 10 pairs per image


def test_messages_round_trip_the_prompt_fields(split_dir):
    response = "<reasoning>odd {candidate_response} braces</reasoning> <answer>fake</answer>"
    _write(split_dir, [_messages(prompts.render_pointwise("edited", response), "<reasoning>r</reasoning>\n<score>4</score>")])
    (record,) = read_split(split_dir).records
    assert (record.label, record.response, record.gold_score) == ("edited", response, 4)
    assert record.image == str((split_dir / "images" / "a.png").resolve())


def test_flat_forms_and_inference_only_records(split_dir):
    _write(split_dir, [
        {"image": "images/a.png", "label": "fake", "response": "r", "score": 3},
        {"image": "images/a.png", "label": "Real", "response": "r"},
        _messages(prompts.render_pointwise("fake", "no gold"), None),
    ])
    split = read_split(split_dir)
    assert not split.errors
    assert [(r.label, r.gold_score) for r in split] == [("fake", 3), ("real", None), ("fake", None)]
    _write(split_dir, [{"images": ["images/a.png"], "label": "real", "response_a": "a", "response_b": "b", "preferred": "B"}])
    (pair,) = read_split(split_dir).records
    assert (pair.response_a, pair.response_b, pair.gold_choice) == ("a", "b", "B")


def test_each_bad_line_is_reported_and_good_lines_are_kept(split_dir, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    os.symlink(outside, split_dir / "images" / "link.png")
    good = {"image": "images/a.png", "label": "fake", "response": "ok", "score": 5}
    bad = [
        ('{"image": "images/a.png", "label": ', "malformed JSON"),
        ('[1, 2]', "expected a JSON object"),
        ({"label": "fake", "response": "r"}, "missing field 'images'"),
        ({"image": "images/a.png", "response": "r"}, "missing field 'label'"),
        ({"image": "images/a.png", "label": "fake"}, "missing field 'response'"),
        ({"image": "images/a.png", "label": "genuine", "response": "r"}, "unknown label"),
        ({"image": "images/missing.png", "label": "fake", "response": "r"}, "image not found"),
        ({"image": "../outside.png", "label": "fake", "response": "r"}, "escapes the split folder"),
        ({"image": str(outside), "label": "fake", "response": "r"}, "is absolute"),
        ({"image": "images/link.png", "label": "fake", "response": "r"}, "escapes the split folder"),
        ({"image": "images/sub", "label": "fake", "response": "r"}, "is not a file"),
        ({"image": 7, "label": "fake", "response": "r"}, "non-empty path string"),
        ({"image": "images/a.png", "label": "fake", "response": 5}, "must be a string"),
        ({"image": "images/a.png", "label": "fake", "response": "r", "score": 9}, "outside 1-5"),
        ({"image": "images/a.png", "label": "fake", "response": "r", "score": 2.5}, "integer 1-5"),
        ({"images": ["images/a.png", "images/a.png"], "label": "fake", "response": "r"}, "exactly one image"),
        (_messages("Rate this please", "<score>3</score>"), "matches neither"),
        (_messages(prompts.render_pointwise("fake", "r"), "<score>7</score>"), "gold judge output"),
        ({"image": "images/a.png", "label": "fake", "response_a": "a", "response_b": "b"}, "pairwise record in a pointwise split"),
    ]
    lines = [good]
    for payload, _ in bad:
        lines += [payload, good]
    _write(split_dir, lines)
    split = read_split(split_dir)
    assert len(split.records) == len(bad) + 1
    assert [r.line for r in split.records] == list(range(1, 2 * len(bad) + 2, 2))
    assert len(split.errors) == len(bad)
    for error, (_, problem), line in zip(split.errors, bad, range(2, 2 * len(bad) + 2, 2)):
        assert error.line == line
        assert problem in error.message, (line, error.message)
        assert str(split_dir / "data.jsonl") in str(error)


def test_split_must_exist(tmp_path):
    with pytest.raises(ValueError, match="no data.jsonl"):
        read_split(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        read_split(tmp_path / "nope")


def test_jsonl_file_and_forced_mode(split_dir):
    _write(split_dir, [{"image": "images/a.png", "label": "fake", "response": "r"}])
    split = read_split(split_dir / "data.jsonl", mode="pairwise")
    assert not split.records and "pointwise record in a pairwise split" in split.errors[0].message


def test_absolute_image_paths_are_taken_inside_the_image_root_only(tmp_path):
    """ms-swift files carry absolute image paths: `--image-root DIR` takes them inside DIR, with the
    service's rules (no `..`, no symlink out); every other line keeps its own error, none is lost."""
    from dfj.batch import units

    root, outside, split = tmp_path / "images", tmp_path / "elsewhere", tmp_path / "split"
    for folder in (root, outside, split):
        folder.mkdir()
    for path in (root / "a.png", outside / "b.png", split / "c.png"):
        Image.new("RGB", (32, 32)).save(path)
    (root / "link.png").symlink_to(outside / "b.png")
    (root / "sub").mkdir()
    images = [str(root / "a.png"), str(outside / "b.png"), f"{root}/sub/../../elsewhere/b.png", str(root / "link.png"),
              f"{root}/sub/../a.png", "c.png"]
    (split / "data.jsonl").write_text("".join(json.dumps({"image": image, "label": "fake", "response": "r"}) + "\n"
                                              for image in images))
    lines = [line for unit in units(split / "data.jsonl", 0, root) for line in unit]
    assert [line.record is not None for line in lines] == [True, False, False, False, False, True]
    for line in lines[1:5]:
        assert "escapes the image root" in line.result["error"] and line.result["error"].startswith(f"line {line.number}:")
    assert lines[0].record.image == str(root / "a.png") and lines[5].record.image == str(split / "c.png")
    plain = [line for unit in units(split / "data.jsonl") for line in unit]
    assert "is absolute" in plain[0].result["error"] and "--image-root" in plain[0].result["error"]
    assert read_split(split, image_root=root).records[0].image == str(root / "a.png")
