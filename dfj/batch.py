"""Batch judging of a JSONL file into a JSONL file: one output line per input line, in input order.

Each output line is the input object with a `dfj` field added (the verdict, or `error` naming the
problem), in the spirit of ms-swift's `swift infer` result files. The input is streamed and every
line is flushed as it is written, so a killed run keeps what it finished; `resume=True` checks that
the finished lines belong to this input, drops a torn last line, and continues, giving the same file
as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from dfj.data import RecordProblem, parse_line
from dfj.groups import GROUP_SIZE, chunk_groups, group_key

# A line over this size is an error, not a read: memory stays bounded whatever the input holds.
MAX_LINE_BYTES = 16 << 20
FIELD = "dfj"

Progress = Callable[[int, int], None]


@dataclass
class BatchSummary:
    out: Path
    lines: int  # input lines, all accounted for in `out`
    resumed: int  # lines already done by an earlier run
    judged: int  # lines with a verdict
    unparsed: int  # lines judged, but the judge's output held no valid verdict (a miss, never a guess)
    errors: int  # lines that could not be judged: bad record, image or runtime failure

    def count(self, line: "_Line") -> None:
        if line.result.get("error") is None:
            self.judged += 1
        elif "text" in line.result:
            self.unparsed += 1
        else:
            self.errors += 1


def input_jsonl(path: str | os.PathLike) -> Path:
    """A split folder (its data.jsonl) or a JSONL file."""
    path = Path(path)
    if path.is_dir():
        path = path / "data.jsonl"
    if not path.is_file():
        raise ValueError(f"no JSONL input at {path}")
    return path


def judge_jsonl(
    judge,
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    expected_score: bool = False,
    swap_check: bool = False,
    image_root: str | os.PathLike | None = None,
) -> BatchSummary:
    """Judge every line of `source` (a split folder or JSONL file) into `out`. Consecutive records of
    one image and label go to the judge as one group (`Judge.judge_many`); only one group's lines are
    held at a time, whatever the file's size. Absolute image paths are taken inside `image_root` only.
    The judge's run (its provenance, `dfj.provenance`) goes to `out`'s sidecar before any line."""
    from dfj.provenance import record_run

    source, out, total, done = prepare_output(source, out, resume, overwrite, image_root)
    record_run(out, judge.run, judge.source, source, continuing=done > 0, image_root=image_root)
    summary = BatchSummary(out=out, lines=total, resumed=done, judged=0, unparsed=0, errors=0)
    with open_output(out, resume, done) as sink:
        for unit in units(source, done, image_root):
            for line, row in zip(unit, judge_unit(judge, unit, expected_score=expected_score, swap_check=swap_check)):
                summary.count(line)
                sink.write(row)
                sink.flush()
                if progress:
                    progress(line.number, total)
    return summary


def prepare_output(source: str | os.PathLike, out: str | os.PathLike, resume: bool, overwrite: bool,
                   image_root: str | os.PathLike | None = None) -> tuple[Path, Path, int, int]:
    """(input file, output file, input lines, lines already done) after the checks every engine makes:
    the output is not the input, and an existing output is resumed (checked to come from this input)
    or replaced only when asked. A resumed file continues at the start of the first unit it does not
    hold whole: a unit is judged as one group again, so the file is the one an uninterrupted run writes."""
    source = input_jsonl(source)
    out = Path(out)
    if out.resolve() == source.resolve():
        raise ValueError("the output file must not be the input file")
    total = _count_lines(source)
    done = 0
    if out.exists():
        if resume:
            done = _unit_start(source, _check_finished(out, source), image_root)
        elif not overwrite:
            raise FileExistsError(f"{out} already exists (pass --resume to continue it, --force to replace it)")
    return source, out, total, done


@contextlib.contextmanager
def open_output(out: Path, resume: bool, done: int) -> Iterator[BinaryIO]:
    """The output file, positioned after its `done` finished lines (a line torn by a kill goes)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    appending = resume and out.exists()
    with open(out, "r+b" if appending else "wb") as sink:
        if appending:
            sink.seek(_finished_bytes(out, done))
            sink.truncate()
        yield sink


def _unit_start(source: Path, done: int, image_root: str | os.PathLike | None) -> int:
    """The lines to keep of `done` finished ones: all of them when line `done` ends a unit, else those
    before the unit it belongs to."""
    if done == 0:
        return 0
    for unit in units(source, 0, image_root):
        if unit[-1].number >= done:
            return done if unit[-1].number == done else unit[0].number - 1
    return done


def units(source: Path, done: int = 0, image_root: str | os.PathLike | None = None) -> Iterator[list["_Line"]]:
    """The input's lines after line `done`, parsed, in the units one `judge_many` call judges
    (`dfj.groups.chunk_groups`: a run of one image and label, at most GROUP_SIZE records), bad lines
    staying where they are, at most 4 x GROUP_SIZE lines."""
    root = source.parent.resolve()

    def lines() -> Iterator[_Line]:
        for number, raw, start in _lines(source):
            if number > done:
                line = _read_line(raw, number, root, image_root)
                line.offset = start
                yield line

    # A run of bad lines inside a group is cut too: memory stays bounded.
    yield from chunk_groups(lines(), key=lambda line: None if line.record is None else group_key(line.record.image, line.record.label),
                            limit=4 * GROUP_SIZE)


