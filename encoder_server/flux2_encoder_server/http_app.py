"""The HTTP compatibility front-end: the contract of the paused hosted FLUX.2 text encoder.

    POST /predict   {"prompt": "..."} or {"prompt": ["...", ...]}, header Authorization: Bearer <token>
                    -> 200 application/octet-stream: torch.save() of the bf16 tensor (B, 512, D)
    GET  /health    readiness (also /healthz): 200 while SERVING, 503 while loading or draining
    GET  /info      the model fingerprint and the limits, as JSON
    POST /upsample  {"prompt": "..." or [...], "images": [base64 PNG/JPEG/WebP, ...], "temperature": 0.15,
                    "max_new_tokens": 512, "seed": 0} -> 200 {"prompts": [...], "seed": ..., "new_tokens": [...]}
                    (prompt upsampling, servers started with --upsampling; same token rule as /predict)

A server hosting several models serves each one under its name as well (the default model also on the
routes above, so the hosted endpoint's clients keep working):

    POST /models/{name}/predict   POST /models/{name}/upsample
    GET  /models/{name}/info      GET  /models/{name}/health
    GET  /models                  every hosted model and the default's name

A name the server does not host is 404 with the hosted names in the message. Every route but health
needs the bearer token, as every gRPC rpc but health does.

Scripts written for the hosted endpoint (the FLUX.2 docs snippet, diffusers'
`train_dreambooth_lora_flux2.py --remote_text_encoder`, ComfyUI nodes) work by changing only the URL.

This is a thin layer over `EncoderCore`, the same core and batchers the gRPC service uses: one queue per
model, the same limits and the same authentication. Errors are JSON
`{"error": {"code": "INVALID_ARGUMENT", "message": "..."}}` with the HTTP status chosen here, in
`HTTP_STATUS`; an error a client should retry carries `Retry-After` (whole seconds).

The response body is a pickle because that is what the existing clients `torch.load`; the server only
ever pickles a tensor it built itself and never unpickles anything from the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import inspect
import io
import json
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import h11
import torch
import uvicorn
from flux2split_proto.shared import FINGERPRINT_HEADER, MODEL_NAME_HEADER, fingerprint_to_dict
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import __version__
from .core import EncoderCore, HostedModel, RequestScope
from .errors import (
    BodyTimeout,
    ClientGone,
    DeadlineExceeded,
    EncodeFailed,
    FailedPrecondition,
    InvalidArgument,
    ModelNotFound,
    RateLimited,
    RequestTooLarge,
    ResourceExhausted,
    SendTimeout,
    ServiceError,
    Unauthenticated,
    Unavailable,
    status_for,
)
from .fingerprint import fingerprint_message
from .security import bearer_token
from .upsample import UpsampleSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Response header naming the model's weights (`FINGERPRINT_HEADER`, from the contract, carries its digest).
MODEL_HEADER = "X-Flux2-Model"

#: The HTTP status of each service error: the one place this front-end chooses statuses.
HTTP_STATUS: dict[type[ServiceError], int] = {
    ServiceError: 500,
    InvalidArgument: 400,
    ModelNotFound: 404,
    RequestTooLarge: 413,
    Unauthenticated: 401,
    FailedPrecondition: 409,
    ResourceExhausted: 503,
    RateLimited: 429,
    DeadlineExceeded: 504,
    BodyTimeout: 408,
    SendTimeout: 504,  # headers are out by then: the connection is closed mid-body
    Unavailable: 503,
    EncodeFailed: 500,
}

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def parse_prompts(body: bytes) -> list[object]:
    """The prompt list of a /predict body; the core validates the items and the limits."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidArgument(f"body: not valid JSON ({type(exc).__name__}: {exc})"[:300]) from None
    if not isinstance(document, dict) or "prompt" not in document:
        raise InvalidArgument('body: expected a JSON object {"prompt": "..."} or {"prompt": ["...", ...]}')
    prompt = document["prompt"]
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        return prompt
    kind = "null" if prompt is None else _JSON_TYPES.get(type(prompt), type(prompt).__name__)
    raise InvalidArgument(f"prompt: expected a string or a list of strings, got {kind}")


_UPSAMPLE_KEYS = ("prompt", "images", "images_per_prompt", "temperature", "max_new_tokens", "seed")


