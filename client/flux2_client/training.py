"""Prompt embeddings for training loops, from an encoder server.

`compute_remote_text_embeddings(prompts, encoder)` returns `(prompt_embeds, text_ids)` the way the
function of that name in diffusers' `examples/dreambooth/train_dreambooth_lora_flux2.py` does: the bf16
embeddings (B, 512, D) of a prompt or a list of prompts, and `Flux2Pipeline._prepare_text_ids` of them,
both on `device`. The encoder is either a `RemoteTextEncoder` (gRPC: verified checksum and fingerprint)
or an `HttpTextEncoder` (the hosted endpoint's HTTP contract, POST /predict), whose responses are loaded
with `torch.load(weights_only=True)` only.

`open_encoder("host:port")` gives the gRPC client, `open_encoder("http://host:port/predict")` the HTTP one.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc
from flux2split_proto import codec

from .remote import DEFAULT_MAX_PAYLOAD_BYTES, FingerprintMismatchError, RemoteEncoderError, RemoteTextEncoder

if TYPE_CHECKING:
    import httpx
    import torch

#: Response header of the HTTP front-end that names the model digest (the torch.save body carries none).
FINGERPRINT_HEADER = "X-Flux2-Fingerprint"


class HttpEncoderError(RemoteEncoderError):
    """The HTTP front-end refused or failed the request. `code` is the gRPC-style code from the JSON error
    body (UNKNOWN for a server that sends none, such as a proxy), `http_status` the status."""

    def __init__(self, http_status: int, code: grpc.StatusCode, message: str):
        super().__init__(code, f"HTTP {http_status}: {message}")
        self.http_status = http_status


@dataclass(frozen=True)
class HttpEncodedPrompts:
    prompt_embeds: torch.Tensor
    fingerprint_digest: str


class HttpTextEncoder:
    """Client of the HTTP contract (`POST /predict`, JSON prompt(s), bearer token, torch.save response).

    Args:
        url: the /predict URL (`https://host/predict`); a bare `http(s)://host:port` gets `/predict` added.
        token: sent as `Authorization: Bearer <token>`.
        timeout: seconds for each request.
        expected_fingerprint: model digest the response header must name.
        max_payload_bytes: largest response body accepted.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 120.0,
        expected_fingerprint: str | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ):
        import httpx

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"url: expected http:// or https://, got {url!r}")
        self.url = url if parts.path not in ("", "/") else url.rstrip("/") + "/predict"
        self.base_url = self.url.rsplit("/", 1)[0]
        self.expected_fingerprint = expected_fingerprint
        self.max_payload_bytes = max_payload_bytes
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # One pooled client: safe to share between threads (bulk encoding keeps many requests in flight).
        self._client = httpx.Client(timeout=timeout, headers=headers)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpTextEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> dict[str, Any]:
        """The server's GET /info: fingerprint, embedding_dim, limits."""
        response = self._client.get(self.base_url + "/info")
        if response.status_code != 200:
            raise _http_error(response)
        return response.json()

    def encode(self, prompts: str | Sequence[str]) -> HttpEncodedPrompts:
        import torch

        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        with self._client.stream("POST", self.url, json={"prompt": prompt_list}) as response:
            if response.status_code != 200:
                response.read()
                raise _http_error(response)
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_payload_bytes:
                raise codec.WireError(
                    f"response of {declared} bytes exceeds max_payload_bytes={self.max_payload_bytes}"
                )
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > self.max_payload_bytes:
                    raise codec.WireError(f"response exceeds max_payload_bytes={self.max_payload_bytes}")
            digest = response.headers.get(FINGERPRINT_HEADER, "")
        if self.expected_fingerprint and digest != self.expected_fingerprint:
            raise FingerprintMismatchError(
                f"server answered with model digest {digest[:16] or '(none)'}…, "
                f"expected {self.expected_fingerprint[:16]}…"
            )
        # weights_only: the body comes from the network, so only tensors may be rebuilt, never objects.
        tensor = torch.load(io.BytesIO(bytes(body)), weights_only=True, map_location="cpu")
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3 or tensor.shape[0] != len(prompt_list):
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise codec.WireError(f"expected a ({len(prompt_list)}, L, D) tensor, got {shape}")
        return HttpEncodedPrompts(tensor, digest)


