"""`dfj bench`: run a reference judge and exported judges over one DFJ split and compare them.

Each judge runs in its own worker process (`dfj.bench.worker`, forked from a server per runtime that
imported its libraries once: `dfj.bench.forkserver`) with a cache folder in the report folder, so an
interrupted bench resumes. The report holds, per judge: quality against the gold labels,
cost (load time, latency, throughput, peak memory, size), and for each artifact the deltas to the
reference, verdict agreement and logit parity, with a tolerance gate. Keys are documented in
`docs/bench.md` and versioned by `schema`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dfj.bench.entries import ArtifactEntry, BenchReport, Cost, DataInfo, JudgeEntry, gate, quality_delta
from dfj.bench.forkserver import WorkerServers
from dfj.bench.metrics import pairwise_quality, pointwise_quality
from dfj.bench.parity import TokenParity, summarize, summarize_vision
from dfj.bench.worker import STATS, VISION, WorkerSpec, finished, keep_cached_stats, pending
from dfj.tolerances import bench_defaults

# Gate defaults (how much worse than the reference an artifact may be): dfj.tolerances.BenchGates.
DEFAULT_TOLERANCE: dict[str, float] = bench_defaults()

# Published DeepfakeJudge numbers (NOTES.md §1), shown when the data is a real DFJ split.
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "dfj-meta-human": {
        "pointwise": {"7B rmse": 0.50, "7B pearson": 0.95},
        "pairwise": {"7B accuracy": 0.989, "3B accuracy": 0.966},
    },
    "dfj-meta": {
        "pointwise": {"7B rmse": 0.61, "7B pearson": 0.93, "3B rmse": 0.69, "3B pearson": 0.92},
        "pairwise": {"7B accuracy": 0.962, "3B accuracy": 0.944},
    },
}

Progress = Callable[[str, int, int], None]


class BenchError(RuntimeError):
    """The bench itself cannot run (bad data, unusable reference); artifact failures are reported."""


@dataclass
class BenchJudge:
    source: str
    runtime: str
    device: str = "cpu"
    dtype: str | None = None
    label: str = ""  # table name

    def name(self) -> str:
        return self.label or Path(self.source.rstrip("/")).name or self.source


def parse_tolerance(text: str | None) -> dict[str, float]:
    """`rmse=0.05,kld=0.1` over the defaults; unknown keys and non-numbers are errors."""
    tolerance = dict(DEFAULT_TOLERANCE)
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in DEFAULT_TOLERANCE:
            raise ValueError(f"bad tolerance {item!r}: use key=value with keys {', '.join(DEFAULT_TOLERANCE)}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"bad tolerance {item!r}: {value!r} is not a number") from None
        if not number >= 0:
            raise ValueError(f"bad tolerance {item!r}: must be >= 0")
        tolerance[key.strip()] = number
    return tolerance


def default_runtime(source: str) -> str:
    """The runtime an artifact's format calls for (a merged or adapter folder: torch)."""
    from dfj.runtime import runtime_for
    from dfj.sources import resolve

    return runtime_for(resolve(source, verify_files=False).manifest)


def published_for(data: Path, mode: str) -> dict[str, float] | None:
    parts = [p.lower() for p in data.resolve().parts]
    for key in ("dfj-meta-human", "dfj-meta"):  # most specific first
        if any(part.startswith(key) for part in parts):
            return {"set": key, **PUBLISHED[key][mode]}  # type: ignore[dict-item]
    return None


