"""What an encoder client is: the `Encoder` protocol, the `EncodeResult` and `EncoderInfo` it returns, and
its errors.

Three classes implement it: `RemoteTextEncoder` (one gRPC server), `HttpTextEncoder` (one server over the
HTTP `/predict` contract) and `EncoderPool` (any mix of them, with failover, retries and a client cache).
Training, bulk encoding and generation take an `Encoder`, so any of the three works there.

Errors carry a `grpc.StatusCode` whatever the transport (the HTTP client maps its statuses once, at its
edge), and the delay the server suggested before a retry, when it sent one.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from flux2split_proto.v1 import encoder_pb2 as pb

if TYPE_CHECKING:
    import torch


class RemoteEncoderError(RuntimeError):
    """The server refused or failed the request, or could not be reached.

    `code`: the gRPC status code (HTTP statuses are mapped to one); `retry_after`: seconds the server asked
    the client to wait before retrying (`google.rpc.RetryInfo` on gRPC, `Retry-After` on HTTP), else None.
    """

    def __init__(self, code: grpc.StatusCode, message: str, *, retry_after: float | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after


class FingerprintMismatchError(RemoteEncoderError):
    """The server serves a different model than the one this client was pinned to."""

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.FAILED_PRECONDITION, message)


def model_mismatch_message(asked: str, answered: str) -> str:
    """The one wording of "the answer is not from the model this client named"."""
    if not answered:
        return (
            f"model: asked for {asked!r} but the server's answer names no model: it predates hosting several "
            "models and serves only its own (leave the model unset for it)"
        )
    return f"model: asked for {asked!r} but the server answered with model {answered!r}"


@dataclass(frozen=True)
class EncoderInfo:
    """What a server says about itself (gRPC `Info`, HTTP `GET /info`); fields a server does not report
    keep their protobuf default (0, "", UNSPECIFIED)."""

    fingerprint: pb.ModelFingerprint
    embedding_dim: int
    limits: pb.ServerLimits
    server_version: str = ""
    api_version: str = ""
    batching_mode: pb.BatchingMode = pb.BATCHING_MODE_UNSPECIFIED
    #: The served name of the model the fields above describe ("" from servers that do not name models).
    model: str = ""
    #: Every model the server hosts, the default first (empty from servers that host one unnamed model).
    models: tuple[pb.ServedModel, ...] = ()
    #: The model requests that name none get.
    default_model: str = ""


@dataclass(frozen=True)
class EncodeResult:
    """Embeddings of a list of prompts, and only claims that are true of them.

    prompt_embeds: (B, L, D), rows in prompt order.
    cache_hit: per row, True when the row came from a cache (this client's or the server's) instead of
        the model. An HTTP response does not say, so its rows read False.
    fingerprint: the model the rows were made by (every row: a pool refuses to mix models).
    sha256: the checksum the server sent and the client verified, only when the whole tensor is one gRPC
        response's payload (for the RAW format: sha256 of `prompt_embeds`' bytes); None otherwise.
    served_by: the target that answered; None when every row came from the client cache.
    header: the server's gRPC response header (batching mode, request id, format), under the same rule
        as `sha256`; None otherwise.
    """

    prompt_embeds: torch.Tensor
    cache_hit: tuple[bool, ...]
    fingerprint: pb.ModelFingerprint
    sha256: bytes | None = None
    served_by: str | None = None
    header: pb.TensorHeader | None = None
    #: With `encode(..., upsample=...)`: the rewritten prompts the rows are the embeddings of, and the seed
    #: the upsampling ran with; None otherwise.
    upsampled_prompts: tuple[str, ...] | None = None
    upsample_seed: int | None = None


#: Reference images as `upsample` takes them: encoded files (bytes), paths to them, or PIL images.
ImageInput = Any


@dataclass(frozen=True)
class UpsampleOptions:
    """How a server upsamples prompts (its `Upsample` rpc, `POST /upsample`, `encode(upsample=...)`), as
    diffusers' `Flux2Pipeline.upsample_prompt` does.

    temperature: sampling temperature; 0.15 is diffusers' default, 0 greedy decoding, None the server's
        default (0.15).
    max_new_tokens: most tokens per prompt; 0: the server's default (512, diffusers').
    seed: the sampling seed; None: the server draws one (and reports it).
    images: reference images (image-to-image mode), up to 10.
    images_per_prompt: how `images` split between the prompts (one count per prompt); empty: every prompt
        gets all of them.
    """

    temperature: float | None = 0.15
    max_new_tokens: int = 0
    seed: int | None = None
    images: Sequence[ImageInput] = ()
    images_per_prompt: Sequence[int] = ()

    def image_files(self) -> list[bytes]:
        """`images` as encoded files: bytes as they are, paths read, PIL images written as PNG."""
        return [image_file(image) for image in self.images]

    def message(self) -> pb.UpsampleOptions:
        options = pb.UpsampleOptions(
            max_new_tokens=self.max_new_tokens,
            images=self.image_files(),
            images_per_prompt=list(self.images_per_prompt),
        )
        if self.temperature is not None:
            options.temperature = self.temperature
        if self.seed is not None:
            options.seed = self.seed
        return options


def image_file(image: ImageInput) -> bytes:
    """One reference image as the bytes of an image file."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if hasattr(image, "save"):  # a PIL image: lossless PNG
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"images: expected bytes, a path or a PIL image, got {type(image).__name__}")


@dataclass(frozen=True)
class UpsampleResult:
    """Prompts rewritten by a server's prompt upsampling: in request order, the seed the sampling ran
    with, the tokens generated for each, the model that generated them and the target that answered."""

    prompts: tuple[str, ...]
    seed: int
    new_tokens: tuple[int, ...]
    fingerprint: pb.ModelFingerprint
    served_by: str | None = None


class Encoder(Protocol):
    """Prompts in, embeddings out. `timeout`: seconds this one call may take (None: the client's
    default); a per-call value never changes the client's settings."""

    def info(self, *, timeout: float | None = None) -> EncoderInfo: ...

    def encode(self, prompts: str | Sequence[str], *, timeout: float | None = None) -> EncodeResult: ...

    def close(self) -> None: ...


class UpsamplingEncoder(Encoder, Protocol):
    """An `Encoder` that also asks its server to upsample prompts (`RemoteTextEncoder`, `HttpTextEncoder`,
    `EncoderPool`): `upsample` returns the rewritten prompts; `encode(..., upsample=options)` the
    embeddings of the rewritten prompts, which it names in `EncodeResult.upsampled_prompts`."""

    def upsample(
        self, prompts: str | Sequence[str], options: UpsampleOptions = ..., *, timeout: float | None = None
    ) -> UpsampleResult: ...


def fingerprint_error(message: str) -> RemoteEncoderError:
    """A FAILED_PRECONDITION answer as its error: FingerprintMismatchError when the server says the model is
    not the pinned one (`shared.fingerprint_mismatch_message`), else a plain RemoteEncoderError (e.g. a
    server that does not upsample)."""
    if message.startswith("expected_fingerprint"):
        return FingerprintMismatchError(message)
    return RemoteEncoderError(grpc.StatusCode.FAILED_PRECONDITION, message)


def prompt_list(prompts: str | Sequence[str]) -> list[str]:
    """A prompt or a sequence of prompts, as a list."""
    return [prompts] if isinstance(prompts, str) else list(prompts)
