"""The service's Prometheus metrics (prometheus_client), in a registry of its own, served at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

# Routes are labelled by name, never by the raw path (a client could otherwise mint label values).
ROUTES = ("/health", "/v1/info", "/v1/score", "/v1/score/batch", "/v1/compare", "/v1/compare/batch",
          "/v1/chat/completions", "/metrics")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dfj_requests", "HTTP requests answered, by route and status.", ["route", "status"], registry=r)
        self.latency = Histogram("dfj_request_seconds", "Time from a request's arrival to its answer.", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("dfj_queue_depth", "Requests waiting for the judge.", registry=r)
        self.in_flight = Gauge("dfj_in_flight_records", "Records the judge is working on now.", registry=r)
        self.active = Gauge("dfj_active_requests", "Requests held: reading their body, queued or being judged.", registry=r)
        self.records = Counter("dfj_records", "Records finished, by outcome: verdict, unparsed (the judge's output held "
                               "no verdict), input_error, runtime_error.", ["outcome"], registry=r)
        self.abandoned = Counter("dfj_abandoned_records", "Records not judged because their request was given up: "
                                 "reason disconnected or deadline; stage queued (never run) or running (later groups "
                                 "of a batch skipped).", ["reason", "stage"], registry=r)
        self.rejected = Counter("dfj_rejected_requests", "Requests refused before any work: queue_full, busy, "
                                "body_too_large, unauthorized.", ["reason"], registry=r)
        self.ready = Gauge("dfj_ready", "1 once the judge is loaded and serving.", registry=r)

    def route(self, path: str) -> str:
        return path if path in ROUTES else "other"

    def render(self) -> bytes:
        return generate_latest(self.registry)
