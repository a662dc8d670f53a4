"""The gRPC front-end: the TextEncoder service over the core, plus health, reflection and the auth guard.

Status codes are chosen here, in `GRPC_STATUS` (the core raises transport-free ServiceErrors). Errors a
client should retry carry a `google.rpc.RetryInfo` detail with the suggested delay, next to the message.

Auth: TextEncoder reads the `authorization` metadata itself (through EncoderCore, like every front-end)
so failures are counted and logged per request. Every other service except grpc.health.v1.Health
(reflection, anything added later) is guarded by `BearerAuthInterceptor`, which turns only an auth
failure into UNAUTHENTICATED and leaves every other outcome to the handler.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from flux2split_proto import API_VERSION, SERVICE_NAME, codec, shared
from flux2split_proto.v1 import encoder_pb2 as pb
from google.protobuf.message import DecodeError

from . import __version__
from .core import EncoderCore, HostedModel
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
from .upsample import UpsampleLimits, UpsampleSpec

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
_BATCHING_MODES = {"dynamic": pb.BATCHING_MODE_DYNAMIC, "reproducible": pb.BATCHING_MODE_REPRODUCIBLE}

#: The gRPC status of each service error: the one place this front-end chooses codes.
GRPC_STATUS: dict[type[ServiceError], grpc.StatusCode] = {
    ServiceError: grpc.StatusCode.INTERNAL,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    RequestTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    SendTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    BodyTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,  # HTTP only
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    EncodeFailed: grpc.StatusCode.INTERNAL,
}


async def abort(context: grpc.aio.ServicerContext, exc: ServiceError) -> None:
    """End the call with `exc`'s status; a retryable one carries google.rpc.RetryInfo with its delay."""
    code = status_for(exc, GRPC_STATUS)
    if exc.retry_after_s is not None:
        await context.abort_with_status(shared.retry_status(code, str(exc), exc.retry_after_s))
    await context.abort(code, str(exc))


class _Malformed:
    """Stands in for a request the protobuf runtime refused to parse (e.g. invalid UTF-8 in a string)."""

    def __init__(self, message_type: str, reason: str):
        self.message_type = message_type
        self.reason = reason


