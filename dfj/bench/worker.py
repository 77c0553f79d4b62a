"""One judge's bench run, in its own process, forked by the bench's server for its runtime
(`dfj.bench.forkserver`).

A process per judge gives each its own load time and peak memory, and an artifact that crashes its
runtime cannot take the bench down. Every finished record is appended (and flushed) to the judge's
cache folder, so an interrupted bench resumes where it stopped. Progress goes to stdout as
`PROGRESS done total` lines for the parent's progress bar.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dfj.bench.parity import ReferenceRows, token_parity
from dfj.verdicts import failure

VERDICTS = "verdicts.jsonl"
VISION = "vision.jsonl"  # one row per image: the reference's embedding shape, an artifact's parity
STATS = "stats.json"


@dataclass
class WorkerSpec:
    source: str
    role: str  # "reference" keeps its logit rows; "artifact" is compared with them
    mode: str
    data: str
    indices: list[int]
    cache: str
    runtime: str = "torch"
    device: str = "cpu"
    dtype: str | None = None
    max_new_tokens: int | None = None
    reference_cache: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> "WorkerSpec":
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def finished(cache: Path, name: str = VERDICTS, key: str = "index") -> dict[Any, dict[str, Any]]:
    """Rows already done, by record index (or `key`) (complete lines only: a kill can tear the last one)."""
    rows: dict[Any, dict[str, Any]] = {}
    path = Path(cache) / name
    if not path.is_file():
        return rows
    with open(path, "rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                break
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                break
            rows[row[key]] = row
    return rows


def _rewrite_complete(path: Path, rows: dict[int, dict[str, Any]]) -> None:
    """Drop a torn last line before appending after it."""
    if path.is_file():
        path.write_bytes(b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in rows.values()))


def remaining(spec: WorkerSpec, records, done: dict, seen: dict) -> tuple[list[int], list[int]]:
    """`spec`'s records without a verdict in `done`, and the first record of each image without an
    embedding row in `seen` (`records`: the split's)."""
    todo = [i for i in spec.indices if i not in done]
    images = {image_key(records[i].image): i for i in reversed(spec.indices)}  # each image's first record
    return todo, [index for key, index in images.items() if key not in seen]


def pending(spec: WorkerSpec, records) -> bool:
    """Whether `spec` has records or images its cache does not hold yet."""
    cache = Path(spec.cache)
    return any(remaining(spec, records, finished(cache), finished(cache, VISION, "image")))


def keep_cached_stats(spec: WorkerSpec) -> bool:
    """For a run whose every verdict is cached: keep the cost of the run that judged, with nothing judged
    this time. False if there is no such cost to keep."""
    path = Path(spec.cache) / STATS
    if not path.is_file():
        return False
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), "judged_this_run": 0}), encoding="utf-8")
    return True


def run(spec: WorkerSpec, import_s: float | None = None) -> None:
    """Judge `spec`'s records not yet in its cache. `import_s`: how long the runtime's libraries took to
    import, once, in the server this worker was forked from (not part of `load_s`)."""
    import dfj
    from dfj.data import read_split

    cache = Path(spec.cache)
    (cache / "parity").mkdir(parents=True, exist_ok=True)
    done, seen = finished(cache), finished(cache, VISION, "image")
    _rewrite_complete(cache / VERDICTS, done)
    _rewrite_complete(cache / VISION, seen)
    records = read_split(spec.data, mode=spec.mode).records
    todo, vision_todo = remaining(spec, records, done, seen)
    reference_rows = finished(Path(spec.reference_cache)) if spec.reference_cache else {}
    stats: dict[str, Any] = {"import_s": import_s, "load_s": None, "peak_rss_mb": None, "judged_this_run": 0}
    print(f"PROGRESS {len(spec.indices) - len(todo)} {len(spec.indices)}", flush=True)
    if todo or vision_todo:
        started = time.perf_counter()
        judge = dfj.load_judge(spec.source, runtime=spec.runtime, device=spec.device, dtype=spec.dtype,
                               mode=spec.mode, max_new_tokens=spec.max_new_tokens, **spec.options)
        stats["load_s"] = time.perf_counter() - started
        count = len(spec.indices) - len(todo)
        with open(cache / VERDICTS, "ab") as sink:
            for group in _groups(todo, records):
                for row in _judge_group(judge, [records[i] for i in group], group, spec, cache, reference_rows):
                    sink.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
                    sink.flush()
                    stats["judged_this_run"] += 1
                    count += 1
                    print(f"PROGRESS {count} {len(spec.indices)}", flush=True)
        with open(cache / VISION, "ab") as sink:
            for index in sorted(vision_todo):
                row = _vision_row(judge, records[index], spec, cache)
                sink.write((json.dumps(row) + "\n").encode())
                sink.flush()
        stats["peak_rss_mb"] = peak_rss_mb()
    if todo or not keep_cached_stats(spec):  # all verdicts cached: the cost of the run that judged stays
        (cache / STATS).write_text(json.dumps(stats), encoding="utf-8")


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across
    fork+exec, so a worker started by a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def image_key(image: Any) -> str:
    """A record's image as a cache key (records of a split name their image by path)."""
    import hashlib

    return hashlib.sha256(str(image).encode("utf-8")).hexdigest()[:16]


