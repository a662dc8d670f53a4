"""Typed service errors, free of any transport.

Each error carries a transport-neutral `code` (the name of its status, spelled like gRPC's, which the
access log and the metrics use) and, for errors a client should retry, a suggested delay. Each front-end
maps the classes to its own statuses in one table: `grpc_service.GRPC_STATUS` and `http_app.HTTP_STATUS`
(the text-embeddings-inference way). Anything else that escapes a handler is a bug and surfaces as
INTERNAL / 500.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

_Status = TypeVar("_Status")

#: Suggested delay (seconds) before retrying a busy or not-yet-ready server.
DEFAULT_RETRY_AFTER_S = 1.0


class ServiceError(Exception):
    """An error a client can act on. The message names the field or limit involved."""

    code: str = "INTERNAL"
    #: Seconds a client should wait before retrying; None: retrying the same request will not help.
    default_retry_after_s: float | None = None

    def __init__(self, message: str, *, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = self.default_retry_after_s if retry_after_s is None else retry_after_s


class InvalidArgument(ServiceError):
    code = "INVALID_ARGUMENT"


class RequestTooLarge(InvalidArgument):
    """An HTTP request body over the configured limit (gRPC enforces its own message limit)."""


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


class ModelNotFound(ServiceError):
    """The request named a model this server does not host; the message names the ones it does."""

    code = "NOT_FOUND"


class FailedPrecondition(ServiceError):
    """The request asked for a model fingerprint this server does not serve."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    """A server-wide limit (queue, in-flight bytes) is full: retry later, preferably elsewhere."""

    code = "RESOURCE_EXHAUSTED"
    default_retry_after_s = DEFAULT_RETRY_AFTER_S


class RateLimited(ResourceExhausted):
    """A per-token rate or concurrency limit was hit; `limit` names the setting."""

    def __init__(self, message: str, limit: str, *, retry_after_s: float | None = None):
        super().__init__(message, retry_after_s=retry_after_s)
        self.limit = limit


class DeadlineExceeded(ServiceError):
    code = "DEADLINE_EXCEEDED"


class SendTimeout(DeadlineExceeded):
    """The answer was not read within `send_timeout_s`: the client stopped reading (or reads too slowly)."""


class BodyTimeout(DeadlineExceeded):
    """HTTP only: the request body did not arrive within `http_read_timeout_s` (a slow or stalled upload)."""


class Unavailable(ServiceError):
    """The server is loading its model or draining for shutdown."""

    code = "UNAVAILABLE"
    default_retry_after_s = DEFAULT_RETRY_AFTER_S


class EncodeFailed(ServiceError):
    """The model raised while running the batch this request was in; other batches are unaffected."""

    code = "INTERNAL"


class ClientGone(Exception):
    """The caller disconnected before its answer was ready. Not a ServiceError: there is nobody to send a
    status to; the request is counted as CANCELLED, like a cancelled gRPC call."""


def service_errors() -> list[type[ServiceError]]:
    """Every ServiceError subclass (for the front-ends' mapping tables and their completeness tests)."""
    found: list[type[ServiceError]] = []
    pending: list[type[ServiceError]] = [ServiceError]
    while pending:
        for sub in pending.pop().__subclasses__():
            found.append(sub)
            pending.append(sub)
    return found


def status_for(exc: ServiceError, table: Mapping[type[ServiceError], _Status]) -> _Status:
    """The most specific entry of a front-end's mapping table for `exc` (its own class, else the nearest
    base; every table maps ServiceError itself)."""
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    raise KeyError(type(exc).__name__)
