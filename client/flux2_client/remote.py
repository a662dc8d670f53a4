"""gRPC client of one encoder server: prompts in, verified prompt embeddings out (an `Encoder`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from flux2split_proto import codec, shared
from flux2split_proto.v1 import encoder_pb2 as pb
from flux2split_proto.v1 import encoder_pb2_grpc as pb_grpc

from .encoder import (
    EncodeResult,
    EncoderInfo,
    FingerprintMismatchError,
    RemoteEncoderError,
    UpsampleOptions,
    UpsampleResult,
    fingerprint_error,
    model_mismatch_message,
    prompt_list,
)

# One FLUX.2-dev embedding is 15.7 MB; refuse announced payloads beyond 64 prompts' worth.
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 512 * 15360 * 2

__all__ = ["DEFAULT_MAX_PAYLOAD_BYTES", "FingerprintMismatchError", "RemoteEncoderError", "RemoteTextEncoder"]


class RemoteTextEncoder:
    """Talks to one encoder server over gRPC.

    Args:
        target: a gRPC target: "host:port", or any scheme gRPC resolves ("dns:///name:port", "unix:path").
        model: the served model to encode with, on a server hosting several (its `info().models`); None:
            the server's default model. Every answer is checked to come from the model named.
        timeout: default deadline in seconds of each call (a call's own `timeout=` overrides it).
        expected_fingerprint: digest of the model the caller expects; the server refuses other models
            with FAILED_PRECONDITION and the client re-checks every response header.
        max_payload_bytes: largest payload the client accepts.
        token: bearer token sent as `authorization: Bearer <token>` metadata on every call but health.
        tls: use TLS (implied by any of the three PEM arguments below; system roots when none given).
        root_certificates: PEM CA bundle that signs the server's certificate.
        client_certificate, client_private_key: PEM chain and key for mutual TLS.
        server_name_override: name to check the server certificate against instead of the target host.
        channel_options: extra gRPC channel arguments, e.g. `[("grpc.use_local_subchannel_pool", 1)]` for a
            connection of this client's own (channels of one process otherwise share one per target, so
            many clients in one process all reach one front-end process of a `--frontends` server).
    """

    def __init__(
        self,
        target: str,
        *,
        model: str | None = None,
        timeout: float = 120.0,
        expected_fingerprint: str | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        client_certificate: bytes | None = None,
        client_private_key: bytes | None = None,
        server_name_override: str | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ):
        self.target = target
        self.model = model or None
        self.timeout = timeout
        self.expected_fingerprint = expected_fingerprint
        self.max_payload_bytes = max_payload_bytes
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        if (client_certificate is None) != (client_private_key is None):
            raise ValueError("client_certificate and client_private_key go together (mutual TLS)")
        if tls or root_certificates or client_certificate:
            credentials = grpc.ssl_channel_credentials(root_certificates, client_private_key, client_certificate)
            options = list(channel_options)
            if server_name_override:
                options.append(("grpc.ssl_target_name_override", server_name_override))
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=list(channel_options))
        self._stub = pb_grpc.TextEncoderStub(self._channel)

    def __repr__(self) -> str:
        return f"RemoteTextEncoder({self.target!r}" + (f", model={self.model!r})" if self.model else ")")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RemoteTextEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self, *, timeout: float | None = None) -> EncoderInfo:
        """The model this client encodes with (its fingerprint, width, limits) and every model the server hosts."""
        request = pb.InfoRequest(model=self.model or "")
        try:
            reply = self._stub.Info(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _as_error(exc) from None
        if self.model and not reply.models:  # the server ignored the name: its only model may be another
            raise FingerprintMismatchError(model_mismatch_message(self.model, ""))
        return EncoderInfo(
            fingerprint=reply.fingerprint,
            embedding_dim=reply.embedding_dim,
            limits=reply.limits,
            server_version=reply.server_version,
            api_version=reply.api_version,
            batching_mode=reply.batching_mode,
            model=self.model or reply.default_model,
            models=tuple(reply.models),
            default_model=reply.default_model,
        )

    def encode(
        self,
        prompts: str | Sequence[str],
        fmt: pb.TensorFormat = pb.TENSOR_FORMAT_RAW,
        *,
        timeout: float | None = None,
        bypass_cache: bool = False,
        request_id: str = "",
        upsample: UpsampleOptions | None = None,
    ) -> EncodeResult:
        """Embeddings (B, L, D) for `prompts`, checked against the header's length and sha256. With
        `upsample`, the server rewrites the prompts first (prompt upsampling) and encodes the rewritten
        ones, which the result names (`upsampled_prompts`)."""
        prompts = prompt_list(prompts)
        request = pb.EncodeRequest(
            prompts=prompts,
            format=fmt,
            expected_fingerprint=self.expected_fingerprint or "",
            bypass_cache=bypass_cache,
            request_id=request_id,
            model=self.model or "",
        )
        if upsample is not None:
            request.upsample.CopyFrom(upsample.message())
        try:
            stream = self._stub.Encode(request, timeout=self._timeout(timeout), metadata=self._metadata)
            header, tensor = codec.assemble(stream, max_bytes=self.max_payload_bytes)
        except grpc.RpcError as exc:
            raise _as_error(exc) from None
        if self.model and header.model != self.model:
            raise FingerprintMismatchError(model_mismatch_message(self.model, header.model))
        fp = header.fingerprint
        if self.expected_fingerprint and fp.digest != self.expected_fingerprint:
            raise FingerprintMismatchError(
                shared.fingerprint_mismatch_message(self.expected_fingerprint, fp.digest, fp.weights_id)
            )
        if tensor.shape[0] != len(prompts):
            raise codec.WireError(f"server returned {tensor.shape[0]} rows for {len(prompts)} prompts")
        hits = list(header.cache_hit)[: len(prompts)]
        hits += [False] * (len(prompts) - len(hits))
        upsampled = None
        if upsample is not None:
            upsampled = tuple(header.upsampled_prompts)
            if len(upsampled) != len(prompts):
                raise codec.WireError(f"server returned {len(upsampled)} upsampled prompts for {len(prompts)}")
        return EncodeResult(
            prompt_embeds=tensor,
            cache_hit=tuple(hits),
            fingerprint=fp,
            sha256=header.sha256,
            served_by=self.target,
            header=header,
            upsampled_prompts=upsampled,
            upsample_seed=header.upsample_seed if upsample is not None else None,
        )

    def upsample(
        self,
        prompts: str | Sequence[str],
        options: UpsampleOptions = UpsampleOptions(),  # noqa: B008 (frozen dataclass)
        *,
        timeout: float | None = None,
        request_id: str = "",
    ) -> UpsampleResult:
        """`prompts` rewritten by the server's prompt upsampling (diffusers' `Flux2Pipeline.upsample_prompt`)."""
        prompts = prompt_list(prompts)
        o = options.message()
        request = pb.UpsampleRequest(
            prompts=prompts,
            images=o.images,
            max_new_tokens=o.max_new_tokens,
            request_id=request_id,
            model=self.model or "",
            images_per_prompt=o.images_per_prompt,
        )
        if o.HasField("temperature"):
            request.temperature = o.temperature
        if o.HasField("seed"):
            request.seed = o.seed
        try:
            reply = self._stub.Upsample(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _as_error(exc) from None
        if len(reply.prompts) != len(prompts):
            raise codec.WireError(f"server returned {len(reply.prompts)} prompts for {len(prompts)}")
        return UpsampleResult(
            prompts=tuple(reply.prompts),
            seed=reply.seed,
            new_tokens=tuple(reply.new_tokens),
            fingerprint=reply.fingerprint,
            served_by=self.target,
        )

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout


def _as_error(exc: grpc.RpcError) -> RemoteEncoderError:
    if not isinstance(exc, grpc.Call):
        return RemoteEncoderError(grpc.StatusCode.UNKNOWN, str(exc))
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return fingerprint_error(details)
    return RemoteEncoderError(code, details, retry_after=shared.retry_delay_from_call(exc))