def parse_upsample(body: bytes) -> tuple[list[object], UpsampleSpec]:
    """The prompts and options of a /upsample body; the core checks the values against the limits."""
    import base64
    import binascii

    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"body: not valid JSON ({type(exc).__name__}: {exc})"[:300]) from None
    if not isinstance(document, dict) or "prompt" not in document:
        raise InvalidArgument('body: expected a JSON object {"prompt": "..." or ["...", ...], "images": [...], ...}')
    unknown = sorted(set(document) - set(_UPSAMPLE_KEYS))
    if unknown:
        raise InvalidArgument(f"body: unknown key {unknown[0]!r} (known: {', '.join(_UPSAMPLE_KEYS)})")
    prompts = parse_prompts(json.dumps({"prompt": document["prompt"]}).encode())
    images = document.get("images") or []
    if not isinstance(images, list):
        raise InvalidArgument(f"images: expected a list of base64 strings, got {_kind(images)}")
    files = []
    for i, item in enumerate(images):
        if not isinstance(item, str):
            raise InvalidArgument(f"images[{i}]: expected a base64 string, got {_kind(item)}")
        try:
            files.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidArgument(f"images[{i}]: not valid base64") from None
    counts = document.get("images_per_prompt") or []
    if not isinstance(counts, list) or any(isinstance(c, bool) or not isinstance(c, int) for c in counts):
        raise InvalidArgument("images_per_prompt: expected a list of integers, one per prompt")
    temperature = document.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))):
        raise InvalidArgument(f"temperature: expected a number, got {_kind(temperature)}")
    max_new_tokens = document.get("max_new_tokens") or 0
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise InvalidArgument(f"max_new_tokens: expected an integer, got {_kind(max_new_tokens)}")
    seed = document.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidArgument(f"seed: expected an integer, got {_kind(seed)}")
    spec = UpsampleSpec(
        temperature=None if temperature is None else float(temperature),
        max_new_tokens=max_new_tokens,
        seed=seed,
        images=files,
        images_per_prompt=counts,
    )
    return prompts, spec


