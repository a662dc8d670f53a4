"""A front-end process's stand-in for `EncoderCore` (`--frontends N`, docs/design.md#architecture).

The gRPC servicer (`grpc_service.py`) and the HTTP app (`http_app.py`) run unchanged over `RemoteCore`: it
has the part of the core they use. A request scope opens a real `RequestScope` in the model process (one
frame over the Unix socket), `encode` / `upsample` run there, and the answer comes back as a tensor view of
the shared response ring; leaving the scope sends "done" (status, bytes sent, stage timings), which closes
the model process's scope and frees the ring region. Service errors come back as the same class, so both
front-ends' status tables keep working. Info, models and health come from state snapshots the model
process sends whenever they change; the model process unreachable is NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import torch

from . import errors
from .core import EncodeResult, SendDeadline, clean_request_id
from .errors import (
    ClientGone,
    ModelNotFound,
    RateLimited,
    SendTimeout,
    ServiceError,
    Unavailable,
)
from .fingerprint import Fingerprint
from .ipc import RingView, write_frame
from .metrics import NO_MODEL
from .security import ANONYMOUS, Principal, TokenAuthenticator
from .settings import Settings
from .upsample import Upsampled, UpsampleLimits, UpsampleSpec

T = TypeVar("T")

__all__ = ["RemoteCore", "RemoteModel", "RemoteScope", "service_error"]

_ERROR_CLASSES: list[type[ServiceError]] = [ServiceError, *errors.service_errors()]
_ERRORS: dict[str, type[ServiceError]] = {cls.__name__: cls for cls in _ERROR_CLASSES}


def service_error(message: dict[str, Any]) -> ServiceError:
    """The ServiceError the model process raised, as the same class."""
    cls = _ERRORS.get(str(message.get("class")), ServiceError)
    text, retry = str(message.get("message", "")), message.get("retry_after_s")
    if issubclass(cls, RateLimited):
        return cls(text, str(message.get("limit") or ""), retry_after_s=retry)
    return cls(text, retry_after_s=retry)


@dataclass
class RemoteModel:
    """A hosted model as the front-end sees it: what Info and /info describe."""

    name: str
    is_default: bool
    fingerprint: Fingerprint | None
    embedding_dim: int
    upsample_limits: UpsampleLimits | None
    ready: bool
    max_batch_prompts: int
    max_queued_requests: int


class _CounterRelay:
    """`metrics.<name>.labels(...).inc(n)` of a counter the model process owns."""

    def __init__(self, core: RemoteCore, name: str, labels: tuple[str, ...] = ()):
        self._core, self._name, self._labels = core, name, labels

    def labels(self, *values: str) -> _CounterRelay:
        return _CounterRelay(self._core, self._name, tuple(values))

    def inc(self, value: float = 1.0) -> None:
        self._core._send({"t": "metric", "name": self._name, "labels": list(self._labels), "value": value})


class _MetricsRelay:
    """The counters the front-end code bumps on `core.metrics` directly, relayed to the one registry."""

    def __init__(self, core: RemoteCore):
        self.rejected = _CounterRelay(core, "rejected")
        self.dropped = _CounterRelay(core, "dropped")


class RemoteCore:
    """The core's surface that grpc_service.py and http_app.py use, over the model process's socket."""

    def __init__(
        self,
        settings: Settings,
        writer: asyncio.StreamWriter,
        ring: RingView,
        authenticator: TokenAuthenticator,
        state: dict[str, Any],
    ):
        self.settings = settings
        self.authenticator = authenticator
        self.metrics = _MetricsRelay(self)
        self.ring = ring
        self._writer = writer
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self.connected = True
        self.default_model = ""
        self.models: dict[str, RemoteModel] = {}
        self._ready = self._live = False
        self.apply_state(state)

    # -- state from the model process -----------------------------------------------------------------------
    def apply_state(self, state: dict[str, Any]) -> None:
        self.default_model = str(state["default_model"])
        models = {}
        for name, entry in state["models"].items():
            fp = entry["fingerprint"]
            if fp is not None:
                fp = Fingerprint(**{**fp, "hidden_layers": tuple(fp["hidden_layers"])})
            limits = entry["upsample_limits"]
            models[name] = RemoteModel(
                name=name,
                is_default=bool(entry["is_default"]),
                fingerprint=fp,
                embedding_dim=int(entry["embedding_dim"]),
                upsample_limits=None if limits is None else UpsampleLimits(**limits),
                ready=bool(entry["ready"]),
                max_batch_prompts=int(entry["max_batch_prompts"]),
                max_queued_requests=int(entry["max_queued_requests"]),
            )
        self.models = models
        self._ready, self._live = bool(state["ready"]), bool(state["live"])

    def disconnected(self) -> None:
        """The model process is gone: NOT_SERVING, and every request waiting on it fails."""
        self.connected = False
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(Unavailable("the model process is not reachable; retry shortly"))
        self._waiting.clear()

    async def serving_now(self, timeout: float = 2.0) -> bool:
        """Readiness at the moment of the call: the model process's state, asked now (health probes).
        False when it does not answer within `timeout`."""
        await self.refresh_state(timeout)
        return self.ready

    async def refresh_state(self, timeout: float = 2.0) -> None:
        """Ask the model process for its state now; unreachable (gone, or no answer in `timeout`) reads as
        NOT_SERVING until the next state arrives."""
        try:
            reply = await asyncio.wait_for(self._call({"t": "state?", "id": next(self._ids)}), timeout)
        except (TimeoutError, ServiceError):
            self._ready = self._live = False
            return
        self.apply_state(reply)

    def on_reply(self, message: dict[str, Any]) -> None:
        future = self._waiting.pop(int(message["id"]), None)
        if future is not None and not future.done():
            future.set_result(message)

    # -- what the front-ends read ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.connected and self._ready

    @property
    def live(self) -> bool:
        return self.connected and self._live

    def model(self, name: str = "") -> RemoteModel:
        hosted = self.models.get(name or self.default_model)
        if hosted is None:
            raise ModelNotFound(
                f"model: {clean_request_id(name[:64])!r} is not served here; this server serves "
                f"{', '.join(self.models)} (default {self.default_model})"
            )
        return hosted

    def model_label(self, name: str) -> str:
        name = name or self.default_model
        return name if name in self.models else NO_MODEL

    def model_ready(self, name: str) -> bool:
        return self.connected and self.models[name].ready

    def authenticate(self, bearer_token: str | None) -> Principal:
        return self.authenticator.authenticate(bearer_token)

    def request(
        self, frontend: str, *, request_id: str | None = None, bearer_token: str | None = None, model: str = ""
    ) -> RemoteScope:
        return RemoteScope(self, frontend, request_id, bearer_token, model)

    # -- the socket -----------------------------------------------------------------------------------------
    def _send(self, header: dict[str, Any], attachments: Sequence[bytes] = ()) -> None:
        if self.connected and not self._writer.is_closing():
            write_frame(self._writer, header, tuple(attachments))

    async def _call(self, header: dict[str, Any], attachments: Sequence[bytes] = ()) -> dict[str, Any]:
        """Send `header` and wait for the model process's reply to its id; an error reply is raised."""
        if not self.connected:
            raise Unavailable("the model process is not reachable; retry shortly")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting[int(header["id"])] = future
        self._send(header, attachments)
        try:
            reply = await future
        finally:
            self._waiting.pop(int(header["id"]), None)
        if reply["t"] == "error":
            raise service_error(reply)
        return reply


