"""The transport-free core: authentication, limits, validation, cache, batching, metrics, access log and
drain. The gRPC service and the HTTP /predict front-end are thin layers over it; nothing here knows
either transport (errors are typed `ServiceError`s that each front-end maps in its own table).

Models: the core hosts every model the settings name (`Settings.models`), each a `HostedModel` with its
own batcher, so a model batch never mixes models. `core.start(engine, model=name)` starts one once it is
loaded (before that its requests get UNAVAILABLE); `core.close()` stops them all. Authentication, the
per-token limits, the in-flight byte budget, the embedding cache (keyed by fingerprint digest), the
metrics and draining are shared by all models. A request names its model (empty: the default one); a
name the server does not host is `ModelNotFound`, whose message names the hosted ones. Once every model
is started, `await core.warm_up(timeout)` runs the first self-test of each (readiness waits for it).
Prompt upsampling is a property of a hosted model: the one whose engine has an upsampler.

A request goes through one API, its scope:

    async with core.request("http", request_id=rid, bearer_token=token, model=name) as req:  # authenticates
        result = await req.encode(prompts, timeout=..., bypass_cache=...)      # model, limits, cache, batch
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
from .batcher import PendingBatch
from .cache import EmbeddingCache
from .errors import (
    ClientGone,
    DeadlineExceeded,
    EncodeFailed,
    FailedPrecondition,
    InvalidArgument,
    ModelNotFound,
    RateLimited,
    ResourceExhausted,
    SendTimeout,
    ServiceError,
    Unavailable,
)
from .fingerprint import Fingerprint
from .hosted import SELF_TEST_PROMPT, HostedModel
from .logs import access_log
from .metrics import NO_MODEL, Metrics
from .security import ANONYMOUS, Principal, PrincipalLimiter, TokenAuthenticator
from .settings import Settings
from .upsample import Upsampled, UpsampleJob, UpsampleLimits, UpsampleSpec, check_upsample_request

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
    "HostedModel",
    "Principal",
    "RequestScope",
    "clean_request_id",
]


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
    #: The hosted model that answered (its served name) and its fingerprint, for the response header.
    model: str = ""
    fingerprint: Fingerprint | None = None
    #: With `encode(upsample=...)`: the rewritten prompts (the ones encoded) and their seed.
    upsampled: Upsampled | None = None


class Admission:
    """What an admitted request holds until it ends: its response bytes in flight and a per-token
    concurrency slot. Leaving the context (or `release()`, idempotent) gives both back."""

    def __init__(self, core: EncoderCore, principal: Principal, nbytes: int):
        self._core = core
        self.principal = principal
        self.nbytes = nbytes  # reserved in the server-wide in-flight budget, whatever the model
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


class SendDeadline:
    """`send_timeout_s` from the first write of an answer to its last: the deadline both request scopes
    (`RequestScope`, and `remote_core.RemoteScope` in a front-end process) put on a transport's writes."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._deadline: float | None = None

    async def write(self, write: Awaitable[T]) -> T:
        """Await one write (which blocks while the client does not read); past the deadline it is cancelled
        and SendTimeout raised."""
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.timeout_s
        try:
            # A deadline already past still lets a write that completes at once through.
            return await asyncio.wait_for(write, max(self._deadline - now, 0.001))
        except TimeoutError:
            raise SendTimeout(f"the answer was not read within send_timeout_s={self.timeout_s:g}") from None