def _vision_row(judge, record, spec: WorkerSpec, cache: Path) -> dict[str, Any]:
    """The image embeddings this judge's runtime feeds its language model for the record's image: kept
    by the reference, compared with the reference's by an artifact (`dfj.bench.parity.vision_parity`)."""
    import numpy as np

    from dfj.bench.parity import vision_parity

    key = image_key(record.image)
    row: dict[str, Any] = {"image": key, "error": None}
    try:
        prompt = judge.prepare(record).prompt
        [embeddings] = judge.runtime.embed_images([prompt])
        if isinstance(embeddings, Exception):
            raise embeddings
        if spec.role == "reference":
            (cache / "vision").mkdir(exist_ok=True)
            np.save(cache / "vision" / f"{key}.npy", np.asarray(embeddings, dtype=np.float32))
            row["tokens"] = int(embeddings.shape[0])
        else:
            reference = np.load(Path(spec.reference_cache) / "vision" / f"{key}.npy", allow_pickle=False)
            row.update(vision_parity(reference, embeddings))
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def _groups(indices: list[int], records) -> list[list[int]]:
    """The records the judge runs as one call (`dfj.groups`)."""
    from dfj.groups import chunk_groups, group_key

    return list(chunk_groups(indices, key=lambda index: group_key(records[index].image, records[index].label)))


def _judge_group(judge, group: list, indices: list[int], spec: WorkerSpec, cache: Path,
                 reference_rows: dict[int, dict]) -> list[dict[str, Any]]:
    """Verdicts of one group (one judge call; each record's latency is the group's share), then each
    record's logit parity."""
    started = time.perf_counter()
    try:
        verdicts = judge.judge_many(group)
    except Exception as exc:  # a group the runtime cannot judge is a failure of this artifact, not the bench
        verdicts = [failure(spec.mode, f"record {index}: {type(exc).__name__}: {exc}") for index in indices]
    latency = (time.perf_counter() - started) / len(group)
    return [_parity_row(judge, record, index, verdict, latency, spec, cache, reference_rows.get(index))
            for record, index, verdict in zip(group, indices, verdicts)]


def _parity_row(judge, record, index: int, verdict, latency: float, spec: WorkerSpec, cache: Path,
                reference: dict | None) -> dict[str, Any]:
    row: dict[str, Any] = {"index": index, "latency_s": latency, "verdict": verdict.to_dict(), "parity": None,
                           "parity_error": None}
    text = verdict.text if spec.role == "reference" else (reference or {}).get("verdict", {}).get("text")
    if not text:
        return row  # nothing to teacher-force on: no parity for this record
    try:
        tokens = judge.runtime.tokenize(text, True)
        logprobs = judge.logprobs(record.image, record.label, *record.responses(), continuation=text)
        if spec.role == "reference":
            ReferenceRows.from_logprobs(logprobs, tokens).save(cache / "parity" / f"{index}.npz")
            row["parity"] = {"tokens": len(tokens)}
        else:
            rows = ReferenceRows.load(Path(spec.reference_cache) / "parity" / f"{index}.npz")
            row["parity"] = asdict(token_parity(rows, logprobs, tokens))
    except Exception as exc:
        row["parity_error"] = f"{type(exc).__name__}: {exc}"
    return row
