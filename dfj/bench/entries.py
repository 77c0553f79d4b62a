"""What `dfj bench` reports, typed: one entry per judge (the reference's, each artifact's), the report
that holds them, and the tolerance gate over an artifact's entry (`dfj.tolerances.BENCH_GATES`).
`to_dict()` gives `report.json` (schema `dfj-bench/1`, docs/bench.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dfj.tolerances import BENCH_GATES, BenchGate

SCHEMA = "dfj-bench/1"


@dataclass
class Cost:
    import_s: float | None  # the worker server's one-off import of the runtime's libraries
    load_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    records_per_s: float | None
    peak_rss_mb: float | None
    size_bytes: int | None


@dataclass
class JudgeEntry:
    name: str
    source: str
    runtime: str
    device: str
    dtype: str | None
    format: str  # from dfj.json; "source" for a plain model or adapter folder
    quant: str
    error: str | None  # why the judge could not be judged or described, else None
    quality: dict[str, Any] | None  # dfj.bench.metrics, None without gold labels
    cost: Cost
    # What the runtime said of itself (versions, dtype, CPU kernels or llama.cpp's CPU level), as every
    # verdict's provenance records it; None where no verdict was given.
    runtime_info: dict[str, Any] | None = None


@dataclass
class ArtifactEntry(JudgeEntry):
    agreement: float | None = None  # share of records with the reference's parsed verdict
    parity: dict[str, Any] = field(default_factory=dict)  # dfj.bench.parity.ParitySummary + errors
    vision: dict[str, Any] = field(default_factory=dict)  # dfj.bench.parity.summarize_vision
    delta: dict[str, float | None] | None = None  # artifact - reference per quality key
    failures: list[str] = field(default_factory=list)
    passed: bool = False


@dataclass
class DataInfo:
    path: str
    sha256: str
    mode: str
    records: int
    unreadable_lines: int
    gold: bool
    published: dict[str, Any] | None


@dataclass
class BenchReport:
    created: str
    data: DataInfo
    tolerance: dict[str, float]
    reference: JudgeEntry
    artifacts: list[ArtifactEntry]
    schema: str = SCHEMA

    @property
    def passed(self) -> bool:
        return all(entry.passed for entry in self.artifacts)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


QUALITY_KEYS = ("rmse", "pearson", "spearman", "exact", "accuracy", "parse_failure_rate")


def quality_delta(quality: dict | None, reference: dict | None) -> dict[str, float | None] | None:
    if quality is None or reference is None:
        return None
    return {k: (None if quality.get(k) is None or reference.get(k) is None else quality[k] - reference[k])
            for k in QUALITY_KEYS if k in quality}


def gate(mode: str, entry: ArtifactEntry, reference_quality: dict | None, tolerance: dict[str, float]) -> list[str]:
    """The tolerances `entry` is out of, each as "METRIC: why"; a failed run is one failure."""
    if entry.error:
        return [f"run failed: {entry.error}"]
    failures = []
    for rule in BENCH_GATES:
        if mode in rule.modes:
            failure = (_delta_failure if rule.measure == "delta" else _bound_failure)(rule, entry, reference_quality, tolerance)
            if failure:
                failures.append(failure)
    return failures


def _delta_failure(rule: BenchGate, entry: ArtifactEntry, reference_quality: dict | None, tolerance: dict[str, float]) -> str | None:
    if entry.delta is None:
        return None
    value = entry.delta.get(rule.metric)
    if value is None:
        if (entry.quality or {}).get(rule.metric) is None and (reference_quality or {}).get(rule.metric) is not None:
            return f"{rule.metric}: undefined for the artifact, defined for the reference"
        return None
    if rule.worse * value > tolerance[rule.key] * rule.scale + 1e-12:
        shown = f"{value / rule.scale:+.2f} points" if rule.unit == "percentage points" else f"{value:+.4f}"
        return f"{rule.metric}: {shown} vs reference, tolerance {tolerance[rule.key]:g}"
    return None


def _bound_failure(rule: BenchGate, entry: ArtifactEntry, reference_quality: dict | None, tolerance: dict[str, float]) -> str | None:
    limit = tolerance[rule.key]
    if rule.key == "kld":
        kld = entry.parity.get("kld_mean")
        if kld is None:
            return "kld: no token could be compared with the reference"
        return f"kld: mean {kld:.4g} > {limit:g}" if kld > limit else None
    if rule.key == "vision_cos":
        cos = entry.vision.get("cos_mean")
        if cos is None:
            return "vision_cos: no image's embeddings could be compared with the reference's"
        return f"vision_cos: mean token cosine {cos:.6f} is below 1 by more than {limit:g}" if 1.0 - cos > limit else None
    raise ValueError(f"no bound measure for the tolerance {rule.key!r}")
