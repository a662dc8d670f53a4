"""The flux2-split wire contract (package ``flux2split.v1``) and the tensor codec both sides share."""

from . import shared
from .v1 import encoder_pb2, encoder_pb2_grpc

API_VERSION = "v1"
SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["TextEncoder"].full_name

__all__ = ["API_VERSION", "SERVICE_NAME", "encoder_pb2", "encoder_pb2_grpc", "shared"]