def _http_error(response: httpx.Response) -> HttpEncoderError:
    code, message = grpc.StatusCode.UNKNOWN, response.text[:500]
    try:
        error = response.json()["error"]
        code = grpc.StatusCode[error["code"]] if error["code"] in grpc.StatusCode.__members__ else code
        message = str(error["message"])
    except (ValueError, KeyError, TypeError):
        pass
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FingerprintMismatchError(message)  # type: ignore[return-value]
    return HttpEncoderError(response.status_code, code, message)


Encoder = RemoteTextEncoder | HttpTextEncoder


def open_encoder(
    target: str, *, token: str | None = None, timeout: float = 120.0, expected_fingerprint: str | None = None
) -> Encoder:
    """`http(s)://…` -> HttpTextEncoder; `host:port` -> RemoteTextEncoder (gRPC)."""
    if target.startswith(("http://", "https://")):
        return HttpTextEncoder(target, token=token, timeout=timeout, expected_fingerprint=expected_fingerprint)
    return RemoteTextEncoder(target, token=token, timeout=timeout, expected_fingerprint=expected_fingerprint)


def encode_batch(encoder: Encoder, prompts: Sequence[str]) -> tuple[torch.Tensor, str]:
    """(embeddings (B, L, D), model digest) for one request."""
    if isinstance(encoder, HttpTextEncoder):
        http_result = encoder.encode(prompts)
        return http_result.prompt_embeds, http_result.fingerprint_digest
    result = encoder.encode(prompts)
    return result.prompt_embeds, result.fingerprint.digest


@dataclass(frozen=True)
class ModelInfo:
    fingerprint: dict[str, Any]  # family, weights_id, revision, hidden_layers, max_length, dtype, precision, digest
    embedding_dim: int
    max_prompts_per_request: int


def model_info(encoder: Encoder) -> ModelInfo:
    if isinstance(encoder, HttpTextEncoder):
        info = encoder.info()
        return ModelInfo(info["fingerprint"], info["embedding_dim"], info["limits"]["max_prompts_per_request"])
    reply = encoder.info()
    fp = reply.fingerprint
    fingerprint = {
        "family": fp.family,
        "weights_id": fp.weights_id,
        "revision": fp.revision,
        "hidden_layers": list(fp.hidden_layers),
        "max_length": fp.max_length,
        "dtype": codec.dtype_name(fp.dtype),
        "precision": fp.precision,
        "digest": fp.digest,
    }
    return ModelInfo(fingerprint, reply.embedding_dim, reply.limits.max_prompts_per_request)


def text_ids_for(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """FLUX.2's text position ids, which depend only on the embedding shape (diffusers' own function)."""
    from diffusers import Flux2Pipeline

    return Flux2Pipeline._prepare_text_ids(prompt_embeds)


def compute_remote_text_embeddings(
    prompts: str | Sequence[str],
    encoder: Encoder,
    *,
    device: str | torch.device | None = None,
    request_prompts: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(prompt_embeds, text_ids)` for a prompt or a list of prompts, as the diffusers FLUX.2 training
    script's `compute_remote_text_embeddings` returns them. Lists go out `request_prompts` per request
    (the script sends one prompt per request; the server batches either way)."""
    import torch

    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("prompts: at least one prompt is required")
    if request_prompts < 1:
        raise ValueError(f"request_prompts must be at least 1, got {request_prompts}")
    parts = [
        encode_batch(encoder, prompt_list[i : i + request_prompts])[0]
        for i in range(0, len(prompt_list), request_prompts)
    ]
    prompt_embeds = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    text_ids = text_ids_for(prompt_embeds)
    if device is not None:
        prompt_embeds, text_ids = prompt_embeds.to(device), text_ids.to(device)
    return prompt_embeds, text_ids


__all__ = [
    "Encoder",
    "HttpEncoderError",
    "HttpTextEncoder",
    "ModelInfo",
    "compute_remote_text_embeddings",
    "encode_batch",
    "model_info",
    "open_encoder",
    "text_ids_for",
]
