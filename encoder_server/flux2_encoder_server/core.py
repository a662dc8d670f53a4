"""The front-end-agnostic core: authentication, limits, validation, cache, batching, metrics, access log
and drain. The gRPC service and the HTTP /predict front-end are thin layers over this.

How a front-end serves one request (errors are typed ServiceErrors; errors.py maps them):

    async with core.request("http", request_id=rid, bearer_token=token) as req:   # authenticates
        result = await req.encode(prompts, timeout=..., bypass_cache=...)           # limits, cache, model
        with req.stage("serialize"):
            body = ...
        with req.stage("send"):
            ...; req.add_bytes_sent(len(body))

Leaving the `async with` releases the request's in-flight bytes and per-token concurrency slot, records
its status in the metrics and writes one access-log line. Any exception, including cancellation, goes
through it unchanged. `core.authenticate()` and `core.encode()` remain usable on their own (then the
reservation ends when `encode` returns).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import torch

from .batcher import Batcher, BatchStats, EncodeFn
from .cache import EmbeddingCache
from .engine import Fingerprint
from .errors import (
    ClientGone,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    RateLimited,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from .logs import access_log
from .metrics import Metrics
from .security import ANONYMOUS, Principal, PrincipalLimiter, TokenAuthenticator
from .settings import Settings

__all__ = ["ANONYMOUS", "EncodeResult", "EncoderCore", "Principal", "RequestScope"]

_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class EncodeResult:
    embeds: torch.Tensor
    cache_hit: list[bool]
    queue_seconds: float = 0.0
    encode_seconds: float = 0.0


class _Lease:
    """What an admitted request holds: in-flight bytes, a per-token slot, an in-flight count."""

    def __init__(self, core: EncoderCore, principal: Principal, nbytes: int):
        self._core = core
        self.principal = principal
        self.nbytes = nbytes
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._core._release(self)


@dataclass
class RequestScope:
    """One request through a front-end; see the module docstring."""

    core: EncoderCore
    frontend: str
    request_id: str
    bearer_token: str | None = None
    principal: Principal = ANONYMOUS
    prompts: int = 0
    cache_hits: int = 0
    bytes_sent: int = 0
    stages: dict[str, float] = field(default_factory=dict)
    status: str = "OK"
    error: str | None = None
    _lease: _Lease | None = None
    _started: float = field(default_factory=time.monotonic)

    async def __aenter__(self) -> RequestScope:
        self.core._enter()
        try:
            self.principal = self.core.authenticate(self.bearer_token)
        except BaseException as exc:
            self._finish(exc)
            raise
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
    ) -> EncodeResult:
        result = await self.core.encode(
            prompts,
            principal=self.principal,
            expected_fingerprint=expected_fingerprint,
            timeout=timeout,
            bypass_cache=bypass_cache,
            scope=self,
        )
        self.cache_hits = sum(result.cache_hit)
        self.stages["queue"] = result.queue_seconds
        self.stages["encode"] = result.encode_seconds
        return result

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

    def add_bytes_sent(self, nbytes: int) -> None:
        self.bytes_sent += nbytes
        self.core.metrics.bytes_sent.labels(self.frontend).inc(nbytes)

    def _finish(self, exc: BaseException | None) -> None:
        if isinstance(exc, ServiceError):
            self.status, self.error = exc.grpc_code.name, str(exc)
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit, ClientGone)):
            self.status, self.error = "CANCELLED", "the client went away"
        elif exc is not None:
            self.status, self.error = "INTERNAL", f"{type(exc).__name__}: {exc}"
        if self._lease is not None:
            self._lease.release()
        total = time.monotonic() - self._started
        metrics = self.core.metrics
        metrics.requests.labels(self.frontend, self.status).inc()
        metrics.request_seconds.labels(self.frontend).observe(total)
        self.core._exit()
        fields: dict[str, object] = {
            "request_id": self.request_id,
            "frontend": self.frontend,
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
        self.batcher: Batcher | None = None
        self.fingerprint: Fingerprint | None = None
        self.embedding_dim = 0
        self.authenticator = TokenAuthenticator.from_sources(settings.auth_tokens_file, settings.auth_tokens)
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
        self._lock = threading.Lock()
        self._inflight_bytes = 0
        self._inflight_requests = 0
        self.metrics.track(self.metrics.inflight_bytes, lambda: self._inflight_bytes)
        self.metrics.track(self.metrics.inflight_requests, lambda: self._inflight_requests)
        self.metrics.track(self.metrics.queue_depth, lambda: self.batcher.queued if self.batcher else 0)
        memory = self.cache.memory
        self.metrics.track(self.metrics.cache_bytes, lambda: memory.bytes if memory is not None else 0)

    # -- lifecycle ----------------------------------------------------------------------------------------
    def make_batcher(self, encode: EncodeFn) -> Batcher:
        """A Batcher over `encode` with this core's settings and metric callbacks."""
        return Batcher(
            encode,
            max_batch_prompts=self.settings.max_batch_prompts,
            max_wait_s=self.settings.max_wait_ms / 1000,
            max_queued_requests=self.settings.max_queued_requests,
            pipeline_depth=self.settings.pipeline_depth,
            on_batch=self._on_batch,
            on_drop=lambda reason: self.metrics.dropped.labels(reason).inc(),
        )

    def attach(self, batcher: Batcher, fingerprint: Fingerprint, embedding_dim: int) -> None:
        """Called once the model is loaded; before that every request gets UNAVAILABLE."""
        self.fingerprint = fingerprint
        self.embedding_dim = embedding_dim
        self.batcher = batcher

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self.draining

    def start_draining(self) -> None:
        """New requests get UNAVAILABLE from now on; admitted ones run to completion."""
        self.draining = True

    @property
    def inflight_requests(self) -> int:
        return self._inflight_requests

    @property
    def inflight_bytes(self) -> int:
        return self._inflight_bytes

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
        return RequestScope(self, frontend, request_id or uuid.uuid4().hex[:16], bearer_token)

    def authenticate(self, bearer_token: str | None) -> Principal:
        """Front-ends pass the raw bearer token (None when the request carried none)."""
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

    def response_bytes(self, prompts: int) -> int:
        """Bytes of the embeddings for `prompts` prompts: what admission reserves."""
        assert self.fingerprint is not None
        return prompts * self.fingerprint.max_length * self.embedding_dim * _ITEMSIZE[self.fingerprint.dtype]

    async def encode(
        self,
        prompts: Sequence[object],
        *,
        principal: Principal = ANONYMOUS,
        expected_fingerprint: str = "",
        timeout: float | None = None,
        bypass_cache: bool = False,
        scope: RequestScope | None = None,
    ) -> EncodeResult:
        if self.draining:
            raise Unavailable("the server is draining for shutdown; retry on another replica")
        if self.batcher is None or self.fingerprint is None:
            raise Unavailable("the model is still loading; retry shortly")
        if scope is not None:
            scope.prompts = len(prompts)
        valid = self.validate_prompts(prompts)
        if expected_fingerprint and expected_fingerprint != self.fingerprint.digest:
            raise FailedPrecondition(
                f"expected_fingerprint {expected_fingerprint[:16]}… does not match this server's model "
                f"{self.fingerprint.weights_id} (digest {self.fingerprint.digest[:16]}…)"
            )
        timeout = self.settings.default_timeout_s if timeout is None else min(timeout, self.settings.default_timeout_s)
        if timeout <= 0:
            raise DeadlineExceeded("the request's deadline had passed when it arrived")
        if scope is not None and scope._lease is not None:
            raise InvalidArgument("one request scope may encode only once")
        lease = self._admit(principal, len(valid))
        if scope is None:
            self._enter()  # counted for drain like a scoped request
        else:
            scope._lease = lease
        try:
            return await self._encode_admitted(valid, timeout, bypass_cache)
        finally:
            if scope is None:
                lease.release()
                self._exit()

    async def _encode_admitted(self, prompts: list[str], timeout: float, bypass_cache: bool) -> EncodeResult:
        assert self.batcher is not None and self.fingerprint is not None
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
                encoded = await self.batcher.submit(missing, timeout=timeout)
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

    # -- admission ----------------------------------------------------------------------------------------
    def _admit(self, principal: Principal, prompts: int) -> _Lease:
        nbytes = self.response_bytes(prompts)
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
        return _Lease(self, principal, nbytes)

    def _release(self, lease: _Lease) -> None:
        with self._lock:
            self._inflight_bytes -= lease.nbytes
        self.limiter.release(lease.principal)

    def _enter(self) -> None:
        with self._lock:
            self._inflight_requests += 1

    def _exit(self) -> None:
        with self._lock:
            self._inflight_requests -= 1

    def _on_batch(self, stats: BatchStats) -> None:
        if stats.failed:
            self.metrics.batch_failures.inc()
            return
        self.metrics.batch_prompts.observe(stats.prompts)
        self.metrics.batch_requests.observe(stats.jobs)
        assert self.fingerprint is not None
        self.metrics.model_tokens.inc(stats.prompts * self.fingerprint.max_length)