def run_bench(
    reference: BenchJudge,
    artifacts: list[BenchJudge],
    data: str | os.PathLike,
    report_dir: str | os.PathLike,
    *,
    mode: str | None = None,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    tolerance: dict[str, float] | None = None,
    progress: Progress | None = None,
    servers: WorkerServers | None = None,
) -> BenchReport:
    """Run the bench and write report.json / report.md / report.png into `report_dir`. `servers`: worker
    servers to use and leave running (a caller running several benches); by default the bench's own."""
    from dfj.data import read_split
    from dfj.sources import resolve

    tolerance = tolerance or dict(DEFAULT_TOLERANCE)
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    data = Path(data)
    mode = mode or resolve(reference.source, verify_files=False).mode
    split = read_split(data, mode=mode)
    count = len(split.records) if limit is None else min(limit, len(split.records))
    if count == 0:
        raise BenchError(f"{data}: no usable {mode} records" + (f" ({len(split.errors)} bad lines)" if split.errors else ""))
    for judge in artifacts:
        other = resolve(judge.source, mode=mode, verify_files=False).mode
        if other != mode:
            raise BenchError(f"{judge.source} is a {other} judge; the bench data is {mode}")
    records = split.records[:count]
    gold = [r.gold_score if mode == "pointwise" else r.gold_choice for r in records]
    has_gold = all(g is not None for g in gold)
    data_hash = hashlib.sha256(split.path.read_bytes()).hexdigest()
    common = dict(mode=mode, data=str(split.path), indices=list(range(count)), max_new_tokens=max_new_tokens)

    ref_key = _cache_key(reference, "reference", data_hash, common)
    ref_cache = report_dir / "cache" / ref_key
    ref_spec = WorkerSpec(source=reference.source, role="reference", cache=str(ref_cache), runtime=reference.runtime,
                          device=reference.device, dtype=reference.dtype, **common)
    specs = [WorkerSpec(source=judge.source, role="artifact",
                        cache=str(report_dir / "cache" / _cache_key(judge, "artifact", data_hash, common, extra=ref_key)),
                        runtime=judge.runtime, device=judge.device, dtype=judge.dtype, reference_cache=str(ref_cache),
                        **common) for judge in artifacts]
    described = {id(judge): _describe(judge.source) for judge in [reference, *artifacts]}  # each resolved once
    if described[id(reference)].error:
        raise BenchError(f"the reference {reference.source}: {described[id(reference)].error}")
    owned = servers is None
    servers = servers or WorkerServers(report_dir / "cache")
    try:
        waiting = [pending(spec, split.records) for spec in [ref_spec, *specs]]
        servers.start(spec.runtime for spec, wait in zip([ref_spec, *specs], waiting) if wait)
        ref_run = _run_worker(servers, reference, ref_spec, waiting[0], progress)
        if ref_run["error"]:
            raise BenchError(f"the reference {reference.source} failed: {ref_run['error']}")
        ref_entry = _judge_entry(JudgeEntry, reference, described[id(reference)], ref_run, mode, gold, has_gold)
        entries = [_artifact_entry(judge, described[id(judge)], _run_worker(servers, judge, spec, wait, progress), ref_run["rows"],
                                   ref_entry.quality, mode, gold, has_gold, tolerance)
                   for judge, spec, wait in zip(artifacts, specs, waiting[1:])]
    finally:
        if owned:
            servers.close()
    report = BenchReport(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        data=DataInfo(str(split.path), data_hash, mode, count, len(split.errors), has_gold, published_for(data, mode)),
        tolerance=tolerance, reference=ref_entry, artifacts=entries)
    from dfj.bench.report import write_report

    write_report(report.to_dict(), report_dir)
    return report


# -- workers ------------------------------------------------------------------------------------------
def _cache_key(judge: BenchJudge, role: str, data_hash: str, common: dict, extra: str = "") -> str:
    identity = {"source": _source_identity(judge.source), "runtime": judge.runtime, "device": judge.device,
                "dtype": judge.dtype, "role": role, "data": data_hash, "extra": extra, "code": _code_identity(),
                **{k: v for k, v in common.items() if k != "data"}}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", judge.name())[:40]
    return f"{slug}-{digest}"


@functools.lru_cache(maxsize=1)
def _code_identity() -> str:
    """A hash of dfj's own source: verdicts cached by another dfj (say, another resize rule) are not reused."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _source_identity(source: str) -> Any:
    """What a cached verdict depends on: an artifact's file hashes, else the files' sizes and times."""
    from dfj.sources import resolve

    resolved = resolve(source, verify_files=False)
    if resolved.manifest is not None:
        return resolved.manifest.files
    folders = [resolved.path] + ([resolved.base] if resolved.base else [])
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for folder in folders for p in sorted(Path(folder).iterdir()) if p.is_file()]


def _run_worker(servers: WorkerServers, judge: BenchJudge, spec: WorkerSpec, waiting: bool,
                progress: Progress | None) -> dict[str, Any]:
    """Run `spec`'s worker unless it is not `waiting` (its cache already holds the whole run); then read
    what the cache holds."""
    cache = Path(spec.cache)
    cache.mkdir(parents=True, exist_ok=True)
    spec_path = cache / "spec.json"
    spec.write(spec_path)
    log_path = cache / "worker.log"

    def on_line(line: str) -> None:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "PROGRESS" and progress:
            progress(judge.name(), int(parts[1]), int(parts[2]))

    if not waiting and keep_cached_stats(spec):
        returncode = 0
        on_line(f"PROGRESS {len(spec.indices)} {len(spec.indices)}")
    else:
        returncode = servers.run(spec.runtime, spec_path, log_path, on_line)
    error = None
    if returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        error = f"worker exited with status {returncode}: {tail[0]} (log: {log_path})"
    rows = finished(cache)
    vision = list(finished(cache, VISION, "image").values())
    stats = json.loads((cache / STATS).read_text()) if (cache / STATS).is_file() and not error else {}
    if not error and len(rows) < len(spec.indices):
        error = f"worker finished {len(rows)} of {len(spec.indices)} records (log: {log_path})"
    return {"rows": rows, "vision": vision, "stats": stats, "error": error}


# -- aggregation ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Described:
    """What a judge's files say: its format and quant (dfj.json), its size, or why they cannot be read."""

    format: str = "source"
    quant: str = "none"
    size_bytes: int | None = None
    error: str | None = None


