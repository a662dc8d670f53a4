"""The transport-free core: authentication, limits, validation, cache, batching, metrics, access log and
drain. The gRPC service and the HTTP /predict front-end are thin layers over it; nothing here knows
either transport (errors are typed `ServiceError`s that each front-end maps in its own table).

Lifetimes: the core owns its batcher. `core.start(engine)` builds and starts it over the engine once the
model is loaded (before that every request gets UNAVAILABLE), `await core.warm_up(timeout)` runs the first
self-test (readiness waits for it); `core.close()` stops it.

A request goes through one API, its scope:

    async with core.request("http", request_id=rid, bearer_token=token) as req:   # authenticates
        result = await req.encode(prompts, timeout=..., bypass_cache=...)           # limits, cache, model
        with req.stage("serialize"):
            body = ...
        with req.stage("send"):
            await req.send(write(body)); req.add_bytes_sent(len(body))

The front-end sends the answer inside the scope, each write through `req.send`, so the admission is held
until the last byte is written (or the client is gone), and a client that stops reading is cut off after
`send_timeout_s` (`SendTimeout`, counted as dropped with reason "send_timeout").

`req.upsample(prompts, spec)` rewrites prompts (prompt upsampling, `upsample.py`) on the model's worker
thread, in turn with the encode batches; `req.encode(prompts, upsample=spec)` upsamples first and encodes
the rewritten prompts. A scope does one of the two.

`req.encode` admits the request: its `Admission` (the response bytes it reserves and its per-token
concurrency slot) is a context manager held by the scope. Leaving the `async with` gives the admission
back, records the request's status in the metrics and writes one access-log line. Any exception,
including cancellation, goes through it unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, TypeVar

import torch
from flux2split_proto import shared

from . import __version__
from .batcher import Batcher, BatchStats, PendingBatch
from .cache import EmbeddingCache
from .errors import (
    ClientGone,
    DeadlineExceeded,
    EncodeFailed,
    FailedPrecondition,
    InvalidArgument,
    RateLimited,
    ResourceExhausted,
    SendTimeout,
    ServiceError,
    Unavailable,
)
from .fingerprint import Fingerprint
from .logs import access_log
from .metrics import Metrics
from .security import ANONYMOUS, Principal, PrincipalLimiter, TokenAuthenticator
from .settings import Settings
from .upsample import Upsampled, UpsampleJob, UpsampleLimits, Upsampler, UpsampleSpec, check_upsample_request

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "ANONYMOUS",
    "MAX_REQUEST_ID_CHARS",
    "SELF_TEST_PROMPT",
    "Admission",
    "EncodeResult",
    "EncoderCore",
    "Engine",
    "Principal",
    "RequestScope",
    "clean_request_id",
]


#: What the self-test encodes (as text-embeddings-inference's health check runs a forward on a fixed input).
SELF_TEST_PROMPT = "A photo of a red apple on a wooden table."


#: Longest request id kept (the client's id is cut to this, after escaping).
MAX_REQUEST_ID_CHARS = 128


def clean_request_id(raw: str | None) -> str:
    """A client's request id as it may be logged and echoed: printable ASCII only (control characters,
    newlines and non-ASCII written as Python escapes, so no id can forge a log line or a header), at most
    MAX_REQUEST_ID_CHARS characters."""
    if not raw:
        return ""
    return ascii(raw[:MAX_REQUEST_ID_CHARS])[1:-1][:MAX_REQUEST_ID_CHARS]


class Engine(Protocol):
    """What the core serves: `EncoderEngine`, or a stand-in such as `flux2_encoder_server.testing.FakeEngine`."""

    @property
    def fingerprint(self) -> Fingerprint: ...

    @property
    def embedding_dim(self) -> int: ...

    def launch(self, prompts: list[str]) -> PendingBatch:
        """Start encoding `prompts`; the handle's `result()` waits for the (len(prompts), L, D) rows."""
        ...