class RequestScope:
    """One request through a front-end; see the module docstring."""

    def __init__(self, core: EncoderCore, frontend: str, request_id: str, bearer_token: str | None, model: str = ""):
        self.core = core
        self.frontend = frontend
        self.request_id = request_id
        #: The model the request named ("" for the default) and the label its metrics carry: the served
        #: name, or NO_MODEL for a name the server does not host (never a client's string as a label).
        self.requested_model = model
        self.model = core.model_label(model)
        self.principal = ANONYMOUS
        self.prompts = 0
        self.cache_hits = 0
        self.bytes_sent = 0
        self.stages: dict[str, float] = {}
        self.status = "OK"
        self.error: str | None = None
        #: "encode" or "upsample": what the scope did (its metrics and access-log line say which).
        self.kind = "encode"
        #: With `--frontends`: the index of the front-end process that carried the request (access log).
        self.process: int | None = None
        self._bearer_token = bearer_token
        self._held = contextlib.ExitStack()  # what the request holds (its admission) until it ends
        self._admission: Admission | None = None
        self._started = time.monotonic()
        self._send_deadline = SendDeadline(core.settings.send_timeout_s)

    def __repr__(self) -> str:  # never the bearer token
        return (
            f"RequestScope({self.frontend!r}, request_id={self.request_id!r}, principal={self.principal.name!r}, "
            f"model={self.model!r})"
        )

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
        """Admit and encode `prompts` with the scope's model (`field` names them in error messages, as the
        front-end's request spells it); with `upsample`, rewrite them first (with the same model) and encode
        the rewritten ones. Raises a ServiceError when the server refuses."""
        if self._admission is not None:
            raise RuntimeError("one request scope encodes once")
        core = self.core
        self.prompts = len(prompts)
        hosted = core.model(self.requested_model)
        fingerprint = core._serving_fingerprint(hosted)
        valid = core.validate_prompts(prompts, field)
        if expected_fingerprint and expected_fingerprint != fingerprint.digest:
            raise FailedPrecondition(
                shared.fingerprint_mismatch_message(expected_fingerprint, fingerprint.digest, fingerprint.weights_id)
            )
        timeout = self._timeout(timeout)
        job = await core._check_upsample(hosted, valid, upsample, "upsample.") if upsample is not None else None
        self._admission = self._held.enter_context(core.admit(self.principal, len(valid), hosted))
        upsampled = None
        if job is not None:
            started = time.monotonic()
            upsampled = await core._upsample_admitted(hosted, job, timeout)
            self.stages["upsample"] = time.monotonic() - started
            timeout -= self.stages["upsample"]
            valid = upsampled.prompts
            if timeout <= 0:
                raise DeadlineExceeded("the request's deadline passed while its prompts were upsampled")
        result = await core._encode_admitted(hosted, valid, timeout, bypass_cache)
        result.upsampled = upsampled
        self.cache_hits = sum(result.cache_hit)
        self.stages["queue"] = result.queue_seconds
        self.stages["encode"] = result.encode_seconds
        return result

    async def upsample(
        self, prompts: Sequence[object], spec: UpsampleSpec, *, timeout: float | None = None, field: str = "prompts"
    ) -> Upsampled:
        """Admit and rewrite `prompts` (prompt upsampling) with the scope's model; see `upsample.py`. Raises a
        ServiceError when the server refuses (FailedPrecondition when that model does not upsample)."""
        if self._admission is not None:
            raise RuntimeError("one request scope runs once")
        self.kind = "upsample"
        core = self.core
        self.prompts = len(prompts)
        hosted = core.model(self.requested_model)
        core._serving_fingerprint(hosted)
        valid = core.validate_prompts(prompts, field)
        timeout = self._timeout(timeout)
        job = await core._check_upsample(hosted, valid, spec)
        self._admission = self._held.enter_context(
            core.admit(self.principal, len(valid), hosted, nbytes=job.image_bytes)
        )
        started = time.monotonic()
        upsampled = await core._upsample_admitted(hosted, job, timeout)
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
            self.core.metrics.stage_seconds.labels(name, self.model).observe(elapsed)

    async def send(self, write: Awaitable[T]) -> T:
        """Await one write of the answer (a front-end's transport write, which blocks while the client does
        not read) within the send deadline: `send_timeout_s` from the first write to the last. Past it the
        write is cancelled, the drop counted, and SendTimeout raised; the front-end then ends the call."""
        try:
            return await self._send_deadline.write(write)
        except SendTimeout:
            self.core.metrics.dropped.labels("send_timeout", self.model).inc()
            raise

    def add_bytes_sent(self, nbytes: int) -> None:
        self.bytes_sent += nbytes
        self.core.metrics.sent_bytes.labels(self.frontend, self.model).inc(nbytes)

    def end(self, status: str, error: str | None) -> None:
        """Close the scope with a status another process reported (a front-end process, through
        `frontends.FrontendSupervisor`): the admission is released, the request counted and logged."""
        self.status, self.error = status, error
        self._finish(None)

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
        counter.labels(self.frontend, self.status, self.model).inc()
        metrics.request_duration.labels(self.frontend, self.model).observe(total)
        self.core._exit()  # after the metrics: a request no longer in flight has been counted
        fields: dict[str, object] = {
            "request_id": self.request_id,
            "frontend": self.frontend,
            "rpc": self.kind,
            "principal": self.principal.name,
            "model": self.model if self.model != NO_MODEL else clean_request_id(self.requested_model),
            "prompts": self.prompts,
            "cache_hits": self.cache_hits,
            "status": self.status,
            "bytes_sent": self.bytes_sent,
            **{f"{name}_s": round(seconds, 6) for name, seconds in self.stages.items()},
            "total_s": round(total, 6),
        }
        if self.process is not None:
            fields["frontend_process"] = self.process
        if self.error is not None:
            fields["error"] = self.error
        access_log.info("request", extra={"fields": fields})