def _kind(value: object) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes (from the
    Content-Length header before anything is read, otherwise while streaming it in), and with 408 when it
    has not all arrived within `timeout` seconds (a slow-loris upload must not hold a request slot)."""
    try:
        return await asyncio.wait_for(_read_body(request, limit), timeout)
    except TimeoutError:
        raise BodyTimeout(f"body: not received within http_read_timeout_s={timeout:g}") from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"body: {int(declared)} bytes exceed http_max_body_bytes={limit}")
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(f"body: more than http_max_body_bytes={limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # the client went away mid-body: CANCELLED, not an internal error
        raise ClientGone from None
    return b"".join(chunks)


def torch_save_bytes(embeds: torch.Tensor) -> bytes:
    """What the hosted endpoint sent: `torch.save` of the (B, L, D) bf16 CPU tensor."""
    tensor = embeds.detach().to("cpu")
    exact_bytes = tensor.numel() * tensor.element_size()
    if not tensor.is_contiguous() or tensor.storage_offset() or tensor.untyped_storage().nbytes() != exact_bytes:
        tensor = tensor.clone(memory_format=torch.contiguous_format)  # torch.save writes the whole storage
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


async def _wait_for_disconnect(request: Request) -> None:
    # Once the body is read, the next ASGI message on this request can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it when the client disconnects first: a queued request whose caller is gone
    then leaves the batcher before it costs model time, as a cancelled gRPC call does."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientGone
    return task.result()


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def service_error_response(exc: ServiceError, *, close: bool = False) -> JSONResponse:
    status = status_for(exc, HTTP_STATUS)
    headers = {"Connection": "close"} if close else {}
    if isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))  # whole seconds (RFC 9110)
    return error_response(status, exc.code, str(exc), headers)


def create_app(core: EncoderCore, is_serving: Callable[[], bool | Awaitable[bool]]) -> Starlette:
    """The ASGI app over `core`; `is_serving` is the server's readiness (loaded, warmed up, not draining),
    or a coroutine function answering it (a front-end process asks the model process at each probe)."""
    settings = core.settings
    max_body = settings.http_max_body_bytes

    async def predict(request: Request, send: Send, model: str) -> Response | None:
        """Answers through `send` itself (returns None), or returns the error response to send."""
        token = bearer_token(request.headers.get("authorization"))
        request_id = request.headers.get("x-request-id") or None
        try:
            # The scope authenticates, holds the in-flight bytes and the per-token slot, and records
            # metrics and the access-log line, exactly as for gRPC. The answer is sent inside it
            # (`_Answer`), so all of that is held until the last byte is out or the client is gone.
            async with core.request("http", request_id=request_id, bearer_token=token, model=model) as req:
                body = await read_body(request, max_body, settings.http_read_timeout_s)
                result = await _unless_disconnected(request, req.encode(parse_prompts(body), field="prompt"))
                with req.stage("serialize"):
                    # torch.save copies 15.7 MB per prompt: not on the event loop.
                    payload = await asyncio.to_thread(torch_save_bytes, result.embeds)
                headers = {"X-Request-Id": req.request_id, MODEL_NAME_HEADER: result.model}
                if result.fingerprint is not None:
                    headers[FINGERPRINT_HEADER] = result.fingerprint.digest
                    headers[MODEL_HEADER] = result.fingerprint.weights_id
                del result
                answer = _Answer(payload, headers, req, settings.chunk_bytes)
                del payload
                await answer.send(send)
        except SendTimeout as exc:
            log.info("POST /predict cut off: %s", exc)
            await _abort_connection(request)
            return None
        except ServiceError as exc:
            log.info("POST /predict failed: %d %s %s", status_for(exc, HTTP_STATUS), exc.code, exc)
            return service_error_response(exc, close=isinstance(exc, BodyTimeout))
        except ClientGone:
            # Nobody reads this answer; 499 is the conventional "client closed request" in access logs.
            return Response(status_code=499)
        return None

    # An upsampling request carries its reference images in base64 (4 bytes for every 3).
    upsample_body = max_body
    if settings.upsampling:
        images_base64 = settings.upsample_max_images * settings.upsample_max_image_bytes * 4 // 3
        upsample_body = max(max_body, images_base64 + (1 << 20))

    async def upsample(request: Request, _send: Send, model: str) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        request_id = request.headers.get("x-request-id") or None
        try:
            async with core.request("http", request_id=request_id, bearer_token=token, model=model) as req:
                body = await read_body(request, upsample_body, settings.http_read_timeout_s)
                prompts, spec = parse_upsample(body)
                del body
                upsampled = await _unless_disconnected(request, req.upsample(prompts, spec, field="prompt"))
                return JSONResponse(
                    {
                        "prompts": upsampled.prompts,
                        "seed": upsampled.seed,
                        "new_tokens": upsampled.new_tokens,
                        "request_id": req.request_id,
                    },
                    headers={"X-Request-Id": req.request_id, MODEL_NAME_HEADER: core.model(model).name},
                )
        except ServiceError as exc:
            log.info("POST /upsample failed: %d %s %s", status_for(exc, HTTP_STATUS), exc.code, exc)
            return service_error_response(exc, close=isinstance(exc, BodyTimeout))
        except ClientGone:
            return Response(status_code=499)

    unfinished = 0  # /predict and /upsample requests being read, encoded or sent

    def capped(
        handle: Callable[[Request, Send, str], Awaitable[Response | None]],
    ) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        """An ASGI app for `handle` (which answers itself when it returns None) that counts toward
        `http_max_concurrent_requests` from the first byte read to the last byte sent."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            nonlocal unfinished
            model = scope.get("path_params", {}).get("name", "")  # "" on /predict, /upsample: the default
            if unfinished >= settings.http_max_concurrent_requests:
                core.metrics.rejected.labels("http_max_concurrent_requests", core.model_label(model)).inc()
                full = ResourceExhausted(
                    f"http_max_concurrent_requests={settings.http_max_concurrent_requests} requests are unfinished; "
                    "retry shortly, preferably on another replica"
                )
                await service_error_response(full, close=True)(scope, receive, send)
                return
            unfinished += 1
            try:
                response = await handle(Request(scope, receive), send, model)
                if response is not None:
                    await response(scope, receive, send)
            finally:
                unfinished -= 1

        return app

    predict_app = capped(predict)
    upsample_app = capped(upsample)

    async def serving_now() -> bool:
        serving = is_serving()
        return await serving if inspect.isawaitable(serving) else serving

    def serving_json(serving: bool) -> Response:
        if serving:
            return JSONResponse({"status": "SERVING"})
        return JSONResponse({"status": "NOT_SERVING"}, status_code=503, headers={"Retry-After": "1"})

    async def health(request: Request) -> Response:
        return serving_json(await serving_now())

    async def model_health(request: Request) -> Response:
        """Readiness of one model (needs no token, like /health); 404 for a model not hosted."""
        try:
            hosted = core.model(request.path_params["name"])
        except ServiceError as exc:
            return service_error_response(exc)
        return serving_json(await serving_now() and core.model_ready(hosted.name))

    def model_json(hosted: HostedModel) -> dict[str, Any]:
        assert hosted.fingerprint is not None
        s = core.settings
        return {
            "name": hosted.name,
            "is_default": hosted.is_default,
            "fingerprint": {
                **fingerprint_to_dict(fingerprint_message(hosted.fingerprint)),
                "batching_mode": hosted.fingerprint.batching_mode,
            },
            "embedding_dim": hosted.embedding_dim,
            "limits": {
                "max_prompts_per_request": s.max_prompts_per_request,
                "max_prompt_chars": s.max_prompt_chars,
                "max_queued_requests": hosted.max_queued_requests,
                "max_batch_prompts": hosted.max_batch_prompts,
                "http_max_body_bytes": s.http_max_body_bytes,
            },
            **_upsampling_info(hosted),
        }

    def models_json() -> dict[str, Any]:
        loaded = [model_json(h) for h in core.models.values() if h.fingerprint is not None]
        return {"default_model": core.default_model, "models": loaded}

    def authorized(request: Request) -> None:
        # The weights paths, revisions and limits: a token, as for gRPC Info.
        core.authenticate(bearer_token(request.headers.get("authorization")))

    async def info(request: Request) -> Response:
        """One model's fingerprint, width and limits at the top level (the default on /info, the named one
        on /models/{name}/info), every loaded model under "models"."""
        try:
            authorized(request)
            hosted = core.model(request.path_params.get("name", ""))
            if hosted.fingerprint is None:
                raise Unavailable("the model is still loading; retry shortly")
        except ServiceError as exc:
            return service_error_response(exc)
        return JSONResponse({**model_json(hosted), "server_version": __version__, **models_json()})

    async def models(request: Request) -> Response:
        try:
            authorized(request)
        except ServiceError as exc:
            return service_error_response(exc)
        return JSONResponse({**models_json(), "server_version": __version__})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = http.HTTPStatus(exc.status_code).name
        return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    async def internal_error(request: Request, exc: Exception) -> Response:
        # Only reached through a bug: every error a client can cause is a ServiceError above.
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "INTERNAL", "internal server error")

    return Starlette(
        routes=[
            Route("/predict", _AsgiEndpoint(predict_app), methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/healthz", health, methods=["GET"]),
            Route("/info", info, methods=["GET"]),
            Route("/models", models, methods=["GET"]),
            Route("/models/{name}/predict", _AsgiEndpoint(predict_app), methods=["POST"]),
            Route("/models/{name}/info", info, methods=["GET"]),
            Route("/models/{name}/health", model_health, methods=["GET"]),
            Route("/upsample", _AsgiEndpoint(upsample_app), methods=["POST"]),
            Route("/models/{name}/upsample", _AsgiEndpoint(upsample_app), methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )


def _upsampling_info(hosted: HostedModel) -> dict[str, Any]:
    """A model's "upsampling" limits in /info, for a model that upsamples."""
    limits = hosted.upsample_limits
    if limits is None:
        return {}
    return {
        "upsampling": {
            "max_prompts": limits.max_prompts,
            "max_images": limits.max_images,
            "max_image_bytes": limits.max_image_bytes,
            "max_image_pixels": limits.max_image_pixels,
            "max_temperature": limits.max_temperature,
            "max_new_tokens": limits.max_new_tokens,
            "images": limits.images,
        }
    }


class _AsgiEndpoint:
    """Routes to an ASGI callable as it is (Starlette wraps plain functions as request -> response)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


class _Answer:
    """A /predict answer sent in `chunk_bytes` pieces, each write through the request scope's `send` (so
    the scope's admission lasts until the last byte is handed to the transport, and a client that does
    not read is cut off at the send deadline: uvicorn's send waits while the socket's buffer is full)."""

    def __init__(self, payload: bytes, headers: dict[str, str], req: RequestScope, chunk_bytes: int):
        self.payload = payload
        self.headers = headers
        self.req = req
        self.chunk_bytes = chunk_bytes

    async def send(self, send: Send) -> None:
        req, data = self.req, self.payload
        raw_headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(data)).encode())]
        raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        with req.stage("send"):
            await req.send(send({"type": "http.response.start", "status": 200, "headers": raw_headers}))
            for offset in range(0, len(data), self.chunk_bytes):
                end = min(offset + self.chunk_bytes, len(data))
                message = {"type": "http.response.body", "body": data[offset:end], "more_body": end < len(data)}
                await req.send(send(message))
                req.add_bytes_sent(end - offset)


async def _abort_connection(request: Request) -> None:
    """Drop the connection of an answer cut off mid-body. ASGI has no abort: uvicorn's receive is a method
    of its request cycle, which holds the transport; `abort()` frees its unsent buffer at once (a plain
    close would wait for a client that does not read). Elsewhere the server closes the connection when the
    app returns without finishing the response."""
    transport: Any = getattr(getattr(request.receive, "__self__", None), "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        transport.abort()
        await asyncio.sleep(0)  # lets the server see the disconnect before the app returns


class _HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request head. uvicorn waits for request headers for
    as long as a client cares to send them (its keep-alive timeout covers only idle connections between
    answers), so a client sending a byte a second, or nothing at all, would hold a connection forever.
    Here the head must be complete `head_timeout_s` seconds after the connection opens, or after the
    first byte of the next request on a kept-alive connection; otherwise the client gets 408 and the
    connection is closed. The app never sees such a connection (no request has begun), so the body's own
    deadline (`read_body`) starts where this one ends. `HttpFrontEnd` sets the class attributes."""

    head_timeout_s: float = 30.0
    on_head_timeout: Callable[[], None] = staticmethod(lambda: None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._head_deadline: asyncio.TimerHandle | None = None
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request head has begun (or is still awaited) but is not complete
            self._arm_head_deadline()
        else:  # headers complete (the app has the request), or the connection is done or in error
            self._cancel_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is None:  # armed once per request head: each new byte does not extend it
            self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.on_head_timeout()
        message = f"headers: not received within http_read_timeout_s={self.head_timeout_s:g}"
        body = json.dumps({"error": {"code": "DEADLINE_EXCEEDED", "message": message}}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:  # h11 lets a server answer before a request has arrived (for exactly this: 408 and close)
            output = self.conn.send(h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"))
            output = (output or b"") + (self.conn.send(h11.Data(data=body)) or b"")
            self.transport.write(output + (self.conn.send(h11.EndOfMessage()) or b""))
        except h11.LocalProtocolError:  # not in a state to answer: just close
            pass
        self.transport.close()


def head_deadline_protocol(head_timeout_s: float, on_head_timeout: Callable[[], None]) -> type[H11Protocol]:
    """The uvicorn protocol class for one front-end: `_HeadDeadlineProtocol` with its deadline and callback."""
    attributes = {"head_timeout_s": head_timeout_s, "on_head_timeout": staticmethod(on_head_timeout)}
    return type("HeadDeadlineProtocol", (_HeadDeadlineProtocol,), attributes)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside the encoder server's event loop. The encoder server owns SIGTERM/SIGINT (it drains
    gRPC and HTTP together), so uvicorn must not install its own handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # the front-end processes of one server (`--frontends`) share the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class HttpFrontEnd:
    """The ASGI app served by uvicorn on the caller's running loop: `await start()`, `await stop(grace)`."""

    def __init__(
        self,
        app: Starlette,
        host: str,
        port: int,
        *,
        head_timeout_s: float = 30.0,
        on_head_timeout: Callable[[], None] = lambda: None,
        reuse_port: bool = False,
        tls: dict[str, Any] | None = None,
    ):
        self.app = app
        self.reuse_port = reuse_port
        #: uvicorn's ssl_* options (HTTPS with the gRPC port's certificate), None for plain HTTP.
        self.tls = tls or {}
        self.host = host
        self.requested_port = port
        self.protocol = head_deadline_protocol(head_timeout_s, on_head_timeout)
        self.port: int | None = None
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        sock = _bind(self.host, self.requested_port, self.reuse_port)  # bound here so port 0 can be reported at once
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, http=self.protocol, lifespan="off", log_config=None, timeout_graceful_shutdown=None, **self.tls
        )
        server = _EmbeddedUvicorn(config)
        self._server = server
        self._task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:
            if self._task.done():
                self._task.result()  # re-raises a start-up failure
                raise RuntimeError(f"the HTTP server on {self.host}:{self.port} stopped during start-up")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting connections; let running requests finish for up to `grace` seconds."""
        if self._server is None or self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = math.ceil(grace)  # uvicorn takes whole seconds
        self._server.should_exit = True
        await self._task