def _describe(source: str) -> Described:
    """The judge's manifest and size, read once; an unreadable manifest or a file it lists that is
    missing is the judge's error (named), never a silent gap in the report."""
    from dfj.sources import resolve

    try:
        resolved = resolve(source, verify_files=False)
    except (ValueError, OSError) as exc:
        return Described(error=f"cannot read {source}: {exc}")
    manifest = resolved.manifest
    folders = [resolved.path] + ([resolved.base] if resolved.base else [])
    if manifest is not None:
        missing = sorted(name for name in manifest.files if not (Path(resolved.path) / name).is_file())
        if missing:
            return Described(manifest.format, manifest.quant,
                             error=f"{source}: {len(missing)} file(s) its dfj.json lists are missing: {', '.join(missing[:3])}")
    size = sum(p.stat().st_size for folder in folders for p in Path(folder).rglob("*") if p.is_file())
    return Described(manifest.format, manifest.quant, size) if manifest else Described(size_bytes=size)


def _prediction(mode: str, verdict: dict[str, Any]) -> Any:
    return verdict.get("score") if mode == "pointwise" else verdict.get("choice")


def _quality(mode: str, predictions: list, gold: list, has_gold: bool) -> dict[str, Any] | None:
    if not has_gold:
        return None
    q = pointwise_quality(predictions, gold) if mode == "pointwise" else pairwise_quality(predictions, gold)
    return q.to_dict()


def _judge_entry(kind: type[JudgeEntry], judge: BenchJudge, described: Described, run: dict[str, Any], mode: str,
                 gold: list, has_gold: bool) -> Any:
    rows = [run["rows"][i] for i in sorted(run["rows"])][: len(gold)]
    predictions = [_prediction(mode, r["verdict"]) for r in rows]
    latencies = np.asarray([r["latency_s"] for r in rows], dtype=np.float64)
    stats = run["stats"]
    cost = Cost(
        import_s=stats.get("import_s"), load_s=stats.get("load_s"),
        latency_p50_s=float(np.percentile(latencies, 50)) if latencies.size else None,
        latency_p95_s=float(np.percentile(latencies, 95)) if latencies.size else None,
        records_per_s=float(latencies.size / latencies.sum()) if latencies.size and latencies.sum() > 0 else None,
        peak_rss_mb=stats.get("peak_rss_mb"), size_bytes=described.size_bytes)
    provenance = next((r["verdict"].get("provenance") for r in rows if r["verdict"].get("provenance")), None)
    return kind(name=judge.name(), source=judge.source, runtime=judge.runtime, device=judge.device, dtype=judge.dtype,
                format=described.format, quant=described.quant, error=described.error or run["error"],
                quality=_quality(mode, predictions, gold, has_gold) if len(rows) == len(gold) else None, cost=cost,
                runtime_info=provenance["run"]["runtime"] if provenance else None)


def _artifact_entry(judge: BenchJudge, described: Described, run: dict[str, Any], ref_rows: dict, reference_quality: dict | None,
                    mode: str, gold: list, has_gold: bool, tolerance: dict[str, float]) -> ArtifactEntry:
    entry: ArtifactEntry = _judge_entry(ArtifactEntry, judge, described, run, mode, gold, has_gold)
    rows = run["rows"]
    agree = [
        _prediction(mode, rows[i]["verdict"]) is not None
        and _prediction(mode, rows[i]["verdict"]) == _prediction(mode, ref_rows[i]["verdict"])
        for i in sorted(rows) if i in ref_rows
    ]
    parts = [TokenParity(**rows[i]["parity"]) for i in sorted(rows) if rows[i].get("parity")]
    entry.agreement = float(np.mean(agree)) if agree else None
    entry.parity = summarize(parts).to_dict()
    entry.parity["errors"] = [rows[i]["parity_error"] for i in sorted(rows) if rows[i].get("parity_error")][:5]
    entry.vision = summarize_vision(run.get("vision", []))
    entry.delta = quality_delta(entry.quality, reference_quality)
    entry.failures = gate(mode, entry, reference_quality, tolerance)
    entry.passed = not entry.failures
    return entry
