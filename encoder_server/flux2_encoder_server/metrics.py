"""Prometheus metrics of one server, in its own CollectorRegistry (several servers can share a process).

Names follow the Prometheus naming guide (base units, `_total` on counters, `_info` for build facts);
every labelled series whose label values are known in advance starts at zero, so rates and alerts see
a series before its first event."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_PREFIX = "flux2_encoder_"
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PROMPTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

#: The known label values, created at zero.
FRONTENDS = ("grpc", "http")
STAGES = ("queue", "encode", "serialize", "send")
DROP_REASONS = ("cancelled", "deadline", "send_timeout", "http_header_timeout")
LIMITS = (
    "max_queued_requests",
    "max_inflight_bytes",
    "rate_limit_prompts_per_s",
    "max_concurrent_requests_per_token",
    "http_max_concurrent_requests",
    "upsample_max_queued_requests",
)


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
        self.self_tests = Counter(
            _PREFIX + "self_tests",
            "Self-test encodes of a fixed prompt, by result (passed, failed); a failure turns health NOT_SERVING",
            ["result"],
            registry=r,
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
        self.request_duration = Histogram(
            _PREFIX + "request_duration_seconds",
            "Whole request, admission to last byte",
            ["frontend"],
            buckets=_SECONDS,
            registry=r,
        )
        self.sent_bytes = Counter(
            _PREFIX + "sent_bytes", "Embedding payload bytes sent to clients", ["frontend"], registry=r
        )
        self.build_info = Gauge(
            _PREFIX + "build_info",
            "Always 1: the server version and the model and precision it serves (set once the model is loaded)",
            ["version", "model", "precision"],
            registry=r,
        )
        self.dropped = Counter(
            _PREFIX + "dropped",
            "Requests dropped by reason: queued ones skipped before the model (cancelled, deadline), answers "
            "cut off because the client did not read them (send_timeout), and HTTP connections closed because "
            "the request headers did not arrive in time (http_header_timeout)",
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
        self.load_seconds = Gauge(
            _PREFIX + "load_seconds",
            "Seconds the model load took, from its start to SERVING (weights, warm-up, CUDA graphs)",
            registry=r,
        )
        self.load_bytes = Gauge(
            _PREFIX + "load_bytes",
            "Checkpoint bytes the model load read (tensors read from disk) and downloaded (from the hub)",
            ["kind"],
            registry=r,
        )

        # -- prompt upsampling (--upsampling) --------------------------------------------------------------
        self.upsample_requests = Counter(
            _PREFIX + "upsample_requests",
            "Upsample requests finished, by front-end and status code (OK or the error code sent)",
            ["frontend", "code"],
            registry=r,
        )
        self.upsample_prompts = Counter(_PREFIX + "upsample_prompts", "Prompts rewritten by upsampling", registry=r)
        self.upsample_tokens = Counter(
            _PREFIX + "upsample_generated_tokens", "Tokens generated by upsampling (all prompts)", registry=r
        )
        self.upsample_seconds = Histogram(
            _PREFIX + "upsample_seconds",
            "Per upsampling request: queue (waiting for its turn on the model thread), generate (the model call)",
            ["stage"],
            buckets=_SECONDS,
            registry=r,
        )
        self.upsample_queue_depth = Gauge(
            _PREFIX + "upsample_queue_depth", "Upsampling requests waiting for the model", registry=r
        )
        self._start_at_zero()

    def record_load(self, seconds: float, bytes_read: int | None, bytes_downloaded: int) -> None:
        """The model load's cost, once SERVING (bytes_read None: the loader did not count them)."""
        self.load_seconds.set(seconds)
        if bytes_read is not None:
            self.load_bytes.labels("read").set(bytes_read)
        self.load_bytes.labels("downloaded").set(bytes_downloaded)

    def _start_at_zero(self) -> None:
        from .errors import service_errors

        codes = {"OK", "CANCELLED", "INTERNAL", *(error.code for error in service_errors())}
        for frontend in FRONTENDS:
            for code in sorted(codes):
                self.requests.labels(frontend, code)
                self.upsample_requests.labels(frontend, code)
            self.request_duration.labels(frontend)
            self.sent_bytes.labels(frontend)
        for source in ("model", "cache"):
            self.prompts.labels(source)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        for limit in LIMITS:
            self.rejected.labels(limit)
        for tier in ("memory", "disk"):
            for result in ("hit", "miss"):
                self.cache_lookups.labels(tier, result)
        for result in ("passed", "failed"):
            self.self_tests.labels(result)
        for stage in ("queue", "generate"):
            self.upsample_seconds.labels(stage)

    def set_build_info(self, version: str, model: str, precision: str) -> None:
        self.build_info.clear()
        self.build_info.labels(version, model, precision).set(1)

    def track(self, gauge: Gauge, fn: Callable[[], float]) -> None:
        gauge.set_function(fn)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes (also handy for tests and the HTTP front-end)."""
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one sample (0 when absent); for tests and debugging."""
        got: Any = self.registry.get_sample_value(name, labels or {})
        return float(got) if got is not None else 0.0
