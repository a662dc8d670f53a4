"""The flux2-split wire contract (package ``flux2split.v1``) and the tensor codec both sides share.

The gRPC stubs (`encoder_pb2_grpc`, which imports grpc) load on first use, so the messages, the codec
and `shared` stay importable where grpc is not (the encoder server's transport-free core).
"""

from __future__ import annotations

from typing import Any

from . import shared
from .v1 import encoder_pb2

API_VERSION = "v1"
SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["TextEncoder"].full_name

__all__ = ["API_VERSION", "SERVICE_NAME", "encoder_pb2", "encoder_pb2_grpc", "shared"]


def __getattr__(name: str) -> Any:
    if name == "encoder_pb2_grpc":
        from .v1 import encoder_pb2_grpc

        return encoder_pb2_grpc
    raise AttributeError(f"module 'flux2split_proto' has no attribute {name!r}")
