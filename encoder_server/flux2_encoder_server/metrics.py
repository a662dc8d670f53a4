"""Prometheus metrics of one server, in its own CollectorRegistry (several servers can share a process)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_PREFIX = "flux2_encoder_"
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PROMPTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the server exports; see docs/operations.md for what each one means."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            _PREFIX + "requests",
            "Encode requests finished, by front-end and status code (OK or the error code sent)",
            ["frontend", "code"],
            registry=r,
        )
        self.prompts = Counter(
            _PREFIX + "prompts",
            "Prompts answered, by where the embedding came from (model or cache)",
            ["source"],
            registry=r,
        )
        self.batch_prompts = Histogram(
            _PREFIX + "batch_prompts", "Prompts per model batch", buckets=_PROMPTS, registry=r
        )
        self.batch_requests = Histogram(
            _PREFIX + "batch_requests", "Requests that shared one model batch", buckets=_PROMPTS, registry=r
        )
        self.batch_failures = Counter(
            _PREFIX + "batch_failures", "Model batches that raised (only their requests failed)", registry=r
        )
        self.model_tokens = Counter(
            _PREFIX + "model_tokens",
            "Tokens run through the model (prompts * max_length: every prompt is padded)",
            registry=r,
        )
        self.stage_seconds = Histogram(
            _PREFIX + "stage_seconds",
            "Per-request time in each stage: queue (waiting for a batch), encode (model), serialize, send",
            ["stage"],
            buckets=_SECONDS,
            registry=r,
        )
        self.request_seconds = Histogram(
            _PREFIX + "request_seconds",
            "Whole request, admission to last byte",
            ["frontend"],
            buckets=_SECONDS,
            registry=r,
        )
        self.bytes_sent = Counter(
            _PREFIX + "bytes_sent", "Embedding payload bytes sent to clients", ["frontend"], registry=r
        )
        self.dropped = Counter(
            _PREFIX + "dropped",
            "Requests dropped by reason: queued ones skipped before the model (cancelled, deadline) and answers "
            "cut off because the client did not read them (send_timeout)",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            _PREFIX + "rejected",
            "Requests refused at admission, by the limit that refused them",
            ["limit"],
            registry=r,
        )
        self.cache_lookups = Counter(
            _PREFIX + "cache_lookups", "Embedding cache lookups by tier and result", ["tier", "result"], registry=r
        )
        self.queue_depth = Gauge(_PREFIX + "queue_depth", "Requests waiting for the model", registry=r)
        self.inflight_requests = Gauge(
            _PREFIX + "inflight_requests",
            "Admitted requests not yet finished (queued, encoding or sending)",
            registry=r,
        )
        self.inflight_bytes = Gauge(
            _PREFIX + "inflight_bytes",
            "Response bytes reserved by admitted requests (max_inflight_bytes bounds it)",
            registry=r,
        )
        self.cache_bytes = Gauge(_PREFIX + "cache_bytes", "Bytes held by the in-memory embedding cache", registry=r)

    def track(self, gauge: Gauge, fn: Callable[[], float]) -> None:
        gauge.set_function(fn)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes (also handy for tests and the HTTP front-end)."""
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one sample (0 when absent); for tests and debugging."""
        got: Any = self.registry.get_sample_value(name, labels or {})
        return float(got) if got is not None else 0.0
