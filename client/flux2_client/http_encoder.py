"""Client of the HTTP `/predict` contract (the hosted endpoint's): JSON prompt(s) and a bearer token in, a
`torch.save` tensor out, loaded with `torch.load(weights_only=True)` only. An `Encoder`, like the gRPC
client: same result, same errors (HTTP statuses mapped to gRPC codes once, here), a per-call deadline.

The response names the model only by its digest (`shared.FINGERPRINT_HEADER`) and its served name
(`shared.MODEL_NAME_HEADER`); the whole fingerprint comes from the server's `GET /info` (`/models/NAME/info`
for a named model), asked once and again only when the digest changes. A server hosting several models
serves each on `/models/NAME/predict`; `model=NAME` (or that URL) picks one.
"""

from __future__ import annotations

import contextlib
import io
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

import grpc
from flux2split_proto import codec, shared
from flux2split_proto.v1 import encoder_pb2 as pb

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
from .remote import DEFAULT_MAX_PAYLOAD_BYTES

if TYPE_CHECKING:
    import httpx

__all__ = ["HttpEncoderError", "HttpTextEncoder", "is_http_target"]

#: The gRPC code of an HTTP status whose body carries none (a proxy's error page, a wrong URL).
_CODE_BY_HTTP_STATUS: Mapping[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.UNIMPLEMENTED,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

_BATCHING_MODE_BY_NAME: Mapping[str, pb.BatchingMode] = {
    "dynamic": pb.BATCHING_MODE_DYNAMIC,
    "reproducible": pb.BATCHING_MODE_REPRODUCIBLE,
}


def is_http_target(target: str) -> bool:
    """True for an `http://` or `https://` URL (the HTTP contract), False for a gRPC target."""
    return target.startswith(("http://", "https://"))


def _predict_url(url: str, model: str | None) -> tuple[str, str | None]:
    """(the predict URL, the model it names) for `url` and `model`: a bare `http(s)://host[:port]` gets
    `/predict`; with a model, `/predict` becomes `/models/MODEL/predict`; a `/models/NAME/predict` URL names
    its model itself."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    segments = path.split("/")
    named = segments[-2] if len(segments) >= 3 and segments[-3] == "models" and segments[-1] == "predict" else None
    if named is not None and model and model != named:
        raise ValueError(f"model: {model!r} given, but the URL {url!r} names model {named!r}")
    if named is None and model:
        if path and not path.endswith("/predict"):
            raise ValueError(f"url: expected a URL ending in /predict to pick model {model!r} from, got {url!r}")
        base = path.removesuffix("/predict")
        path = f"{base}/models/{quote(model, safe='')}/predict"
        named = model
    elif not path:
        path = "/predict"
    return urlunsplit(parts._replace(path=path)), named


class HttpEncoderError(RemoteEncoderError):
    """The HTTP front-end refused or failed the request. `code` is the gRPC code from the JSON error body
    (else the one of the HTTP status), `http_status` the status."""

    def __init__(self, http_status: int, code: grpc.StatusCode, message: str, *, retry_after: float | None = None):
        super().__init__(code, f"HTTP {http_status}: {message}", retry_after=retry_after)
        self.http_status = http_status


class HttpTextEncoder:
    """One server over HTTP: `POST /predict` for embeddings, `GET /info` for the model and limits.

    Args:
        url: the /predict URL (`https://host/predict`); a bare `http(s)://host:port` gets `/predict` added;
            `https://host/models/NAME/predict` is the model NAME of a server hosting several.
        model: the served model to encode with (its `/models/NAME/predict`); None: the server's default (or
            the one the URL names). Every answer is checked to come from the model named.
        timeout: default seconds of each call, the whole response included (a call's `timeout=` overrides).
        expected_fingerprint: model digest the response header must name.
        max_payload_bytes: largest response body accepted.
        token: sent as `Authorization: Bearer <token>`.
        tls: accepted for symmetry with the gRPC client; TLS is the URL's scheme (https).
        root_certificates: PEM CA bundle that signs the server's certificate (default: system roots).
        client_certificate, client_private_key: PEM chain and key for mutual TLS.
        server_name_override: name to check the server certificate against instead of the URL's host.
    """

    def __init__(
        self,
        url: str,
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
    ):
        import httpx

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"url: expected http:// or https://, got {url!r}")
        if parts.scheme == "http" and (tls or root_certificates or client_certificate or server_name_override):
            raise ValueError(f"url: TLS options were given for {url!r}; use https://")
        if (client_certificate is None) != (client_private_key is None):
            raise ValueError("client_certificate and client_private_key go together (mutual TLS)")
        self.url, self.model = _predict_url(url, model or None)
        self.target = url
        self.base_url = self.url.rsplit("/", 1)[0]
        self.timeout = timeout
        self.expected_fingerprint = expected_fingerprint
        self.max_payload_bytes = max_payload_bytes
        self._extensions = {"sni_hostname": server_name_override} if server_name_override else {}
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify = _ssl_context(root_certificates, client_certificate, client_private_key)
        # One pooled client: safe to share between threads (bulk encoding keeps many requests in flight).
        self._client = httpx.Client(timeout=timeout, headers=headers, verify=verify)
        self._lock = threading.Lock()
        self._fingerprint: pb.ModelFingerprint | None = None

    def __repr__(self) -> str:
        return f"HttpTextEncoder({self.url!r})"  # the URL names the model, if any

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpTextEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self, *, timeout: float | None = None) -> EncoderInfo:
        """The server's `GET /info`: fingerprint, embedding_dim, limits."""
        with _transport_errors(self.url):
            response = self._client.get(
                self.base_url + "/info", timeout=self._timeout(timeout), extensions=self._extensions
            )
        if response.status_code != 200:
            raise _http_error(response)
        try:
            data = response.json()
            described = _served_model(data)
            info = EncoderInfo(
                fingerprint=described.fingerprint,
                embedding_dim=described.embedding_dim,
                limits=described.limits,
                server_version=str(data.get("server_version", "")),
                batching_mode=described.batching_mode,
                model=str(data.get("name", "")),
                models=tuple(_served_model(m) for m in data.get("models", ())),
                default_model=str(data.get("default_model", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise codec.WireError(f"{self.base_url}/info: not a flux2-split info response ({exc!r})") from None
        if self.model and info.model != self.model:
            raise FingerprintMismatchError(model_mismatch_message(self.model, info.model))
        with self._lock:
            self._fingerprint = info.fingerprint
        return info

    def upsample(
        self,
        prompts: str | Sequence[str],
        options: UpsampleOptions = UpsampleOptions(),  # noqa: B008 (frozen dataclass)
        *,
        timeout: float | None = None,
    ) -> UpsampleResult:
        """`prompts` rewritten by the server's prompt upsampling (`POST /upsample`)."""
        import base64

        prompts = prompt_list(prompts)
        body: dict[str, object] = {
            "prompt": prompts,
            "images": [base64.b64encode(f).decode("ascii") for f in options.image_files()],
            "images_per_prompt": list(options.images_per_prompt),
            "max_new_tokens": options.max_new_tokens,
        }
        if options.temperature is not None:
            body["temperature"] = options.temperature
        if options.seed is not None:
            body["seed"] = options.seed
        with _transport_errors(self.url):
            response = self._client.post(
                self.base_url + "/upsample", json=body, timeout=self._timeout(timeout), extensions=self._extensions
            )
        if response.status_code != 200:
            raise _http_error(response)
        try:
            data = response.json()
            rewritten = tuple(str(p) for p in data["prompts"])
            seed, new_tokens = int(data["seed"]), tuple(int(n) for n in data.get("new_tokens", ()))
        except (ValueError, KeyError, TypeError) as exc:
            raise codec.WireError(f"{self.base_url}/upsample: not an upsampling response ({exc!r})") from None
        if len(rewritten) != len(prompts):
            raise codec.WireError(f"server returned {len(rewritten)} prompts for {len(prompts)}")
        with self._lock:
            fingerprint = self._fingerprint or pb.ModelFingerprint()
        return UpsampleResult(rewritten, seed, new_tokens, fingerprint, served_by=self.target)

    def encode(
        self, prompts: str | Sequence[str], *, timeout: float | None = None, upsample: UpsampleOptions | None = None
    ) -> EncodeResult:
        """Embeddings for `prompts` (`POST /predict`); with `upsample`, the prompts are first rewritten
        (`POST /upsample`, the HTTP contract has no combined call) and the rewritten ones encoded."""
        import dataclasses

        import torch

        if upsample is not None:
            started = time.monotonic()
            upsampled = self.upsample(prompts, upsample, timeout=timeout)
            left = None if timeout is None else max(0.001, timeout - (time.monotonic() - started))
            encoded = self.encode(list(upsampled.prompts), timeout=left)
            return dataclasses.replace(encoded, upsampled_prompts=upsampled.prompts, upsample_seed=upsampled.seed)
        prompts = prompt_list(prompts)
        seconds = self._timeout(timeout)
        deadline = time.monotonic() + seconds
        with (
            _transport_errors(self.url),
            self._client.stream(
                "POST", self.url, json={"prompt": prompts}, timeout=seconds, extensions=self._extensions
            ) as response,
        ):
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
                if time.monotonic() > deadline:  # httpx's timeout bounds each read, not the whole body
                    raise RemoteEncoderError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{self.url}: over {seconds:g}s")
            digest = response.headers.get(shared.FINGERPRINT_HEADER, "")
            answered = response.headers.get(shared.MODEL_NAME_HEADER, "")
        if self.model and answered != self.model:
            raise FingerprintMismatchError(model_mismatch_message(self.model, answered))
        if self.expected_fingerprint and digest != self.expected_fingerprint:
            raise FingerprintMismatchError(shared.fingerprint_mismatch_message(self.expected_fingerprint, digest))
        # weights_only: the body comes from the network, so only tensors may be rebuilt, never objects.
        try:
            tensor = torch.load(io.BytesIO(bytes(body)), weights_only=True, map_location="cpu")
        except Exception as exc:
            raise codec.WireError(f"{self.url}: the body is not a torch.save tensor ({type(exc).__name__})") from None
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3 or tensor.shape[0] != len(prompts):
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise codec.WireError(f"expected a ({len(prompts)}, L, D) tensor, got {shape}")
        return EncodeResult(
            prompt_embeds=tensor,
            cache_hit=(False,) * len(prompts),  # the HTTP contract does not say
            fingerprint=self._fingerprint_of(digest, max(0.0, deadline - time.monotonic())),
            served_by=self.target,
        )

    def _fingerprint_of(self, digest: str, timeout: float) -> pb.ModelFingerprint:
        """The whole fingerprint of the model named `digest`: from /info, asked when the digest is new.
        A server without /info (the hosted endpoint) gives just the digest."""
        with self._lock:
            known = self._fingerprint
        if known is not None and known.digest == digest:
            return known
        if digest and timeout > 0:
            try:
                fingerprint = self.info(timeout=timeout).fingerprint
            except (RemoteEncoderError, codec.WireError):
                fingerprint = None
            if fingerprint is not None and fingerprint.digest == digest:
                return fingerprint
        return pb.ModelFingerprint(digest=digest)

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout


_LIMIT_FIELDS = frozenset(pb.ServerLimits.DESCRIPTOR.fields_by_name)


def _served_model(data: Mapping[str, object]) -> pb.ServedModel:
    """One model of an /info document (the top level describes one too) as the contract's ServedModel."""
    fp = data["fingerprint"]
    limits = data.get("limits", {})
    if not isinstance(fp, Mapping) or not isinstance(limits, Mapping):
        raise TypeError("fingerprint and limits must be JSON objects")
    return pb.ServedModel(
        name=str(data.get("name", "")),
        fingerprint=shared.fingerprint_from_dict(fp),
        embedding_dim=int(data["embedding_dim"]),  # type: ignore[call-overload]
        limits=pb.ServerLimits(**{k: int(v) for k, v in limits.items() if k in _LIMIT_FIELDS}),
        batching_mode=_BATCHING_MODE_BY_NAME.get(str(fp.get("batching_mode")), pb.BATCHING_MODE_UNSPECIFIED),
        is_default=bool(data.get("is_default", False)),
    )


@contextlib.contextmanager
def _transport_errors(url: str) -> Iterator[None]:
    """httpx's connection and timeout errors as the `RemoteEncoderError` every client raises."""
    import httpx

    try:
        yield
    except httpx.TimeoutException as exc:
        raise RemoteEncoderError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{url}: {exc}") from None
    except httpx.TransportError as exc:
        raise RemoteEncoderError(grpc.StatusCode.UNAVAILABLE, f"{url}: {exc}") from None


def _http_error(response: httpx.Response) -> RemoteEncoderError:
    code = _CODE_BY_HTTP_STATUS.get(response.status_code, grpc.StatusCode.UNKNOWN)
    message = response.text[:500]
    try:
        error = response.json()["error"]
        code = grpc.StatusCode[error["code"]] if error["code"] in grpc.StatusCode.__members__ else code
        message = str(error["message"])
    except (ValueError, KeyError, TypeError):
        pass
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return fingerprint_error(message)
    retry_after = None
    if response.status_code in (429, 503):
        retry_after = shared.retry_delay_from_header(response.headers.get("retry-after"))
    return HttpEncoderError(response.status_code, code, message, retry_after=retry_after)


def _ssl_context(
    root_certificates: bytes | None, client_certificate: bytes | None, client_private_key: bytes | None
) -> ssl.SSLContext | bool:
    """httpx's `verify`: system roots unless a CA bundle is given, plus the client's own pair for mutual TLS."""
    if root_certificates is None and client_certificate is None:
        return True
    context = ssl.create_default_context(cadata=root_certificates.decode() if root_certificates else None)
    if client_certificate is not None and client_private_key is not None:
        # The ssl module loads a key pair only from files: write them privately, load, delete.
        with tempfile.TemporaryDirectory() as folder:
            cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
            cert.write_bytes(client_certificate)
            key.touch(mode=0o600)
            key.write_bytes(client_private_key)
            context.load_cert_chain(cert, key)
    return context
