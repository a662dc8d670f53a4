"""Prometheus metrics of one server, in its own CollectorRegistry (several servers can share a process).

Names follow the Prometheus naming guide (base units, `_total` on counters, `_info` for build facts);
every labelled series whose label values are known in advance starts at zero, so rates and alerts see
a series before its first event.

Everything that belongs to one hosted model carries a `model` label (the served name, e.g. "default",
"flux2-dev", "klein-4b"); requests refused before a served model was found (unknown name, malformed
request, HTTP concurrency cap) are counted under `model=""` (NO_MODEL). What the server shares across its
models (in-flight bytes and requests, the embedding cache's memory) has no model label."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_PREFIX = "flux2_encoder_"
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PROMPTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

#: The known label values, created at zero.
FRONTENDS = ("grpc", "http")
STAGES = ("queue", "encode", "serialize", "send")
DROP_REASONS = ("cancelled", "deadline", "send_timeout")  # per model; http_header_timeout has no model
LIMITS = (
    "max_queued_requests",
    "max_inflight_bytes",
    "rate_limit_prompts_per_s",
    "max_concurrent_requests_per_token",
    "http_max_concurrent_requests",
    "upsample_max_queued_requests",
)
#: The `model` label of requests refused before a served model was found.
NO_MODEL = ""


class Metrics:
    """Every metric the server exports; see docs/operations.md for what each one means."""

    def __init__(self, models: Sequence[str] = ("default",)) -> None:
        self.models = tuple(models)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            _PREFIX + "requests",
            "Encode requests finished, by front-end and status code (OK or the error code sent)",
            ["frontend", "code", "model"],
            registry=r,
        )
        self.prompts = Counter(
            _PREFIX + "prompts",
            "Prompts answered, by where the embedding came from (model or cache)",
            ["source", "model"],
            registry=r,
        )
        self.batch_prompts = Histogram(
            _PREFIX + "batch_prompts", "Prompts per model batch", ["model"], buckets=_PROMPTS, registry=r
        )
        self.batch_requests = Histogram(
            _PREFIX + "batch_requests",
            "Requests that shared one model batch",
            ["model"],
            buckets=_PROMPTS,
            registry=r,
        )
        self.batch_failures = Counter(
            _PREFIX + "batch_failures", "Model batches that raised (only their requests failed)", ["model"], registry=r
        )
        self.self_tests = Counter(
            _PREFIX + "self_tests",
            "Self-test encodes of a fixed prompt, by result (passed, failed); a failure turns health NOT_SERVING",
            ["result", "model"],
            registry=r,
        )
        self.model_tokens = Counter(
            _PREFIX + "model_tokens",
            "Tokens run through the model (prompts * max_length: every prompt is padded)",
            ["model"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            _PREFIX + "stage_seconds",
            "Per-request time in each stage: queue (waiting for a batch), encode (model), serialize, send",
            ["stage", "model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.request_duration = Histogram(
            _PREFIX + "request_duration_seconds",
            "Whole request, admission to last byte",
            ["frontend", "model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.sent_bytes = Counter(
            _PREFIX + "sent_bytes", "Embedding payload bytes sent to clients", ["frontend", "model"], registry=r
        )
        self.build_info = Gauge(
            _PREFIX + "build_info",
            "Always 1, one series per hosted model: the server version, the model's served name, the weights it "
            "loaded and their precision (set once the model is loaded)",
            ["version", "model", "weights", "precision"],
            registry=r,
        )
        self.dropped = Counter(
            _PREFIX + "dropped",
            "Requests dropped by reason: queued ones skipped before the model (cancelled, deadline), answers "
            "cut off because the client did not read them (send_timeout), and HTTP connections closed because "
            "the request headers did not arrive in time (http_header_timeout; model: the empty label)",
            ["reason", "model"],
            registry=r,
        )
        self.rejected = Counter(
            _PREFIX + "rejected",
            "Requests refused at admission, by the limit that refused them",
            ["limit", "model"],
            registry=r,
        )
        self.cache_lookups = Counter(
            _PREFIX + "cache_lookups",
            "Embedding cache lookups by tier and result",
            ["tier", "result", "model"],
            registry=r,
        )
        self.queue_depth = Gauge(_PREFIX + "queue_depth", "Requests waiting for the model", ["model"], registry=r)
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
            ["model"],
            registry=r,
        )
        self.load_bytes = Gauge(
            _PREFIX + "load_bytes",
            "Checkpoint bytes the model load read (tensors read from disk) and downloaded (from the hub)",
            ["kind", "model"],
            registry=r,
        )

        # -- front-end processes (--frontends N) ------------------------------------------------------------
        self.frontend_processes = Gauge(
            _PREFIX + "frontend_processes",
            "Front-end processes alive and connected to the model process (--frontends; 0 in single-process mode)",
            registry=r,
        )
        self.frontend_restarts = Counter(
            _PREFIX + "frontend_restarts", "Front-end processes restarted after they exited", registry=r
        )
        self.response_ring_used_bytes = Gauge(
            _PREFIX + "response_ring_used_bytes",
            "Bytes of the shared response ring holding answers the front-ends are still sending (--frontends)",
            registry=r,
        )

        # -- prompt upsampling (--upsampling) --------------------------------------------------------------
        self.upsample_requests = Counter(
            _PREFIX + "upsample_requests",
            "Upsample requests finished, by front-end and status code (OK or the error code sent)",
            ["frontend", "code", "model"],
            registry=r,
        )
        self.upsample_prompts = Counter(
            _PREFIX + "upsample_prompts", "Prompts rewritten by upsampling", ["model"], registry=r
        )
        self.upsample_tokens = Counter(
            _PREFIX + "upsample_generated_tokens", "Tokens generated by upsampling (all prompts)", ["model"], registry=r
        )
        self.upsample_seconds = Histogram(
            _PREFIX + "upsample_seconds",
            "Per upsampling request: queue (waiting for its turn on the model thread), generate (the model call)",
            ["stage", "model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.upsample_queue_depth = Gauge(
            _PREFIX + "upsample_queue_depth", "Upsampling requests waiting for the model", ["model"], registry=r
        )
        self._start_at_zero()

    def record_load(self, model: str, seconds: float, bytes_read: int | None, bytes_downloaded: int) -> None:
        """A model load's cost, once SERVING (bytes_read None: the loader did not count them)."""
        self.load_seconds.labels(model).set(seconds)
        if bytes_read is not None:
            self.load_bytes.labels("read", model).set(bytes_read)
        self.load_bytes.labels("downloaded", model).set(bytes_downloaded)

    def _start_at_zero(self) -> None:
        from .errors import service_errors

        codes = sorted({"OK", "CANCELLED", "INTERNAL", *(error.code for error in service_errors())})
        for model in (*self.models, NO_MODEL):
            for frontend in FRONTENDS:
                for code in codes:
                    self.requests.labels(frontend, code, model)
                    self.upsample_requests.labels(frontend, code, model)
                self.request_duration.labels(frontend, model)
            for limit in LIMITS:
                self.rejected.labels(limit, model)
        # An HTTP connection whose request head never arrived named no model.
        self.dropped.labels("http_header_timeout", NO_MODEL)
        for model in self.models:
            for frontend in FRONTENDS:
                self.sent_bytes.labels(frontend, model)
            for source in ("model", "cache"):
                self.prompts.labels(source, model)
            for stage in STAGES:
                self.stage_seconds.labels(stage, model)
            for reason in DROP_REASONS:
                self.dropped.labels(reason, model)
            for tier in ("memory", "disk"):
                for result in ("hit", "miss"):
                    self.cache_lookups.labels(tier, result, model)
            for result in ("passed", "failed"):
                self.self_tests.labels(result, model)
            self.batch_prompts.labels(model)
            self.batch_requests.labels(model)
            self.batch_failures.labels(model)
            self.model_tokens.labels(model)
            self.upsample_prompts.labels(model)
            self.upsample_tokens.labels(model)
            for stage in ("queue", "generate"):
                self.upsample_seconds.labels(stage, model)

    def set_build_info(self, version: str, model: str, weights: str, precision: str) -> None:
        self.build_info.labels(version, model, weights, precision).set(1)

    def track(self, gauge: Gauge, fn: Callable[[], float]) -> None:
        gauge.set_function(fn)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes (also handy for tests and the HTTP front-end)."""
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The sum of the samples named `name` whose labels include `labels` (0 when none): one series, or
        e.g. a counter over every model when `labels` leaves `model` out. For tests and debugging."""
        wanted = (labels or {}).items()
        total = 0.0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == name and wanted <= sample.labels.items():
                    total += float(sample.value)
        return total
