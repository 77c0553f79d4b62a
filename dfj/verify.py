"""`dfj verify-verdicts`: judge a results file's lines again with the artifact and settings their
provenance names, and say per line whether the verdict is identical.

Every line of `dfj judge --out` carries its run's id and the sha256 of its image and responses; the
sidecar holds the runs (`dfj.provenance`). A line is re-judged only when everything it was judged from
is still what it was: the artifact (the sha256 of its `dfj.json`), the image bytes, the response texts.
Otherwise it is *refused*, with the reason. A line is *identical* when every field of its `dfj` record
(score or choice, text, reasoning, p_a, expected score, swap check, error) is what the re-judging
writes, bit for bit; else *different*, with both. Lines without a verdict (an input error) are skipped.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from dfj.provenance import canonical, read_sidecar

Outcome = Literal["identical", "different", "refused", "skipped"]


@dataclass
class LineCheck:
    line: int
    outcome: Outcome
    reason: str | None = None
    recorded: dict[str, Any] | None = None  # the line's verdict, when different
    rejudged: dict[str, Any] | None = None


@dataclass
class VerifyReport:
    results: str
    artifact: str
    lines: int  # in the results file
    checked: list[LineCheck] = field(default_factory=list)
    runs: dict[str, list[str]] = field(default_factory=dict)  # run id -> how the re-judging run differs

    def count(self, outcome: Outcome) -> int:
        return sum(check.outcome == outcome for check in self.checked)

    @property
    def passed(self) -> bool:
        return not any(check.outcome in ("different", "refused") for check in self.checked)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "counts": {o: self.count(o) for o in ("identical", "different", "refused", "skipped")},
                "passed": self.passed}


@dataclass
class _Entry:
    number: int
    row: dict[str, Any]
    run_id: str
    unit: int  # the line the group it was judged in starts at


def verify_verdicts(results: str | os.PathLike, artifact: str, *, sample: int | None = None, seed: int = 0,
                    public_key: str | os.PathLike | None = None,
                    progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Re-judge all of `results`' lines with a verdict, or a random `sample` of them (seeded). Each
    chosen line's whole unit (the records judged in one runtime call with it) is judged again as one
    group, as it was: a group's arithmetic is the group's, so this is what reproduces it bit for bit."""
    from dfj.batch import judged_field
    from dfj.data import RecordProblem, parse_record

    results = Path(results)
    sidecar = read_sidecar(results)
    input_root = Path(sidecar["input"]).parent
    image_root = Path(sidecar["image_root"]) if sidecar.get("image_root") else None
    entries, report = _read_results(results, sidecar, artifact)
    chosen = entries if sample is None or sample >= len(entries) else sorted(
        random.Random(seed).sample(entries, sample), key=lambda e: e.number)
    units: dict[int, list[_Entry]] = {}
    for entry in entries:
        units.setdefault(entry.unit, []).append(entry)
    wanted = {entry.number for entry in chosen}
    judges: dict[str, Any] = {}
    todo = [unit for _, unit in sorted(units.items()) if any(e.number in wanted for e in unit)]
    for done, unit in enumerate(todo, start=1):
        run_key = unit[0].run_id
        if run_key not in judges:
            judges[run_key] = _judge_for(sidecar["runs"][run_key], artifact, public_key)
            if not isinstance(judges[run_key], str):
                report.runs[run_key] = _differences(sidecar["runs"][run_key], judges[run_key].run)
        judge = judges[run_key]
        records, refused = [], {}
        for entry in unit:
            reason = judge if isinstance(judge, str) else None
            if reason is None and entry.run_id != run_key:
                reason = f"line {entry.number}: judged in one unit with line {unit[0].number} but by another run"
            if reason is None:
                try:
                    record = parse_record({k: v for k, v in entry.row.items() if k != "dfj"}, input_root, entry.number, image_root)
                    reason = _changed(entry, record)
                except (RecordProblem, ValueError, OSError) as exc:
                    reason = f"line {entry.number}: its record no longer reads: {exc}"
            if reason:
                refused[entry.number] = reason
            else:
                records.append((entry, record))
        for entry in unit:
            if entry.number not in wanted:
                continue
            if entry.number in refused:
                report.checked.append(LineCheck(entry.number, "refused", refused[entry.number]))
            elif refused:
                first = min(refused)
                report.checked.append(LineCheck(entry.number, "refused", f"line {entry.number}: judged in one group "
                                                f"with line {first}, which cannot be judged again ({refused[first]})"))
        if refused:
            continue
        options = dict(unit[0].row["dfj"]["provenance"].get("options", {}))
        verdicts = judge.judge_many([record for _, record in records], **options)
        for (entry, _), verdict in zip(records, verdicts):
            if entry.number not in wanted:
                continue
            recorded = {k: v for k, v in entry.row["dfj"].items() if k != "provenance"}
            again = {k: v for k, v in json.loads(json.dumps(judged_field(entry.number, verdict, entry.unit))).items()
                     if k != "provenance"}
            same = canonical(recorded) == canonical(again)
            report.checked.append(LineCheck(entry.number, "identical" if same else "different",
                                            None if same else "the verdict is not the one recorded",
                                            None if same else recorded, None if same else again))
        if progress:
            progress(done, len(todo))
    report.checked.sort(key=lambda check: check.line)
    return report


