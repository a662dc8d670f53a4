"""Several encoder servers behind one `encode`: requests spread round-robin, a server that fails is
skipped for a cool-down while the others serve, retries back off exponentially (with jitter) inside
an overall deadline, and an optional on-disk cache answers prompts seen before.

This is a layer over `RemoteTextEncoder` (one per server); errors that another server cannot fix
(bad input, wrong model, refused credentials) are raised at once.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from flux2split_proto import codec
from flux2split_proto.v1 import encoder_pb2 as pb

from .cache import EmbeddingCache
from .remote import EncodedPrompts, RemoteEncoderError, RemoteTextEncoder

# Worth another server or a later try: the server is down, overloaded, or timed out, or the payload
# arrived corrupt. CANCELLED too: a call racing a server's final close is cancelled by gRPC itself
# (docs/operations.md: treat it as UNAVAILABLE).
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


@dataclass
class _Endpoint:
    encoder: RemoteTextEncoder
    down_until: float = 0.0
    failures: int = 0
    served: int = 0


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts`: tries per request over all servers; `backoff`..`max_backoff`: seconds slept after a
    full round of failures, doubling; `cooldown`: seconds a failed server is skipped while others are up;
    `deadline`: seconds a whole `encode` may take (None: attempts x timeout)."""

    attempts: int = 6
    backoff: float = 0.1
    max_backoff: float = 2.0
    cooldown: float = 5.0
    deadline: float | None = None


@dataclass
class PoolStats:
    served_by: dict[str, int] = field(default_factory=dict)
    failovers: int = 0
    cache_hits: int = 0


