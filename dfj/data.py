"""Read DFJ splits: the ms-swift `messages` layout the DFJ dataset ships, and a flat form.

A split is a folder holding `data.jsonl` and `images/`; image paths are relative to the folder.
Every line yields either a record or a `RecordError` naming the line and the problem, so a reader
never stops at a bad line and never loses a good one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from dfj import prompts
from dfj.parse import parse_pairwise, parse_pointwise


@dataclass
class PointwiseRecord:
    image: str
    label: str
    response: str
    gold_score: int | None = None
    line: int | None = None  # 1-based line in the source JSONL
    gold_text: str | None = None  # the gold judge output, when the record carries it (ms-swift form)

    mode = "pointwise"

    def responses(self) -> tuple[str, ...]:
        return (self.response,)


@dataclass
class PairwiseRecord:
    image: str
    label: str
    response_a: str
    response_b: str
    gold_choice: Literal["A", "B"] | None = None
    line: int | None = None
    gold_text: str | None = None

    mode = "pairwise"

    def responses(self) -> tuple[str, ...]:
        return (self.response_a, self.response_b)


Record = PointwiseRecord | PairwiseRecord


@dataclass
class RecordError:
    line: int
    message: str
    source: str = ""

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.message}"


@dataclass
class Split:
    """A read split: its records in file order, and one error per line that could not be used."""

    path: Path
    mode: str | None
    records: list[Record] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


class RecordProblem(ValueError):
    """A line that is JSON but not a usable DFJ record."""


def read_split(path: str | os.PathLike, mode: str | None = None, image_root: str | os.PathLike | None = None) -> Split:
    """Read a split folder (its `data.jsonl`) or a JSONL file; images resolve against its folder.

    `mode` forces pointwise/pairwise; otherwise the first usable line decides and lines of the other
    mode are reported as errors.
    """
    path = Path(path)
    if path.is_dir():
        jsonl = path / "data.jsonl"
        if not jsonl.is_file():
            raise ValueError(f"{path}: no data.jsonl in split folder")
    elif path.is_file():
        jsonl = path
    else:
        raise ValueError(f"split not found: {path}")
    root = jsonl.parent.resolve()
    split = Split(path=jsonl, mode=prompts.check_mode(mode) if mode else None)
    with open(jsonl, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue  # blank lines are layout, not records
            try:
                record = parse_line(raw, root, number, Path(image_root) if image_root else None)
                if split.mode is None:
                    split.mode = record.mode
                elif record.mode != split.mode:
                    raise RecordProblem(f"{record.mode} record in a {split.mode} split")
            except RecordProblem as exc:
                split.errors.append(RecordError(number, str(exc), str(jsonl)))
                continue
            split.records.append(record)
    return split


def parse_line(raw: bytes | str, root: Path, line: int = 0, image_root: Path | None = None) -> Record:
    """One JSONL line -> a record; RecordProblem says what is wrong with it. Image paths are relative
    to `root`; absolute ones are taken only inside `image_root` (`resolve_image`)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if not text.strip():
            raise RecordProblem("empty line")
        obj = json.loads(text.removeprefix("\ufeff").rstrip("\r\n"))  # a BOM from Windows editors is not data
    except UnicodeDecodeError:
        raise RecordProblem("line is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RecordProblem(f"malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise RecordProblem(f"expected a JSON object, got {type(obj).__name__}")
    return parse_record(obj, root, line, image_root)


def parse_record(obj: dict[str, Any], root: Path, line: int = 0, image_root: Path | None = None) -> Record:
    if "messages" in obj:
        fields = _from_messages(obj)
    else:
        fields = _from_flat(obj)
    fields["image"] = resolve_image(fields["image"], root, image_root=image_root)
    try:
        fields["label"] = prompts.normalize_label(fields["label"])
    except ValueError as exc:
        raise RecordProblem(str(exc)) from None
    if "response" in fields:
        return PointwiseRecord(line=line, **fields)
    return PairwiseRecord(line=line, **fields)


def resolve_image(value: Any, root: Path, within: str = "the split folder", image_root: Path | None = None) -> str:
    """A relative image path inside `root` (the split folder) -> absolute path; refuse escapes and
    non-files. `within` names the root in messages. An absolute path (ms-swift files carry them) is
    taken only when `image_root` is given and it lies inside it, with no `..` and no symlink out."""
    if not isinstance(value, str) or not value.strip():
        raise RecordProblem(f"image must be a non-empty path string, got {value!r}")
    if "\x00" in value:
        raise RecordProblem("image path contains a NUL byte")
    candidate = Path(value)
    if candidate.is_absolute():
        if image_root is None:
            raise RecordProblem(f"image path {value!r} is absolute; paths must be relative to {within} "
                                "(absolute paths are taken inside the folder given as --image-root)")
        base = Path(image_root).resolve()
        resolved = candidate.resolve()  # follows symlinks: a link out of the image root is an escape
        if ".." in candidate.parts or not resolved.is_relative_to(base):
            raise RecordProblem(f"image path {value!r} escapes the image root {base}")
    else:
        resolved = (root / candidate).resolve()  # follows symlinks: a link out of the split is an escape
        if not resolved.is_relative_to(root):
            raise RecordProblem(f"image path {value!r} escapes {within}")
    if not resolved.exists():
        raise RecordProblem(f"image not found: {value}")
    if not resolved.is_file():
        raise RecordProblem(f"image path {value!r} is not a file")
    return str(resolved)


def _image_field(obj: dict[str, Any]) -> Any:
    if "images" in obj:
        images = obj["images"]
        if not isinstance(images, list) or len(images) != 1:
            raise RecordProblem("'images' must be a list holding exactly one image path")
        item = images[0]
        return item.get("path") if isinstance(item, dict) else item
    if "image" in obj:
        return obj["image"]
    raise RecordProblem("missing field 'images' (or 'image')")


def _from_messages(obj: dict[str, Any]) -> dict[str, Any]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RecordProblem("'messages' must be a list of {role, content} objects")
    users = [m for m in messages if m.get("role") == "user"]
    assistants = [m for m in messages if m.get("role") == "assistant"]
    if len(users) != 1:
        raise RecordProblem(f"expected one user message, found {len(users)}")
    content = users[0].get("content")
    if not isinstance(content, str):
        raise RecordProblem("user message content must be a string")
    prompt = content.replace("\r\n", "\n")
    if prompt.startswith("<image>"):
        prompt = prompt[len("<image>"):].lstrip("\n")
    gold_text = None
    if assistants:
        gold_text = assistants[-1].get("content")
        if not isinstance(gold_text, str):
            raise RecordProblem("assistant message content must be a string")
    fields: dict[str, Any] = {"image": _image_field(obj), "gold_text": gold_text}
    point = prompts.parse_prompt("pointwise", prompt)
    pair = None if point else prompts.parse_prompt("pairwise", prompt)
    if point is not None:
        fields.update(label=point["ground_truth_label"], response=point["candidate_response"])
        fields["gold_score"] = _gold_score(parse_pointwise(gold_text)) if gold_text is not None else None
    elif pair is not None:
        fields.update(
            label=pair["ground_truth_label"], response_a=pair["response_a"], response_b=pair["response_b"]
        )
        fields["gold_choice"] = _gold_choice(parse_pairwise(gold_text)) if gold_text is not None else None
    else:
        raise RecordProblem("user message matches neither the DFJ pointwise nor the pairwise prompt")
    return fields


def _from_flat(obj: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {"image": _image_field(obj)}
    if "label" not in obj:
        raise RecordProblem("missing field 'label'")
    fields["label"] = obj["label"]
    if "response" in obj:
        fields["response"] = _text(obj, "response")
        score = obj.get("score", obj.get("gold_score"))
        if score is not None:
            if isinstance(score, bool) or not isinstance(score, (int, float)) or score != int(score):
                raise RecordProblem(f"score must be an integer 1-5, got {score!r}")
            if not 1 <= int(score) <= 5:
                raise RecordProblem(f"score {score} is outside 1-5")
            score = int(score)
        fields["gold_score"] = score
    elif "response_a" in obj or "response_b" in obj:
        fields["response_a"] = _text(obj, "response_a")
        fields["response_b"] = _text(obj, "response_b")
        choice = obj.get("preferred", obj.get("gold_choice"))
        if choice is not None and choice not in ("A", "B"):
            raise RecordProblem(f"preferred must be 'A' or 'B', got {choice!r}")
        fields["gold_choice"] = choice
    else:
        raise RecordProblem("missing field 'response' (pointwise) or 'response_a'/'response_b' (pairwise)")
    return fields


def _text(obj: dict[str, Any], key: str) -> str:
    if key not in obj:
        raise RecordProblem(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise RecordProblem(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _gold_score(verdict) -> int:
    if verdict.error:
        raise RecordProblem(f"gold judge output is not a valid pointwise verdict: {verdict.error}")
    return verdict.score


def _gold_choice(verdict) -> str:
    if verdict.error:
        raise RecordProblem(f"gold judge output is not a valid pairwise verdict: {verdict.error}")
    return verdict.choice


def record_from_mapping(obj: Any, mode: str) -> Record:
    """A record given in code: a record object, or a mapping with image/label/response(s) keys.

    Images may be paths, bytes or PIL images here; they are loaded later by the judge.
    """
    if isinstance(obj, (PointwiseRecord, PairwiseRecord)):
        if obj.mode != mode:
            raise ValueError(f"{obj.mode} record given to a {mode} judge")
        return obj
    if not hasattr(obj, "keys"):
        raise ValueError(f"a record must be a mapping or a dfj record, not {type(obj).__name__}")
    keys = ("image", "label", "response") if mode == "pointwise" else ("image", "label", "response_a", "response_b")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"record is missing {', '.join(repr(k) for k in missing)}")
    if mode == "pointwise":
        return PointwiseRecord(image=obj["image"], label=obj["label"], response=obj["response"])
    return PairwiseRecord(
        image=obj["image"], label=obj["label"], response_a=obj["response_a"], response_b=obj["response_b"]
    )