class RemoteScope:
    """`core.request(...)` in a front-end process: the model process's `RequestScope` at a distance."""

    def __init__(self, core: RemoteCore, frontend: str, request_id: str | None, bearer_token: str | None, model: str):
        self.core = core
        self.frontend = frontend
        self.id = next(core._ids)
        self.request_id = clean_request_id(request_id)
        self.requested_model = model
        self.model = core.model_label(model)
        self.principal = ANONYMOUS
        self.bytes_sent = 0
        self.stages: dict[str, float] = {}
        self._bearer_token = bearer_token
        self._opened = False
        self._ran = False
        self._send_deadline = SendDeadline(core.settings.send_timeout_s)
        self._send_timed_out = False

    def __repr__(self) -> str:  # never the bearer token
        return f"RemoteScope({self.frontend!r}, request_id={self.request_id!r}, model={self.model!r})"

    async def __aenter__(self) -> RemoteScope:
        open_message = {
            "t": "open",
            "id": self.id,
            "frontend": self.frontend,
            "request_id": self.request_id or None,
            "token": self._bearer_token,
            "model": self.requested_model,
        }
        self._bearer_token = None
        try:
            reply = await self.core._call(open_message)
        except asyncio.CancelledError:
            self._done("CANCELLED", "the client went away")  # the model process may have opened it
            raise
        self.request_id = str(reply["request_id"])
        self._opened = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, ServiceError):
            self._done(exc.code, str(exc))
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit, ClientGone)):
            self._done("CANCELLED", "the client went away")
        elif exc is not None:
            self._done("INTERNAL", f"{type(exc).__name__}: {exc}")
        else:
            self._done("OK", None)

    def _done(self, status: str, error: str | None) -> None:
        self.core._send(
            {
                "t": "done",
                "id": self.id,
                "status": status,
                "error": error,
                "bytes_sent": self.bytes_sent,
                "stages": self.stages,
                "send_timeout": self._send_timed_out,
            }
        )

    async def _run(self, header: dict[str, Any], attachments: Sequence[bytes]) -> dict[str, Any]:
        if self._ran:
            raise RuntimeError("one request scope runs once")
        self._ran = True
        return await self.core._call({**header, "id": self.id}, attachments)

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
        header = {
            "t": "encode",
            "prompts": list(prompts),
            "expected_fingerprint": expected_fingerprint,
            "timeout": timeout,
            "bypass_cache": bypass_cache,
            "field": field,
            "upsample": None if upsample is None else _spec_message(upsample),
        }
        reply = await self._run(header, list(upsample.images) if upsample is not None else ())
        self.stages["queue"], self.stages["encode"] = float(reply["queue_s"]), float(reply["encode_s"])
        dtype = getattr(torch, str(reply["dtype"]))
        embeds = self.core.ring.tensor(int(reply["offset"]), dtype, tuple(reply["shape"]))
        hosted = self.core.model(str(reply["model"]))
        upsampled = reply.get("upsampled")
        return EncodeResult(
            embeds=embeds,
            cache_hit=[bool(hit) for hit in reply["cache_hit"]],
            queue_seconds=float(reply["queue_s"]),
            encode_seconds=float(reply["encode_s"]),
            model=hosted.name,
            fingerprint=hosted.fingerprint,
            upsampled=None if upsampled is None else Upsampled(**upsampled),
        )

    async def upsample(
        self, prompts: Sequence[object], spec: UpsampleSpec, *, timeout: float | None = None, field: str = "prompts"
    ) -> Upsampled:
        header = {"t": "upsample", "prompts": list(prompts), "spec": _spec_message(spec), "timeout": timeout}
        reply = await self._run({**header, "field": field}, list(spec.images))
        return Upsampled(prompts=list(reply["prompts"]), seed=int(reply["seed"]), new_tokens=list(reply["new_tokens"]))

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times a front-end stage ("serialize", "send"); the model process records it when the scope ends."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.monotonic() - started

    async def send(self, write: Awaitable[T]) -> T:
        """As `RequestScope.send`: one write of the answer within the send deadline (the model process counts
        the drop when the scope ends)."""
        try:
            return await self._send_deadline.write(write)
        except SendTimeout:
            self._send_timed_out = True
            raise

    def add_bytes_sent(self, nbytes: int) -> None:
        self.bytes_sent += nbytes


def _spec_message(spec: UpsampleSpec) -> dict[str, Any]:
    """An UpsampleSpec's options (its images travel as the frame's attachments)."""
    return {
        "temperature": spec.temperature,
        "max_new_tokens": spec.max_new_tokens,
        "seed": spec.seed,
        "images_per_prompt": list(spec.images_per_prompt),
    }