class EncoderPool:
    """Encode prompts on whichever of `targets` answers.

    Args:
        targets: "host:port" of each server (all must serve the same model; responses are checked
            against `expected_fingerprint` when given, else against the first answer's digest).
        timeout: deadline of one attempt, seconds.
        cache: an `EmbeddingCache`; hits skip the network. Needs the model digest before asking, so
            with no `expected_fingerprint` the pool learns it from a server's Info once.
        client_options: passed to every `RemoteTextEncoder` (token, tls, root_certificates,
            client_certificate, client_private_key, server_name_override).
    """

    def __init__(
        self,
        targets: Sequence[str],
        *,
        timeout: float = 120.0,
        expected_fingerprint: str | None = None,
        retry: RetryPolicy | None = None,
        cache: EmbeddingCache | None = None,
        encoder_factory: Callable[..., RemoteTextEncoder] = RemoteTextEncoder,
        **client_options: Any,
    ):
        if not targets:
            raise ValueError("targets: at least one encoder server address is needed")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.cache = cache
        self.expected_fingerprint = expected_fingerprint
        self.stats = PoolStats()
        self._endpoints = [
            _Endpoint(encoder_factory(t, timeout=timeout, expected_fingerprint=expected_fingerprint, **client_options))
            for t in targets
        ]
        self._next = 0
        self._lock = threading.Lock()
        self._digest = expected_fingerprint

    @property
    def targets(self) -> list[str]:
        return [e.encoder.target for e in self._endpoints]

    def close(self) -> None:
        for e in self._endpoints:
            e.encoder.close()

    def __enter__(self) -> EncoderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _order(self) -> list[_Endpoint]:
        """Round-robin start, servers in cool-down last."""
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self._endpoints)
        rotated = self._endpoints[start:] + self._endpoints[:start]
        now = time.monotonic()
        return [e for e in rotated if e.down_until <= now] + [e for e in rotated if e.down_until > now]

    def _call(self, what: Callable[[RemoteTextEncoder], object]) -> object:
        deadline = time.monotonic() + (
            self.retry.deadline if self.retry.deadline is not None else self.retry.attempts * self.timeout
        )
        last: Exception | None = None
        attempt = 0
        round_no = 0
        while attempt < self.retry.attempts:
            for endpoint in self._order():
                remaining = deadline - time.monotonic()
                if attempt >= self.retry.attempts or remaining <= 0:
                    break
                attempt += 1
                endpoint.encoder.timeout = min(self.timeout, remaining)
                try:
                    result = what(endpoint.encoder)
                except RemoteEncoderError as exc:
                    if exc.code not in RETRYABLE:
                        raise
                    last = exc
                except codec.WireError as exc:
                    last = exc
                else:
                    endpoint.failures = 0
                    endpoint.down_until = 0.0
                    endpoint.served += 1
                    target = endpoint.encoder.target
                    self.stats.served_by[target] = self.stats.served_by.get(target, 0) + 1
                    return result
                endpoint.failures += 1
                endpoint.down_until = time.monotonic() + self.retry.cooldown
                self.stats.failovers += 1
            remaining = deadline - time.monotonic()
            if attempt >= self.retry.attempts or remaining <= 0:
                break
            sleep = min(self.retry.max_backoff, self.retry.backoff * 2**round_no) * random.uniform(0.5, 1.0)
            time.sleep(min(sleep, remaining))
            round_no += 1
        if isinstance(last, RemoteEncoderError):
            raise RemoteEncoderError(last.code, f"all {len(self._endpoints)} encoder servers failed: {last.message}")
        raise RemoteEncoderError(
            grpc.StatusCode.UNAVAILABLE, f"all {len(self._endpoints)} encoder servers failed or deadline passed: {last}"
        )

    def info(self) -> pb.InfoResponse:
        return self._call(lambda enc: enc.info())  # type: ignore[return-value]

    def digest(self) -> str:
        """The model digest the pool serves: the expected one, or learned once from a server."""
        if not self._digest:
            self._digest = self.info().fingerprint.digest
        return self._digest

    def encode(self, prompts: str | Sequence[str]) -> EncodedPrompts:
        """Embeddings (B, L, D) for `prompts`, rows in prompt order. Prompts found in the cache are not
        sent; `header.cache_hit[i]` is true when row i came from a cache (this client's or the server's).
        One pool serves one call at a time per thread: the per-attempt deadline is set on the shared
        per-server clients."""
        import torch

        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        rows: list[torch.Tensor | None] = [None] * len(prompt_list)
        fingerprint: pb.ModelFingerprint | None = None
        if self.cache is not None:
            digest = self.digest()
            for i, prompt in enumerate(prompt_list):
                hit = self.cache.get(digest, prompt)
                if hit is not None:
                    rows[i], fingerprint = hit
                    self.stats.cache_hits += 1
        missing = [i for i, row in enumerate(rows) if row is None]
        header = None
        if missing:
            encoded: EncodedPrompts = self._call(lambda enc: enc.encode([prompt_list[i] for i in missing]))  # type: ignore[assignment]
            header = encoded.header
            fingerprint = header.fingerprint
            if self._digest and fingerprint.digest != self._digest:
                raise RemoteEncoderError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"server {fingerprint.weights_id} answered with digest {fingerprint.digest[:16]}…, "
                    f"the pool serves {self._digest[:16]}…",
                )
            self._digest = fingerprint.digest
            for j, i in enumerate(missing):
                row = encoded.prompt_embeds[j : j + 1]
                rows[i] = row
                if self.cache is not None:
                    self.cache.put(fingerprint, prompt_list[i], row)
        tensor = torch.cat([r for r in rows if r is not None], dim=0)
        if header is None:
            header = pb.TensorHeader(shape=list(tensor.shape), fingerprint=fingerprint)
        out = pb.TensorHeader()
        out.CopyFrom(header)
        del out.cache_hit[:]
        server_hits = list(header.cache_hit) if missing else []
        served = {i: (server_hits[j] if j < len(server_hits) else False) for j, i in enumerate(missing)}
        out.cache_hit.extend(served.get(i, True) for i in range(len(prompt_list)))
        del out.shape[:]
        out.shape.extend(tensor.shape)
        return EncodedPrompts(tensor, out)
