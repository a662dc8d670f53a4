"""Client for a flux2-split encoder server: prompts in, verified prompt embeddings out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from flux2split_proto import codec
from flux2split_proto.v1 import encoder_pb2 as pb
from flux2split_proto.v1 import encoder_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    import torch

# One FLUX.2-dev embedding is 15.7 MB; refuse announced payloads beyond 64 prompts' worth.
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 512 * 15360 * 2


class RemoteEncoderError(RuntimeError):
    """The server refused or failed the request; `code` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class FingerprintMismatchError(RemoteEncoderError):
    """The server serves a different model than the one this client was pinned to."""

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.FAILED_PRECONDITION, message)


@dataclass(frozen=True)
class EncodedPrompts:
    prompt_embeds: torch.Tensor
    header: pb.TensorHeader

    @property
    def fingerprint(self) -> pb.ModelFingerprint:
        return self.header.fingerprint


class RemoteTextEncoder:
    """Talks to one encoder server.

    Args:
        target: "host:port" of the server.
        timeout: deadline in seconds for each call.
        expected_fingerprint: digest of the model the caller expects; the server refuses other models
            with FAILED_PRECONDITION and the client re-checks every response header.
        max_payload_bytes: largest payload the client accepts.
        token: bearer token sent as `authorization: Bearer <token>` metadata on every call but health.
        tls: use TLS (implied by any of the three PEM arguments below; system roots when none given).
        root_certificates: PEM CA bundle that signs the server's certificate.
        client_certificate, client_private_key: PEM chain and key for mutual TLS.
        server_name_override: name to check the server certificate against instead of the target host.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 120.0,
        expected_fingerprint: str | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        client_certificate: bytes | None = None,
        client_private_key: bytes | None = None,
        server_name_override: str | None = None,
    ):
        self.target = target
        self.timeout = timeout
        self.expected_fingerprint = expected_fingerprint
        self.max_payload_bytes = max_payload_bytes
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        if (client_certificate is None) != (client_private_key is None):
            raise ValueError("client_certificate and client_private_key go together (mutual TLS)")
        if tls or root_certificates or client_certificate:
            credentials = grpc.ssl_channel_credentials(root_certificates, client_private_key, client_certificate)
            options = [("grpc.ssl_target_name_override", server_name_override)] if server_name_override else []
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.TextEncoderStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RemoteTextEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> pb.InfoResponse:
        try:
            return self._stub.Info(pb.InfoRequest(), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _as_error(exc) from None

    def encode(
        self,
        prompts: str | Sequence[str],
        fmt: pb.TensorFormat = pb.TENSOR_FORMAT_RAW,
        *,
        bypass_cache: bool = False,
        request_id: str = "",
    ) -> EncodedPrompts:
        """Embeddings (B, L, D) for `prompts`, checked against the header's length and sha256."""
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        request = pb.EncodeRequest(
            prompts=prompt_list,
            format=fmt,
            expected_fingerprint=self.expected_fingerprint or "",
            bypass_cache=bypass_cache,
            request_id=request_id,
        )
        try:
            header, tensor = codec.assemble(
                self._stub.Encode(request, timeout=self.timeout, metadata=self._metadata),
                max_bytes=self.max_payload_bytes,
            )
        except grpc.RpcError as exc:
            raise _as_error(exc) from None
        if self.expected_fingerprint and header.fingerprint.digest != self.expected_fingerprint:
            raise FingerprintMismatchError(
                f"server answered with model digest {header.fingerprint.digest[:16]}…, "
                f"expected {self.expected_fingerprint[:16]}…"
            )
        if tensor.shape[0] != len(prompt_list):
            raise codec.WireError(f"server returned {tensor.shape[0]} rows for {len(prompt_list)} prompts")
        return EncodedPrompts(tensor, header)


def _as_error(exc: grpc.RpcError) -> RemoteEncoderError:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FingerprintMismatchError(details or "")
    return RemoteEncoderError(code, details or "")