def _lenient(message_cls: Any) -> Callable[[bytes], Any]:
    # grpc answers a deserializer exception with INTERNAL; a malformed request is the client's error,
    # so parse failures become a marker the handler turns into INVALID_ARGUMENT.
    def deserialize(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except DecodeError as exc:
            return _Malformed(message_cls.DESCRIPTOR.name, str(exc))

    return deserialize


def _parsed(request: Any) -> Any:
    if isinstance(request, _Malformed):
        raise InvalidArgument(f"request is not a valid {request.message_type}: {request.reason}")
    return request


def _metadata_token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return bearer_token(value if isinstance(value, str) else value.decode("latin-1"))
    return None


async def _write(context: grpc.aio.ServicerContext, message: pb.EncodeResponse | bytes) -> None:
    """`context.write`, with a write that failed as ClientGone: the messages are ours (already valid), so a
    failed write means the stream is gone (client cancelled or disconnected). grpc raises its private
    ExecuteBatchError then, before `context.cancelled()` turns True, hence the broad except."""
    try:
        await context.write(message)
    except Exception as exc:
        log.debug("write failed, the stream is gone: %s", type(exc).__name__)
        raise ClientGone from None


class TextEncoderService:
    def __init__(self, core: EncoderCore):
        self.core = core

    async def Encode(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        # Written with context.write, not yielded: each write is awaited inside the request scope, so the
        # admission (in-flight bytes, per-token slot) is held until the last message is written, and a
        # write the client never reads (HTTP/2 flow control blocks it) is cut off by the send deadline.
        request_id, model = ("", "") if isinstance(request, _Malformed) else (request.request_id, request.model)
        token = _metadata_token(context)
        try:
            async with self.core.request("grpc", request_id=request_id, bearer_token=token, model=model) as req:
                request = _parsed(request)
                if request.format not in pb.TensorFormat.values():
                    raise InvalidArgument(
                        f"format: unknown TensorFormat value {request.format} "
                        f"(known: {', '.join(pb.TensorFormat.keys())})"
                    )
                result = await req.encode(
                    list(request.prompts),
                    expected_fingerprint=request.expected_fingerprint,
                    timeout=context.time_remaining(),
                    bypass_cache=request.bypass_cache,
                    upsample=_upsample_spec(request.upsample) if request.HasField("upsample") else None,
                )
                with req.stage("serialize"):
                    # Hashing and copying 15.7 MB per prompt must not stall the event loop.
                    payload = await asyncio.to_thread(codec.serialize, result.embeds, request.format)
                fingerprint = result.fingerprint
                assert fingerprint is not None
                header = payload.header(
                    fingerprint=fingerprint_message(fingerprint),
                    cache_hit=result.cache_hit,
                    request_id=req.request_id,
                    batching_mode=_BATCHING_MODES[fingerprint.batching_mode],
                    model=result.model,
                )
                if result.upsampled is not None:
                    header.upsampled_prompts.extend(result.upsampled.prompts)
                    header.upsample_seed = result.upsampled.seed
                with req.stage("send"):
                    await req.send(_write(context, pb.EncodeResponse(header=header)))
                    # Chunks go out as ready wire bytes (one copy of the payload each, see
                    # codec.chunk_response_bytes): this loop shares the GIL with the model thread.
                    data, step = payload.data, self.core.settings.chunk_bytes
                    for offset in range(0, len(data), step):
                        end = min(offset + step, len(data))
                        await req.send(_write(context, codec.chunk_response_bytes(data, offset, end)))
                        req.add_bytes_sent(end - offset)
        except ServiceError as exc:
            await abort(context, exc)
        except ClientGone:
            pass  # counted CANCELLED by the scope; there is nobody to send a status to

    async def Upsample(self, request: Any, context: grpc.aio.ServicerContext) -> pb.UpsampleResponse:
        request_id, model = ("", "") if isinstance(request, _Malformed) else (request.request_id, request.model)
        token = _metadata_token(context)
        try:
            async with self.core.request("grpc", request_id=request_id, bearer_token=token, model=model) as req:
                request = _parsed(request)
                upsampled = await req.upsample(
                    list(request.prompts), _upsample_spec(request), timeout=context.time_remaining()
                )
                fingerprint = self.core.model(model).fingerprint
                assert fingerprint is not None
                return pb.UpsampleResponse(
                    prompts=upsampled.prompts,
                    request_id=req.request_id,
                    seed=upsampled.seed,
                    fingerprint=fingerprint_message(fingerprint),
                    new_tokens=upsampled.new_tokens,
                )
        except ServiceError as exc:
            await abort(context, exc)
        raise AssertionError("unreachable: abort raises")

    async def Info(self, request: Any, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        """The model `request.model` names (default: the default model) in the single-model fields, and
        every loaded model in `models`."""
        try:
            self.core.authenticate(_metadata_token(context))  # before parsing: one rule for every rpc
            hosted = self.core.model(_parsed(request).model)
            if hosted.fingerprint is None:
                raise Unavailable("the model is still loading; retry shortly")
        except ServiceError as exc:
            await abort(context, exc)
        described = self._served_model(hosted)
        return pb.InfoResponse(
            fingerprint=described.fingerprint,
            embedding_dim=described.embedding_dim,
            limits=described.limits,
            server_version=__version__,
            api_version=API_VERSION,
            batching_mode=described.batching_mode,
            upsampling=described.upsampling if described.HasField("upsampling") else None,
            models=[self._served_model(h) for h in self.core.models.values() if h.fingerprint is not None],
            default_model=self.core.default_model,
        )

    def _served_model(self, hosted: HostedModel) -> pb.ServedModel:
        s = self.core.settings
        assert hosted.fingerprint is not None
        return pb.ServedModel(
            name=hosted.name,
            fingerprint=fingerprint_message(hosted.fingerprint),
            embedding_dim=hosted.embedding_dim,
            limits=pb.ServerLimits(
                max_prompts_per_request=s.max_prompts_per_request,
                max_prompt_chars=s.max_prompt_chars,
                chunk_bytes=s.chunk_bytes,
                max_queued_requests=hosted.max_queued_requests,
                max_inflight_bytes=s.max_inflight_bytes,
                max_batch_prompts=hosted.max_batch_prompts,
            ),
            batching_mode=_BATCHING_MODES[hosted.fingerprint.batching_mode],
            is_default=hosted.is_default,
            upsampling=_upsample_limits(hosted.upsample_limits),
        )


def _upsample_spec(message: Any) -> UpsampleSpec:
    """An UpsampleRequest's or UpsampleOptions' options (the same field names) as the core takes them."""
    return UpsampleSpec(
        temperature=message.temperature if message.HasField("temperature") else None,
        max_new_tokens=message.max_new_tokens,
        seed=message.seed if message.HasField("seed") else None,
        images=list(message.images),
        images_per_prompt=list(message.images_per_prompt),
    )


def _upsample_limits(limits: UpsampleLimits | None) -> pb.UpsampleLimits | None:
    if limits is None:
        return None
    return pb.UpsampleLimits(
        max_images=limits.max_images,
        max_image_bytes=limits.max_image_bytes,
        max_image_pixels=limits.max_image_pixels,
        max_temperature=limits.max_temperature,
        max_new_tokens=limits.max_new_tokens,
        max_prompts=limits.max_prompts,
        images=limits.images,
    )


def _serialize_encode_response(message: pb.EncodeResponse | bytes) -> bytes:
    # The servicer yields chunk messages already serialized; only the header is a message object.
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_text_encoder_service(service: Any, server: grpc.aio.Server) -> None:
    """Registers the service with request parsing that answers INVALID_ARGUMENT to malformed bytes."""
    handlers = {
        "Encode": grpc.unary_stream_rpc_method_handler(
            service.Encode,
            request_deserializer=_lenient(pb.EncodeRequest),
            response_serializer=_serialize_encode_response,
        ),
        "Info": grpc.unary_unary_rpc_method_handler(
            service.Info,
            request_deserializer=_lenient(pb.InfoRequest),
            response_serializer=pb.InfoResponse.SerializeToString,
        ),
        "Upsample": grpc.unary_unary_rpc_method_handler(
            service.Upsample,
            request_deserializer=_lenient(pb.UpsampleRequest),
            response_serializer=pb.UpsampleResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def add_health_service(servicer: Any, server: grpc.aio.Server) -> None:
    """Registers grpc.health.v1.Health (an aio `HealthServicer`) so that malformed request bytes answer
    INVALID_ARGUMENT instead of an UNKNOWN with a traceback per call."""
    from grpc_health.v1 import health_pb2

    async def check(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _parsed(request)
        except ServiceError as exc:
            await abort(context, exc)
        return await servicer.Check(request, context)

    async def watch(request: Any, context: grpc.aio.ServicerContext) -> None:
        try:
            _parsed(request)
        except ServiceError as exc:
            await abort(context, exc)
        await servicer.Watch(request, context)  # writes with context.write

    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            check,
            request_deserializer=_lenient(health_pb2.HealthCheckRequest),
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            watch,
            request_deserializer=_lenient(health_pb2.HealthCheckRequest),
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(HEALTH_SERVICE, handlers),))


def add_reflection_service(service_names: tuple[str, ...], server: grpc.aio.Server) -> None:
    """Registers grpc.reflection.v1alpha (as `reflection.enable_server_reflection` does) with request parsing
    that ends the stream with INVALID_ARGUMENT at the first malformed request."""
    from grpc_reflection.v1alpha import reflection, reflection_pb2

    servicer = reflection.aio.ReflectionServicer(service_names)

    async def info(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        malformed: list[_Malformed] = []

        async def parsed() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, _Malformed):
                    malformed.append(request)
                    return
                yield request

        async for response in servicer.ServerReflectionInfo(parsed(), context):
            yield response
        if malformed:
            await abort(
                context, InvalidArgument(f"request is not a valid {malformed[0].message_type}: {malformed[0].reason}")
            )

    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            info,
            request_deserializer=_lenient(reflection_pb2.ServerReflectionRequest),
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(reflection.SERVICE_NAME, handlers),))


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires a valid bearer token for every service but health and those that check it themselves."""

    def __init__(self, core: EncoderCore, exempt_services: tuple[str, ...] = (HEALTH_SERVICE, SERVICE_NAME)):
        self.core = core
        self.exempt = exempt_services

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        service = method.lstrip("/").split("/", 1)[0]
        handler = await continuation(handler_call_details)
        if service in self.exempt or handler is None:
            return handler
        token = None
        for key, value in handler_call_details.invocation_metadata or ():  # type: ignore[attr-defined]
            if key == "authorization":
                token = bearer_token(value if isinstance(value, str) else value.decode("latin-1"))
        try:
            self.core.authenticate(token)
        except Unauthenticated as exc:
            return _denied(handler, exc)
        return handler


def _denied(handler: grpc.RpcMethodHandler, exc: Unauthenticated) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await abort(context, exc)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


__all__ = [
    "GRPC_STATUS",
    "BearerAuthInterceptor",
    "TextEncoderService",
    "abort",
    "add_health_service",
    "add_reflection_service",
    "add_text_encoder_service",
]