def _read_results(results: Path, sidecar: dict, artifact: str) -> tuple[list, VerifyReport]:
    """Each line of the results file as an entry to re-judge, or its check (refused, skipped) already."""
    report = VerifyReport(str(results), artifact, 0)
    entries: list[_Entry] = []
    with open(results, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            report.lines += 1
            entry = _entry(number, raw, sidecar)
            if isinstance(entry, LineCheck):
                report.checked.append(entry)
            else:
                entries.append(entry)
    return entries, report


def _entry(number: int, raw: bytes, sidecar: dict) -> _Entry | LineCheck:
    if not raw.endswith(b"\n"):
        return LineCheck(number, "refused", f"line {number} is torn (no end of line): a write was cut short")
    try:
        row = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return LineCheck(number, "refused", f"line {number} is not JSON ({exc}): edited or torn")
    field_ = row.get("dfj") if isinstance(row, dict) else None
    if not isinstance(field_, dict) or field_.get("line") != number:
        return LineCheck(number, "refused", f"line {number} is not line {number} of a dfj results file (foreign or moved)")
    if "text" not in field_:
        return LineCheck(number, "skipped", f"line {number} has no verdict: {field_.get('error')}")
    provenance = field_.get("provenance")
    if not isinstance(provenance, dict) or provenance.get("run_id") not in sidecar["runs"]:
        return LineCheck(number, "refused", f"line {number} names no run of this file's sidecar (foreign, or made without provenance)")
    if not isinstance(provenance.get("unit"), int) or not 0 < provenance["unit"] <= number:
        return LineCheck(number, "refused", f"line {number} names no unit it was judged in (edited)")
    return _Entry(number, row, provenance["run_id"], provenance["unit"])


def _judge_for(run: dict, artifact: str, public_key) -> Any:
    """The judge with the run's settings, or why the artifact is not the run's."""
    import dfj

    described = run["runtime"]
    judge = dfj.load_judge(artifact, runtime=described["runtime"], device=described.get("device", "cpu"),
                           dtype=_dtype(described.get("dtype")), mode=run["artifact"]["mode"],
                           max_new_tokens=run["max_new_tokens"], pairwise=run["pairwise"] or "answer",
                           public_key=public_key)
    recorded, seen = run["artifact"]["identity"], judge.run["artifact"]["identity"]
    if canonical(recorded) != canonical(seen):
        return (f"{artifact} is not the artifact that made these verdicts: its identity {_short(seen)} differs from "
                f"the recorded {_short(recorded)}")
    return judge


def _dtype(described: str | None) -> str | None:
    """The torch dtype a run names ("torch.float32") as load_judge takes it; other runtimes name none."""
    return described.removeprefix("torch.") if described else None


def _short(identity: dict) -> str:
    return ", ".join(f"{role} {value.get('sha256', '?')[:16]}…" for role, value in identity.items()) or "(none)"


def _differences(recorded: dict, now: dict, prefix: str = "") -> list[str]:
    """How the re-judging run differs from the recorded one (CPU level, library versions, …)."""
    found = []
    for key in sorted(set(recorded) | set(now)):
        a, b = recorded.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return found


def _changed(entry: _Entry, record) -> str | None:
    """Why a line cannot be re-judged as it was: its image or a response is not what was judged."""
    from dfj.images import read_image
    from dfj.provenance import text_sha256

    provenance = entry.row["dfj"]["provenance"]
    try:
        _, digest = read_image(record.image)
    except ValueError as exc:
        return f"line {entry.number}: {exc}"
    if digest != provenance.get("image_sha256"):
        return f"line {entry.number}: the image {record.image} is not the one judged (its sha256 changed)"
    if [text_sha256(r) for r in record.responses()] != provenance.get("responses_sha256"):
        return f"line {entry.number}: its response text is not the one judged (the line was edited)"
    return None