class EncoderCore:
    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        specs = settings.models  # the default first
        self.default_model = settings.default_model_name
        self.metrics = metrics or Metrics([spec.name for spec in specs])
        tokens = settings.auth_tokens.get_secret_value() if settings.auth_tokens is not None else None
        self.authenticator = TokenAuthenticator.from_sources(settings.auth_tokens_file, tokens)
        self.limiter = PrincipalLimiter(
            settings.rate_limit_prompts_per_s,
            settings.rate_limit_burst_prompts,
            settings.max_concurrent_requests_per_token,
        )
        self.cache = EmbeddingCache(settings.cache_bytes, settings.cache_dir, settings.cache_dir_bytes)
        #: Every hosted model by its served name, the default first.
        self.models: dict[str, HostedModel] = {
            spec.name: HostedModel(
                spec.name, settings.for_model(spec), self.metrics, is_default=spec.name == self.default_model
            )
            for spec in specs
        }
        self.draining = False
        self._closed = False
        self._lock = threading.Lock()
        self._inflight_bytes = 0
        self._inflight_requests = 0
        self._admitted_requests = 0
        self.metrics.track(self.metrics.inflight_bytes, lambda: self._inflight_bytes)
        self.metrics.track(self.metrics.inflight_requests, lambda: self._inflight_requests)
        memory = self.cache.memory
        self.metrics.track(self.metrics.cache_bytes, lambda: memory.bytes if memory is not None else 0)

    # -- models -------------------------------------------------------------------------------------------
    def model(self, name: str = "") -> HostedModel:
        """The hosted model named `name` ("" for the default), or ModelNotFound naming the hosted ones."""
        hosted = self.models.get(name or self.default_model)
        if hosted is None:
            served = ", ".join(self.models)
            raise ModelNotFound(
                f"model: {clean_request_id(name[:64])!r} is not served here; this server serves {served} "
                f"(default {self.default_model})"
            )
        return hosted

    def model_label(self, name: str) -> str:
        """The `model` metrics label of a request naming `name`: the served name, NO_MODEL if not hosted."""
        name = name or self.default_model
        return name if name in self.models else NO_MODEL

    @property
    def fingerprint(self) -> Fingerprint | None:
        """The default model's fingerprint (None until it is loaded)."""
        return self.models[self.default_model].fingerprint

    @property
    def embedding_dim(self) -> int:
        """The default model's embedding width (0 until it is loaded)."""
        return self.models[self.default_model].embedding_dim

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self, engine: Engine, model: str = "") -> None:
        """Serve `engine` as the model named `model` ("" for the default) from now on: builds and starts
        that model's batcher (its worker threads) over it."""
        if self._closed:
            raise RuntimeError("this EncoderCore is closed")
        hosted = self.model(model)
        hosted.start(engine)
        fp = engine.fingerprint
        self.metrics.set_build_info(__version__, hosted.name, fp.weights_id, fp.precision)

    def close(self, timeout: float = 5.0) -> None:
        """Stop batching: queued requests get UNAVAILABLE, the batches on the device finish. Waits up to
        `timeout` seconds for each model's batcher threads (blocking: from a loop, run it in a thread)."""
        self._closed = True
        for hosted in self.models.values():
            hosted.close()
        for hosted in self.models.values():
            hosted.join(timeout)

    @property
    def engine_problem(self) -> str | None:
        """Why a loaded model cannot serve, None while every one can (or is still loading): its worker
        thread died, `unhealthy_after_failed_batches` batches failed in a row, or its last self-test failed.
        With several models each problem is prefixed with the model's name."""
        problems = [(name, hosted.problem) for name, hosted in self.models.items() if hosted.problem is not None]
        if not problems:
            return None
        if len(self.models) == 1:
            return problems[0][1]
        return "; ".join(f"model {name}: {problem}" for name, problem in problems)

    @property
    def live(self) -> bool:
        """Liveness: False only when an engine is broken (loading and draining are alive)."""
        return self.engine_problem is None

    @property
    def ready(self) -> bool:
        """Readiness: every model loaded, warmed up and working, not draining."""
        return all(self.model_ready(name) for name in self.models)

    def model_ready(self, name: str) -> bool:
        """Readiness of one model: loaded, warmed up, working, and the server not draining."""
        hosted = self.models[name]
        return hosted.started and hosted.warmed and not self.draining and not self._closed and hosted.problem is None

    async def warm_up(self, timeout: float, model: str | None = None) -> bool:
        """The first self-test of the model named `model` (None: every started model not yet warmed up), run
        once after `start`: its readiness stays False until it passes, so no probe sees SERVING while the
        first forward (kernel selection, compilation, CUDA graph capture) still runs. With `settings.warmup`
        off a model is ready at once, without a forward. Returns whether all passed."""
        if self._closed:
            return False
        if model is None:
            hosted_models = [h for h in self.models.values() if h.started and not h.warmed]
        else:
            hosted_models = [self.model(model)]
        passed = True
        for hosted in hosted_models:
            if self.settings.warmup and not await hosted.self_test(timeout):
                passed = False
                continue
            hosted.warmed = True
        return passed

    @property
    def needs_self_test(self) -> bool:
        """Some model's batches have been failing (or its last self-test failed)."""
        return any(hosted.needs_self_test for hosted in self.models.values())

    async def self_test(self, timeout: float, model: str | None = None) -> bool:
        """Encode `SELF_TEST_PROMPT` with the model named `model` (None: every model, one after the other)
        through its batcher (no cache, no admission) and check the rows; True when all passed. A pass clears
        a model's failure count, a failure keeps it unhealthy until a later pass."""
        if self._closed:
            return False
        hosted_models = list(self.models.values()) if model is None else [self.model(model)]
        results = [await hosted.self_test(timeout) for hosted in hosted_models]
        return all(results)

    def start_draining(self) -> None:
        """New requests get UNAVAILABLE from now on; admitted ones run to completion."""
        self.draining = True

    @property
    def inflight_requests(self) -> int:
        return self._inflight_requests

    @property
    def admitted_requests(self) -> int:
        """Requests holding an admission now: unlike `inflight_requests`, not those that entered a request
        scope and have not been admitted yet (an HTTP request while its body arrives), which a drain refuses."""
        return self._admitted_requests

    @property
    def inflight_bytes(self) -> int:
        return self._inflight_bytes

    @property
    def queued_requests(self) -> int:
        """Requests waiting for a model (all models)."""
        return sum(hosted.queued for hosted in self.models.values())

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (or `timeout` passes); True when idle."""
        deadline = time.monotonic() + timeout
        while self._inflight_requests > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    # -- requests -----------------------------------------------------------------------------------------
    def request(
        self, frontend: str, *, request_id: str | None = None, bearer_token: str | None = None, model: str = ""
    ) -> RequestScope:
        """The scope of one request (see the module docstring); `bearer_token` is the raw token the request
        carried, None when it carried none; `model` the model it names ("" for the default)."""
        rid = clean_request_id(request_id) or uuid.uuid4().hex[:16]
        return RequestScope(self, frontend, rid, bearer_token, model)

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
        """What upsampling requests to the default model may ask for; None when it does not upsample."""
        return self.model().upsample_limits

    async def _check_upsample(
        self, hosted: HostedModel, prompts: list[str], spec: UpsampleSpec, field_prefix: str = ""
    ) -> UpsampleJob:
        limits = hosted.upsample_limits
        if limits is None:
            who = "this server does" if len(self.models) == 1 else f"model {hosted.name} does"
            raise FailedPrecondition(
                f"{field_prefix or 'upsampling: '}{who} not upsample prompts (start it with --upsampling)"
            )
        if not spec.images:
            return check_upsample_request(prompts, spec, limits, field_prefix)
        # Image files are decoded here, in a thread: neither the event loop nor the model thread waits on it.
        return await asyncio.to_thread(check_upsample_request, prompts, spec, limits, field_prefix)

    async def _upsample_admitted(self, hosted: HostedModel, job: UpsampleJob, timeout: float) -> Upsampled:
        try:
            return await hosted.upsample(job, timeout)
        except ServiceError:
            raise
        except Exception as exc:  # the model raised: this request fails, the server carries on
            log.error("upsampling failed for %d prompts", len(job.prompts), exc_info=exc)
            raise EncodeFailed(f"upsampling failed: {type(exc).__name__}: {exc}") from None

    def response_bytes(self, prompts: int, hosted: HostedModel | None = None) -> int:
        """Bytes of the embeddings for `prompts` prompts of `hosted` (default: the default model): what
        admission reserves."""
        hosted = hosted or self.model()
        self._serving_fingerprint(hosted)
        return hosted.response_bytes(prompts)

    def admit(
        self, principal: Principal, prompts: int, hosted: HostedModel | None = None, *, nbytes: int | None = None
    ) -> Admission:
        """Reserve the response bytes of `prompts` prompts of `hosted` (default: the default model), or
        `nbytes` (e.g. an upsampling request's images), in the server-wide budget and a concurrency slot of
        `principal`, or raise (InvalidArgument when the request could never fit, ResourceExhausted /
        RateLimited when full)."""
        hosted = hosted or self.model()
        nbytes = self.response_bytes(prompts, hosted) if nbytes is None else nbytes
        limit = self.settings.max_inflight_bytes
        if nbytes > limit:
            raise InvalidArgument(
                f"prompts: {prompts} prompts need {nbytes} response bytes, more than max_inflight_bytes={limit}; "
                "send fewer prompts per request"
            )
        with self._lock:
            if self._inflight_bytes + nbytes > limit:
                self.metrics.rejected.labels("max_inflight_bytes", hosted.name).inc()
                raise ResourceExhausted(
                    f"server busy: {self._inflight_bytes} response bytes in flight, this request needs {nbytes} "
                    f"more (max_inflight_bytes={limit})"
                )
            try:
                self.limiter.acquire(principal, prompts)
            except RateLimited as exc:
                self.metrics.rejected.labels(exc.limit, hosted.name).inc()
                raise
            self._inflight_bytes += nbytes
            self._admitted_requests += 1
        return Admission(self, principal, nbytes)

    def _serving_fingerprint(self, hosted: HostedModel) -> Fingerprint:
        if self.draining or self._closed:
            raise Unavailable("the server is draining for shutdown; retry on another replica")
        return hosted.serving_fingerprint()

    async def _encode_admitted(
        self, hosted: HostedModel, prompts: list[str], timeout: float, bypass_cache: bool
    ) -> EncodeResult:
        fingerprint = hosted.serving_fingerprint()
        digest = fingerprint.digest
        lookups = self.metrics.cache_lookups

        def count(tier: str, hit: bool) -> None:
            lookups.labels(tier, "hit" if hit else "miss", hosted.name).inc()

        def lookup() -> list[torch.Tensor | None]:
            return [self.cache.get(digest, p, on_lookup=count) for p in prompts]

        rows: list[torch.Tensor | None] = [None] * len(prompts)
        hits = [False] * len(prompts)
        if self.cache.enabled and not bypass_cache:
            # File reads stay off the event loop.
            found = await asyncio.to_thread(lookup) if self.cache.disk is not None else lookup()
            for i, row in enumerate(found):
                if row is not None:
                    rows[i], hits[i] = row, True
        # Each distinct missing prompt goes to the model once, however often the request repeats it.
        missing = list(dict.fromkeys(p for p, row in zip(prompts, rows, strict=True) if row is None))
        queue_s = encode_s = 0.0
        embeds: torch.Tensor | None = None
        if missing:
            # Requests answered from the cache never queue; a full queue is counted by the model.
            encoded = await hosted.submit(missing, timeout)
            queue_s, encode_s = encoded.queue_seconds, encoded.encode_seconds
            if len(missing) == len(prompts):  # nothing cached, no repeats: the model's rows as they are
                embeds = encoded.embeds
                rows = []
            else:
                by_prompt = dict(zip(missing, encoded.embeds, strict=True))
                rows = [row if row is not None else by_prompt[p] for p, row in zip(prompts, rows, strict=True)]
            if self.cache.enabled:
                if self.cache.disk is not None:
                    await asyncio.to_thread(self._store, digest, missing, encoded.embeds)
                else:
                    self._store(digest, missing, encoded.embeds)
        if embeds is None:
            embeds = torch.stack(rows)  # type: ignore[arg-type]
        self.metrics.prompts.labels("model", hosted.name).inc(len(missing))
        self.metrics.prompts.labels("cache", hosted.name).inc(sum(hits))
        return EncodeResult(
            embeds=embeds,
            cache_hit=hits,
            queue_seconds=queue_s,
            encode_seconds=encode_s,
            model=hosted.name,
            fingerprint=fingerprint,
        )

    def _store(self, digest: str, prompts: list[str], embeds: torch.Tensor) -> None:
        for prompt, row in zip(prompts, embeds, strict=True):
            self.cache.put(digest, prompt, row)

    # -- accounting ---------------------------------------------------------------------------------------
    def _release(self, admission: Admission) -> None:
        with self._lock:
            self._inflight_bytes -= admission.nbytes
            self._admitted_requests -= 1
        self.limiter.release(admission.principal)

    def _enter(self) -> None:
        with self._lock:
            self._inflight_requests += 1

    def _exit(self) -> None:
        with self._lock:
            self._inflight_requests -= 1