@dataclass
class EncodeResult:
    embeds: torch.Tensor
    cache_hit: list[bool]
    queue_seconds: float = 0.0
    encode_seconds: float = 0.0
    #: With `encode(upsample=...)`: the rewritten prompts (the ones encoded) and their seed.
    upsampled: Upsampled | None = None


class Admission:
    """What an admitted request holds until it ends: its response bytes in flight and a per-token
    concurrency slot. Leaving the context (or `release()`, idempotent) gives both back."""

    def __init__(self, core: EncoderCore, principal: Principal, nbytes: int):
        self._core = core
        self.principal = principal
        self.nbytes = nbytes
        self._released = False

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._core._release(self)


class RequestScope:
    """One request through a front-end; see the module docstring."""

    def __init__(self, core: EncoderCore, frontend: str, request_id: str, bearer_token: str | None):
        self.core = core
        self.frontend = frontend
        self.request_id = request_id
        self.principal = ANONYMOUS
        self.prompts = 0
        self.cache_hits = 0
        self.bytes_sent = 0
        self.stages: dict[str, float] = {}
        self.status = "OK"
        self.error: str | None = None
        #: "encode" or "upsample": what the scope did (its metrics and access-log line say which).
        self.kind = "encode"
        self._bearer_token = bearer_token
        self._held = contextlib.ExitStack()  # what the request holds (its admission) until it ends
        self._admission: Admission | None = None
        self._started = time.monotonic()
        self._send_deadline: float | None = None

    def __repr__(self) -> str:  # never the bearer token
        return f"RequestScope({self.frontend!r}, request_id={self.request_id!r}, principal={self.principal.name!r})"

    async def __aenter__(self) -> RequestScope:
        self.core._enter()
        try:
            self.principal = self.core.authenticate(self._bearer_token)
        except BaseException as exc:
            self._finish(exc)
            raise
        finally:
            self._bearer_token = None  # not kept past authentication
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._finish(exc)

    async def encode(
        self,
        prompts: Sequence[object],
        *,
        expected_fingerprint: str = "",
        timeout: float | None = None,
        bypass_cache: bool = False,
        field: str = "prompts",
        upsample: UpsampleSpec | None = None,
    ) -> EncodeResult:
        """Admit and encode `prompts` (`field` names them in error messages, as the front-end's request
        spells it); with `upsample`, rewrite them first and encode the rewritten ones. Raises a
        ServiceError when the server refuses."""
        if self._admission is not None:
            raise RuntimeError("one request scope encodes once")
        core = self.core
        self.prompts = len(prompts)
        fingerprint = core._serving_fingerprint()
        valid = core.validate_prompts(prompts, field)
        if expected_fingerprint and expected_fingerprint != fingerprint.digest:
            raise FailedPrecondition(
                shared.fingerprint_mismatch_message(expected_fingerprint, fingerprint.digest, fingerprint.weights_id)
            )
        timeout = self._timeout(timeout)
        job = await core._check_upsample(valid, upsample, "upsample.") if upsample is not None else None
        self._admission = self._held.enter_context(core.admit(self.principal, len(valid)))
        upsampled = None
        if job is not None:
            started = time.monotonic()
            upsampled = await core._upsample_admitted(job, timeout)
            self.stages["upsample"] = time.monotonic() - started
            timeout -= self.stages["upsample"]
            valid = upsampled.prompts
            if timeout <= 0:
                raise DeadlineExceeded("the request's deadline passed while its prompts were upsampled")
        result = await core._encode_admitted(valid, timeout, bypass_cache)
        result.upsampled = upsampled
        self.cache_hits = sum(result.cache_hit)
        self.stages["queue"] = result.queue_seconds
        self.stages["encode"] = result.encode_seconds
        return result

    async def upsample(
        self, prompts: Sequence[object], spec: UpsampleSpec, *, timeout: float | None = None, field: str = "prompts"
    ) -> Upsampled:
        """Admit and rewrite `prompts` (prompt upsampling); see `upsample.py`. Raises a ServiceError when the
        server refuses (FailedPrecondition when it does not upsample)."""
        if self._admission is not None:
            raise RuntimeError("one request scope runs once")
        self.kind = "upsample"
        core = self.core
        self.prompts = len(prompts)
        core._serving_fingerprint()
        valid = core.validate_prompts(prompts, field)
        timeout = self._timeout(timeout)
        job = await core._check_upsample(valid, spec)
        self._admission = self._held.enter_context(core.admit(self.principal, len(valid), nbytes=job.image_bytes))
        started = time.monotonic()
        upsampled = await core._upsample_admitted(job, timeout)
        self.stages["upsample"] = time.monotonic() - started
        return upsampled

    def _timeout(self, timeout: float | None) -> float:
        settings = self.core.settings
        timeout = settings.default_timeout_s if timeout is None else min(timeout, settings.default_timeout_s)
        if timeout <= 0:
            raise DeadlineExceeded("the request's deadline had passed when it arrived")
        return timeout

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times a front-end stage ("serialize", "send") into the metrics and the access log."""
        started = time.monotonic()
        try:
            yield
        finally:
            elapsed = time.monotonic() - started
            self.stages[name] = self.stages.get(name, 0.0) + elapsed
            self.core.metrics.stage_seconds.labels(name).observe(elapsed)

    async def send(self, write: Awaitable[T]) -> T:
        """Await one write of the answer (a front-end's transport write, which blocks while the client does
        not read) within the send deadline: `send_timeout_s` from the first write to the last. Past it the
        write is cancelled, the drop counted, and SendTimeout raised; the front-end then ends the call."""
        now = time.monotonic()
        if self._send_deadline is None:
            self._send_deadline = now + self.core.settings.send_timeout_s
        try:
            # A deadline already past still lets a write that completes at once through.
            return await asyncio.wait_for(write, max(self._send_deadline - now, 0.001))
        except TimeoutError:
            self.core.metrics.dropped.labels("send_timeout").inc()
            raise SendTimeout(
                f"the answer was not read within send_timeout_s={self.core.settings.send_timeout_s:g}"
            ) from None

    def add_bytes_sent(self, nbytes: int) -> None:
        self.bytes_sent += nbytes
        self.core.metrics.sent_bytes.labels(self.frontend).inc(nbytes)

    def _finish(self, exc: BaseException | None) -> None:
        if isinstance(exc, ServiceError):
            self.status, self.error = exc.code, str(exc)
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit, ClientGone)):
            self.status, self.error = "CANCELLED", "the client went away"
        elif exc is not None:
            self.status, self.error = "INTERNAL", f"{type(exc).__name__}: {exc}"
        self._held.close()
        total = time.monotonic() - self._started
        metrics = self.core.metrics
        counter = metrics.upsample_requests if self.kind == "upsample" else metrics.requests
        counter.labels(self.frontend, self.status).inc()
        metrics.request_duration.labels(self.frontend).observe(total)
        self.core._exit()  # after the metrics: a request no longer in flight has been counted
        fields: dict[str, object] = {
            "request_id": self.request_id,
            "frontend": self.frontend,
            "rpc": self.kind,
            "principal": self.principal.name,
            "prompts": self.prompts,
            "cache_hits": self.cache_hits,
            "status": self.status,
            "bytes_sent": self.bytes_sent,
            **{f"{name}_s": round(seconds, 6) for name, seconds in self.stages.items()},
            "total_s": round(total, 6),
        }
        if self.error is not None:
            fields["error"] = self.error
        access_log.info("request", extra={"fields": fields})


class EncoderCore:
    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.fingerprint: Fingerprint | None = None
        self.embedding_dim = 0
        tokens = settings.auth_tokens.get_secret_value() if settings.auth_tokens is not None else None
        self.authenticator = TokenAuthenticator.from_sources(settings.auth_tokens_file, tokens)
        self.limiter = PrincipalLimiter(
            settings.rate_limit_prompts_per_s,
            settings.rate_limit_burst_prompts,
            settings.max_concurrent_requests_per_token,
        )
        self.cache = EmbeddingCache(
            settings.cache_bytes,
            settings.cache_dir,
            settings.cache_dir_bytes,
            on_lookup=lambda tier, hit: self.metrics.cache_lookups.labels(tier, "hit" if hit else "miss").inc(),
        )
        self.draining = False
        #: The engine's prompt upsampler (`--upsampling`), None when the server does not upsample.
        self.upsampler: Upsampler | None = None
        self._upsample_limits: UpsampleLimits | None = None
        self._batcher: Batcher | None = None
        self._failed_batches = 0  # in a row; a batch that succeeds resets it
        self._self_test_error: str | None = None
        self._warmed = False  # the warm-up encode passed (or was switched off): readiness waits for it
        self._closed = False
        self._lock = threading.Lock()
        self._inflight_bytes = 0
        self._inflight_requests = 0
        self.metrics.track(self.metrics.inflight_bytes, lambda: self._inflight_bytes)
        self.metrics.track(self.metrics.inflight_requests, lambda: self._inflight_requests)
        self.metrics.track(self.metrics.queue_depth, lambda: self.queued_requests)
        memory = self.cache.memory
        self.metrics.track(self.metrics.cache_bytes, lambda: memory.bytes if memory is not None else 0)

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self, engine: Engine) -> None:
        """Serve `engine` from now on: builds and starts the batcher (its worker threads) over it."""
        if self._batcher is not None or self._closed:
            raise RuntimeError("an EncoderCore serves one engine for its lifetime")
        self.fingerprint = engine.fingerprint
        self.embedding_dim = engine.embedding_dim
        self.metrics.set_build_info(__version__, engine.fingerprint.weights_id, engine.fingerprint.precision)
        self._batcher = Batcher(
            engine.launch,
            max_batch_prompts=self.settings.max_batch_prompts,
            max_wait_s=self.settings.max_wait_ms / 1000,
            max_queued_requests=self.settings.max_queued_requests,
            pipeline_depth=self.settings.pipeline_depth,
            on_batch=self._on_batch,
            on_drop=lambda reason: self.metrics.dropped.labels(reason).inc(),
            max_queued_tasks=self.settings.upsample_max_queued_requests,
            task_share=self.settings.upsample_share,
        )
        self.upsampler = getattr(engine, "upsampler", None)
        s = self.settings
        self._upsample_limits = UpsampleLimits(
            max_prompts=s.upsample_max_prompts,
            max_images=s.upsample_max_images,
            max_image_bytes=s.upsample_max_image_bytes,
            max_image_pixels=s.upsample_max_image_pixels,
            max_temperature=s.upsample_max_temperature,
            max_new_tokens=s.upsample_max_new_tokens,
            images=bool(self.upsampler is not None and self.upsampler.supports_images),
        )
        batcher = self._batcher
        self.metrics.track(self.metrics.upsample_queue_depth, lambda: batcher.queued_tasks)

    def close(self, timeout: float = 5.0) -> None:
        """Stop batching: queued requests get UNAVAILABLE, the batches on the device finish. Waits up to
        `timeout` seconds for the batcher's threads (blocking: from a loop, run it in a thread)."""
        self._closed = True
        batcher = self._batcher
        if batcher is not None:
            batcher.close()
            batcher.join(timeout)

    @property
    def engine_problem(self) -> str | None:
        """Why the loaded engine cannot serve, None while it can (or is still loading): its worker thread
        died, `unhealthy_after_failed_batches` batches failed in a row, or the last self-test failed."""
        batcher = self._batcher
        if batcher is None:
            return None
        if not batcher.alive:
            return "the batcher's worker thread died"
        if self._self_test_error is not None:
            return f"the self-test encode failed: {self._self_test_error}"
        limit = self.settings.unhealthy_after_failed_batches
        if self._failed_batches >= limit:
            return f"{self._failed_batches} model batches failed in a row (unhealthy_after_failed_batches={limit})"
        return None

    @property
    def live(self) -> bool:
        """Liveness: False only when the engine is broken (loading and draining are alive)."""
        return self.engine_problem is None

    @property
    def ready(self) -> bool:
        """Readiness: loaded, warmed up, not draining, and the engine works."""
        return self._batcher is not None and self._warmed and not self.draining and not self._closed and self.live

    async def warm_up(self, timeout: float) -> bool:
        """The first self-test, run once after `start`: readiness stays False until it passes, so no probe
        sees SERVING while the first forward (kernel selection, compilation, CUDA graph capture) still runs.
        With `settings.warmup` off the core is ready at once, without a forward. Returns whether it passed."""
        if self.settings.warmup and not await self.self_test(timeout):
            return False
        self._warmed = True
        return True

    @property
    def needs_self_test(self) -> bool:
        """Batches have been failing (or the last self-test failed): only a passing self-test clears it."""
        return self._self_test_error is not None or self._failed_batches >= self.settings.unhealthy_after_failed_batches

    async def self_test(self, timeout: float) -> bool:
        """Encode `SELF_TEST_PROMPT` through the batcher (no cache, no admission) and check its rows; a pass
        clears the failure count, a failure keeps the engine unhealthy until a later pass."""
        batcher = self._batcher
        if batcher is None or self._closed or not batcher.alive:
            return False
        try:
            encoded = await batcher.submit([SELF_TEST_PROMPT], timeout=timeout)
            embeds = encoded.embeds
            if embeds.shape[0] != 1 or embeds.shape[-1] != self.embedding_dim:
                raise RuntimeError(f"unexpected shape {tuple(embeds.shape)}")
            if not bool(torch.isfinite(embeds).all()):
                raise RuntimeError("the rows are not finite")
        except Exception as exc:
            self._self_test_error = f"{type(exc).__name__}: {exc}"
            self.metrics.self_tests.labels("failed").inc()
            log.error("self-test failed: %s", self._self_test_error)
            return False
        self._self_test_error = None
        self._failed_batches = 0
        self.metrics.self_tests.labels("passed").inc()
        return True

    def start_draining(self) -> None:
        """New requests get UNAVAILABLE from now on; admitted ones run to completion."""
        self.draining = True

    @property
    def inflight_requests(self) -> int:
        return self._inflight_requests

    @property
    def inflight_bytes(self) -> int:
        return self._inflight_bytes

    @property
    def queued_requests(self) -> int:
        """Requests waiting for the model."""
        return self._batcher.queued if self._batcher is not None else 0

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (or `timeout` passes); True when idle."""
        deadline = time.monotonic() + timeout
        while self._inflight_requests > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    # -- requests -----------------------------------------------------------------------------------------
    def request(self, frontend: str, *, request_id: str | None = None, bearer_token: str | None = None) -> RequestScope:
        """The scope of one request (see the module docstring); `bearer_token` is the raw token the request
        carried, None when it carried none."""
        return RequestScope(self, frontend, clean_request_id(request_id) or uuid.uuid4().hex[:16], bearer_token)

    def authenticate(self, bearer_token: str | None) -> Principal:
        """For calls that are not encodes (Info, reflection): who sent `bearer_token`, or Unauthenticated."""
        return self.authenticator.authenticate(bearer_token)

    def validate_prompts(self, prompts: Sequence[object], field: str = "prompts") -> list[str]:
        limits = self.settings
        if len(prompts) == 0:
            raise InvalidArgument(f"{field}: at least one prompt is required")
        if len(prompts) > limits.max_prompts_per_request:
            raise InvalidArgument(
                f"{field}: {len(prompts)} prompts exceed max_prompts_per_request={limits.max_prompts_per_request}"
            )
        out = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise InvalidArgument(f"{field}[{i}]: expected a string, got {type(prompt).__name__}")
            if len(prompt) > limits.max_prompt_chars:
                raise InvalidArgument(
                    f"{field}[{i}]: {len(prompt)} characters exceed max_prompt_chars={limits.max_prompt_chars}"
                )
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgument(f"{field}[{i}]: not valid UTF-8 (lone surrogate)") from None
            out.append(prompt)
        return out

    @property
    def upsample_limits(self) -> UpsampleLimits | None:
        """What upsampling requests may ask for; None when this server does not upsample."""
        return self._upsample_limits if self.upsampler is not None else None

    async def _check_upsample(self, prompts: list[str], spec: UpsampleSpec, field_prefix: str = "") -> UpsampleJob:
        limits = self.upsample_limits
        if limits is None:
            raise FailedPrecondition(
                f"{field_prefix or 'upsampling: '}this server does not upsample prompts (start it with --upsampling)"
            )
        if not spec.images:
            return check_upsample_request(prompts, spec, limits, field_prefix)
        # Image files are decoded here, in a thread: neither the event loop nor the model thread waits on it.
        return await asyncio.to_thread(check_upsample_request, prompts, spec, limits, field_prefix)

    async def _upsample_admitted(self, job: UpsampleJob, timeout: float) -> Upsampled:
        assert self._batcher is not None and self.upsampler is not None
        upsampler = self.upsampler
        try:
            done = await self._batcher.run_task(lambda should_stop: upsampler.generate(job, should_stop), timeout)
        except ResourceExhausted:
            self.metrics.rejected.labels("upsample_max_queued_requests").inc()
            raise
        except ServiceError:
            raise
        except Exception as exc:  # the model raised: this request fails, the server carries on
            log.error("upsampling failed for %d prompts", len(job.prompts), exc_info=exc)
            raise EncodeFailed(f"upsampling failed: {type(exc).__name__}: {exc}") from None
        upsampled = done.value
        assert isinstance(upsampled, Upsampled)
        self.metrics.upsample_seconds.labels("queue").observe(done.queue_seconds)
        self.metrics.upsample_seconds.labels("generate").observe(done.run_seconds)
        self.metrics.upsample_prompts.inc(len(job.prompts))
        self.metrics.upsample_tokens.inc(sum(upsampled.new_tokens))
        return upsampled

    def response_bytes(self, prompts: int) -> int:
        """Bytes of the embeddings for `prompts` prompts: what admission reserves."""
        fp = self._serving_fingerprint()
        return prompts * fp.max_length * self.embedding_dim * fp.itemsize

    def admit(self, principal: Principal, prompts: int, *, nbytes: int | None = None) -> Admission:
        """Reserve the response bytes of `prompts` prompts (or `nbytes`, e.g. an upsampling request's images)
        and a concurrency slot of `principal`, or raise (InvalidArgument when the request could never fit,
        ResourceExhausted / RateLimited when full)."""
        nbytes = self.response_bytes(prompts) if nbytes is None else nbytes
        limit = self.settings.max_inflight_bytes
        if nbytes > limit:
            raise InvalidArgument(
                f"prompts: {prompts} prompts need {nbytes} response bytes, more than max_inflight_bytes={limit}; "
                "send fewer prompts per request"
            )
        with self._lock:
            if self._inflight_bytes + nbytes > limit:
                self.metrics.rejected.labels("max_inflight_bytes").inc()
                raise ResourceExhausted(
                    f"server busy: {self._inflight_bytes} response bytes in flight, this request needs {nbytes} "
                    f"more (max_inflight_bytes={limit})"
                )
            try:
                self.limiter.acquire(principal, prompts)
            except RateLimited as exc:
                self.metrics.rejected.labels(exc.limit).inc()
                raise
            self._inflight_bytes += nbytes
        return Admission(self, principal, nbytes)

    def _serving_fingerprint(self) -> Fingerprint:
        if self.draining or self._closed:
            raise Unavailable("the server is draining for shutdown; retry on another replica")
        if self._batcher is None or self.fingerprint is None:
            raise Unavailable("the model is still loading; retry shortly")
        if not self._batcher.alive:  # nothing would ever answer: send the client elsewhere at once
            raise Unavailable("the server's model worker has stopped; retry on another replica")
        return self.fingerprint

    async def _encode_admitted(self, prompts: list[str], timeout: float, bypass_cache: bool) -> EncodeResult:
        assert self._batcher is not None and self.fingerprint is not None
        digest = self.fingerprint.digest
        rows: list[torch.Tensor | None] = [None] * len(prompts)
        hits = [False] * len(prompts)
        if self.cache.enabled and not bypass_cache:
            if self.cache.disk is not None:  # file reads stay off the event loop
                found = await asyncio.to_thread(lambda: [self.cache.get(digest, p) for p in prompts])
            else:
                found = [self.cache.get(digest, p) for p in prompts]
            for i, row in enumerate(found):
                if row is not None:
                    rows[i], hits[i] = row, True
        # Each distinct missing prompt goes to the model once, however often the request repeats it.
        missing = list(dict.fromkeys(p for p, row in zip(prompts, rows, strict=True) if row is None))
        queue_s = encode_s = 0.0
        embeds: torch.Tensor | None = None
        if missing:
            try:
                encoded = await self._batcher.submit(missing, timeout=timeout)
            except ResourceExhausted:  # the queue is full (requests answered from the cache never queue)
                self.metrics.rejected.labels("max_queued_requests").inc()
                raise
            queue_s, encode_s = encoded.queue_seconds, encoded.encode_seconds
            self.metrics.stage_seconds.labels("queue").observe(queue_s)
            self.metrics.stage_seconds.labels("encode").observe(encode_s)
            if len(missing) == len(prompts):  # nothing cached, no repeats: the model's rows as they are
                embeds = encoded.embeds
                rows = []
            else:
                by_prompt = dict(zip(missing, encoded.embeds, strict=True))
                rows = [row if row is not None else by_prompt[p] for p, row in zip(prompts, rows, strict=True)]
            if self.cache.enabled:
                if self.cache.disk is not None:
                    await asyncio.to_thread(self._store, missing, encoded.embeds)
                else:
                    self._store(missing, encoded.embeds)
        if embeds is None:
            embeds = torch.stack(rows)  # type: ignore[arg-type]
        self.metrics.prompts.labels("model").inc(len(missing))
        self.metrics.prompts.labels("cache").inc(sum(hits))
        return EncodeResult(embeds=embeds, cache_hit=hits, queue_seconds=queue_s, encode_seconds=encode_s)

    def _store(self, prompts: list[str], embeds: torch.Tensor) -> None:
        assert self.fingerprint is not None
        for prompt, row in zip(prompts, embeds, strict=True):
            self.cache.put(self.fingerprint.digest, prompt, row)

    # -- accounting ---------------------------------------------------------------------------------------
    def _release(self, admission: Admission) -> None:
        with self._lock:
            self._inflight_bytes -= admission.nbytes
        self.limiter.release(admission.principal)

    def _enter(self) -> None:
        with self._lock:
            self._inflight_requests += 1

    def _exit(self) -> None:
        with self._lock:
            self._inflight_requests -= 1

    def _on_batch(self, stats: BatchStats) -> None:
        if stats.failed:
            self._failed_batches += 1
            self.metrics.batch_failures.inc()
            return
        self._failed_batches = 0
        self.metrics.batch_prompts.observe(stats.prompts)
        self.metrics.batch_requests.observe(stats.jobs)
        assert self.fingerprint is not None
        self.metrics.model_tokens.inc(stats.prompts * self.fingerprint.max_length)
