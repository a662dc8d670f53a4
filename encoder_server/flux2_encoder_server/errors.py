"""Typed service errors. This is the one place where they are mapped to gRPC codes and HTTP statuses;
anything else that escapes a handler is a bug and surfaces as INTERNAL / 500."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error a client can act on. The message names the field or limit involved."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500


class InvalidArgument(ServiceError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class RequestTooLarge(InvalidArgument):
    """An HTTP request body over the configured limit (gRPC enforces its own message limit)."""

    http_status = 413


class Unauthenticated(ServiceError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class FailedPrecondition(ServiceError):
    """The request asked for a model fingerprint this server does not serve."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409


class ResourceExhausted(ServiceError):
    """A server-wide limit (queue, in-flight bytes) is full: retry later, preferably elsewhere."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 503


class RateLimited(ResourceExhausted):
    """A per-token rate or concurrency limit was hit; `limit` names the setting."""

    http_status = 429

    def __init__(self, message: str, limit: str):
        super().__init__(message)
        self.limit = limit


class DeadlineExceeded(ServiceError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class Unavailable(ServiceError):
    """The server is loading its model or draining for shutdown."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class EncodeFailed(ServiceError):
    """The model raised while running the batch this request was in; other batches are unaffected."""

    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500


class ClientGone(Exception):
    """The caller disconnected before its answer was ready. Not a ServiceError: there is nobody to send a
    status to; the request is counted as CANCELLED, like a cancelled gRPC call."""