def read_unit(source: Path, offset: int, first: int, count: int, image_root: str | os.PathLike | None = None) -> list["_Line"]:
    """A unit `units` found, read again where it lies: `count` lines from byte `offset`, numbered from
    `first` (how another process, given only the unit's place, gets its lines)."""
    root = source.parent.resolve()
    lines = []
    for number, raw, start in _lines(source, offset, first):
        if number >= first + count:
            break
        line = _read_line(raw, number, root, image_root)
        line.offset = start
        lines.append(line)
    return lines


def judge_unit(judge, unit: list["_Line"], *, expected_score: bool = False, swap_check: bool = False) -> list[bytes]:
    """The output line of each input line of a unit (one `judge_many` call for its records)."""
    records = [line.record for line in unit if line.record is not None]
    verdicts = iter(judge.judge_many(records, expected_score=expected_score, swap_check=swap_check) if records else [])
    rows = []
    for line in unit:
        if line.record is not None:
            _add_verdict(line, next(verdicts), unit[0].number)
        rows.append(_dump({**line.original, FIELD: _field(line)}))
    return rows


def judged_field(number: int, verdict, unit: int) -> dict[str, Any]:
    """The `dfj` field `dfj judge --out` writes for line `number` whose record got `verdict` in the
    unit (one runtime call) that starts at line `unit`."""
    line = _Line(number, {}, {})
    _add_verdict(line, verdict, unit)
    return _field(line)


def _field(line: "_Line") -> dict[str, Any]:
    return {"line": line.number, **line.result, "error": line.result.get("error")}


@dataclass
class _Line:
    number: int
    original: dict[str, Any]  # the input object, carried into the output
    result: dict[str, Any]  # what goes under FIELD
    record: Any = None  # the parsed record, None when the line could not be one
    offset: int = 0  # where the line starts in the input file


def _read_line(raw: bytes | None, number: int, root: Path, image_root: str | os.PathLike | None = None) -> _Line:
    """One input line, parsed; a bad line carries its error. Never raises."""
    original, result = _original(raw)
    line = _Line(number, original, result)
    if raw is None:
        result["error"] = f"line {number}: longer than {MAX_LINE_BYTES} bytes"
    elif "error" not in result:
        try:
            line.record = parse_line(raw, root, number, Path(image_root) if image_root else None)
        except (RecordProblem, ValueError, OSError) as exc:
            result["error"] = f"line {number}: {exc}"
    return line


def _add_verdict(line: _Line, verdict, unit: int) -> None:
    """A failure verdict (the record could not be judged) names the line already; a verdict whose
    output held no valid verdict keeps its text and says so. Its provenance names its run by id (the
    sidecar holds the run) and the unit it was judged in (the line that unit starts at): a verdict is
    reproduced bit for bit by judging the same group again."""
    from dfj.provenance import file_provenance

    fields = verdict.to_dict()
    fields["provenance"] = file_provenance(fields.get("provenance"), unit)
    if verdict.error and not verdict.text:
        line.result["error"] = verdict.error
        return
    line.result.update(fields)
    if verdict.error:
        line.result["error"] = f"line {line.number}: judge output unusable: {verdict.error}"


def _original(raw: bytes | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The input object to carry into the output, or (for a line that is not one) its text."""
    if raw is None:
        return {}, {}
    text = raw.decode("utf-8", errors="replace")
    try:
        obj = json.loads(text.removeprefix("\ufeff"))
    except json.JSONDecodeError:
        return {}, {"input": text.rstrip("\r\n")}
    if not isinstance(obj, dict):
        return {}, {"input": text.rstrip("\r\n")}
    obj.pop(FIELD, None)  # a re-judged output file: the old verdict is replaced, not nested
    return obj, {}


def _dump(row: dict[str, Any]) -> bytes:
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


def _lines(path: Path, offset: int = 0, first: int = 1) -> Iterator[tuple[int, bytes | None, int]]:
    """(1-based number, bytes, start offset) per line, from byte `offset` (line `first`); None for a
    line over MAX_LINE_BYTES (skipped, not held)."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        number = first - 1
        while True:
            start = handle.tell()
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := handle.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass
                yield number, None, start
            else:
                yield number, raw, start


def _count_lines(path: Path) -> int:
    count = 0
    last = b"\n"
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _finished_rows(out: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Complete, parseable lines of an earlier output file, with their end offsets."""
    offset = 0
    with open(out, "rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                return  # torn by a kill mid-write
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                return
            if not isinstance(row, dict) or not isinstance(row.get(FIELD), dict):
                return
            offset += len(raw)
            yield offset, row


def _check_finished(out: Path, source: Path) -> int:
    """How many leading lines of `out` are done, after checking they were made from `source`."""
    done = 0
    inputs = _lines(source)
    for _, row in _finished_rows(out):
        number, raw, _ = next(inputs, (None, None, None))
        if number is None or row[FIELD].get("line") != number:
            raise ValueError(f"{out} has more or other lines than {source}; it is not a partial run over it")
        original, result = _original(raw)
        carried = {k: v for k, v in row.items() if k != FIELD}
        if carried != original or result.get("input", None) != row[FIELD].get("input"):
            raise ValueError(f"{out} line {number} was not made from line {number} of {source}; not resuming")
        done = number
    return done


def _finished_bytes(out: Path, done: int) -> int:
    offset = 0
    for index, (end, _) in enumerate(_finished_rows(out), start=1):
        if index > done:
            break
        offset = end
    return offset
