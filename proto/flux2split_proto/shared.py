"""Definitions both sides of the wire must agree on, kept in one place: the dtype table, the fingerprint
as a message and as JSON, the HTTP headers that name the model digest and the served model, the
fingerprint-mismatch message, and the retry delay a server suggests (`google.rpc.RetryInfo`, the
google.rpc way: a structured status detail in the `grpc-status-details-bin` trailer, and `Retry-After`
on HTTP).

Only protobuf types here; torch dtypes live in `codec` (imported lazily there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .v1 import encoder_pb2 as pb

#: Response header of the HTTP front-end naming the model digest (the torch.save body carries none).
FINGERPRINT_HEADER = "X-Flux2-Fingerprint"
#: Response header of the HTTP front-end naming the served model that answered (TensorHeader.model on gRPC).
MODEL_NAME_HEADER = "X-Flux2-Model-Name"

#: Wire dtype by its name, and bytes per element, for every dtype the contract can carry.
DTYPE_BY_NAME: Mapping[str, pb.DType] = {
    "bfloat16": pb.DTYPE_BFLOAT16,
    "float16": pb.DTYPE_FLOAT16,
    "float32": pb.DTYPE_FLOAT32,
}
ITEMSIZE: Mapping[pb.DType, int] = {pb.DTYPE_BFLOAT16: 2, pb.DTYPE_FLOAT16: 2, pb.DTYPE_FLOAT32: 4}


def dtype_name(wire: int) -> str:
    """'bfloat16' for DTYPE_BFLOAT16, and so on."""
    return pb.DType.Name(wire).removeprefix("DTYPE_").lower()  # type: ignore[arg-type]


def itemsize(dtype: str | int) -> int:
    """Bytes per element of a dtype given by name ('bfloat16') or wire value."""
    wire = DTYPE_BY_NAME[dtype] if isinstance(dtype, str) else dtype
    return ITEMSIZE[wire]  # type: ignore[index]


_FINGERPRINT_FIELDS = (
    "family",
    "weights_id",
    "revision",
    "hidden_layers",
    "max_length",
    "dtype",
    "precision",
    "digest",
)


def fingerprint_to_dict(fp: pb.ModelFingerprint) -> dict[str, Any]:
    """The fingerprint as the HTTP front-end's JSON spells it (dtype by name)."""
    return {
        "family": fp.family,
        "weights_id": fp.weights_id,
        "revision": fp.revision,
        "hidden_layers": list(fp.hidden_layers),
        "max_length": fp.max_length,
        "dtype": dtype_name(fp.dtype),
        "precision": fp.precision,
        "digest": fp.digest,
    }


def fingerprint_from_dict(data: Mapping[str, Any]) -> pb.ModelFingerprint:
    """Inverse of `fingerprint_to_dict`; unknown keys are ignored, missing ones stay at their default."""
    fields = {k: data[k] for k in _FINGERPRINT_FIELDS if k in data}
    if "dtype" in fields:
        fields["dtype"] = DTYPE_BY_NAME.get(str(fields["dtype"]), pb.DTYPE_UNSPECIFIED)
    return pb.ModelFingerprint(**fields)


def fingerprint_mismatch_message(expected: str, got: str, weights_id: str = "") -> str:
    """The one wording of "this model is not the one you pinned", on the server and the client."""
    served = f"{weights_id} (digest {got[:16] or '(none)'}…)" if weights_id else f"digest {got[:16] or '(none)'}…"
    return f"expected_fingerprint {expected[:16]}… does not match the served model {served}"


# -- retry delay --------------------------------------------------------------------------------------------
#: The trailer key google.rpc.Status travels in (grpcio-status reads and writes it).
STATUS_DETAILS_KEY = "grpc-status-details-bin"


def retry_status(code: Any, message: str, retry_after_s: float | None) -> Any:
    """A `grpc.Status` for `context.abort_with_status` carrying `google.rpc.RetryInfo` when a delay is
    suggested. `code` is a `grpc.StatusCode`."""
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2
    from grpc_status import rpc_status

    del code_pb2  # the numeric value comes from grpc.StatusCode itself
    status = status_pb2.Status(code=code.value[0], message=message)
    if retry_after_s is not None and retry_after_s >= 0:
        seconds = math.floor(retry_after_s)
        delay = duration_pb2.Duration(seconds=seconds, nanos=int((retry_after_s - seconds) * 1e9))
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status.details.append(detail)
    return rpc_status.to_status(status)


def retry_delay_from_call(call: Any) -> float | None:
    """The server's suggested delay (seconds) from a failed call's `google.rpc.RetryInfo`, else None.
    Never raises: a malformed trailer means no suggestion."""
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(call)
    except Exception:
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def retry_delay_from_header(value: str | None) -> float | None:
    """Seconds from an HTTP `Retry-After` header given in seconds (dates are not used by our server)."""
    if not value:
        return None
    try:
        delay = float(value.strip())
    except ValueError:
        return None
    return delay if math.isfinite(delay) and delay >= 0 else None
