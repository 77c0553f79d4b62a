"""The check every runtime's tests make: `dfj judge --data` (grouped) equals one record at a time."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from dfj.batch import judge_jsonl


def shuffled_split(split: Path, folder: Path, n: int, seed: int = 0) -> tuple[Path, int]:
    """The first `n` records of `split` in runs of one image and label (1 to 5 long), the runs shuffled
    across images and labels, and a bad record (blank response) inside the longest run. Returns the
    JSONL file and the bad record's 0-based line index."""
    from dfj.data import read_split

    root = split.resolve()
    lines = []
    for record in read_split(split).records[:n]:
        line = {"image": str(Path(record.image).resolve().relative_to(root)), "label": record.label}
        line.update({"response": record.response} if hasattr(record, "response")
                    else {"response_a": record.response_a, "response_b": record.response_b})
        lines.append(line)
    rng = random.Random(seed)
    runs, current = [], []
    for line in lines:
        same = current and (current[-1]["image"], current[-1]["label"]) == (line["image"], line["label"])
        if current and (not same or len(current) >= rng.randint(1, 5)):
            runs.append(current)
            current = []
        current.append(line)
    runs.append(current)
    rng.shuffle(runs)
    longest = max(range(len(runs)), key=lambda i: len(runs[i]))
    bad = dict(runs[longest][0])
    bad.update({"response": "   "} if "response" in bad else {"response_a": "   "})
    runs[longest].insert(len(runs[longest]) // 2, bad)
    ordered = [line for run in runs for line in run]
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "images").exists():
        shutil.copytree(split / "images", folder / "images")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in ordered), encoding="utf-8")
    return data, ordered.index(bad)


def assert_batch_equals_single(judge, split: Path, folder: Path, n: int = 30, p_a_atol: float = 1e-4) -> list[dict]:
    """Grouped `judge_jsonl` output against `score`/`compare` per record: same text and choice, p_a within
    `p_a_atol`, the bad record alone carries an error. Returns the output rows."""
    data, bad = shuffled_split(split, folder, n)
    out = folder / "out.jsonl"
    judge_jsonl(judge, data, out, overwrite=True)
    rows = [json.loads(raw) for raw in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == n + 1
    assert [i for i, row in enumerate(rows) if row["dfj"]["error"] and "text" not in row["dfj"]] == [bad]
    assert "is empty" in rows[bad]["dfj"]["error"] and rows[bad]["dfj"]["error"].startswith(f"line {bad + 1}:")
    for index, row in enumerate(rows):
        if index == bad:
            continue
        image = folder / row["image"]
        if judge.mode == "pointwise":
            single = judge.score(image, row["label"], row["response"])
            assert row["dfj"]["text"] == single.text and row["dfj"]["score"] == single.score, index
        else:
            single = judge.compare(image, row["label"], row["response_a"], row["response_b"])
            assert row["dfj"]["choice"] == single.choice and row["dfj"]["text"] == single.text, index
            assert abs(row["dfj"]["p_a"] - single.p_a) <= p_a_atol, (index, row["dfj"]["p_a"], single.p_a)
    return rows
