"""Several encoder servers behind one `encode`: requests spread round-robin, a server that fails is
skipped for a cool-down while the others serve, retries back off exponentially (with jitter) inside
the call's deadline and never come sooner than the server asked, and an optional on-disk cache answers
prompts seen before.

Targets may mix transports: `http(s)://…` goes to `HttpTextEncoder`, anything else is a gRPC target
(`host:port`, `dns:///name:port`, …) for `RemoteTextEncoder`. Errors that another server cannot fix
(bad input, wrong model, refused credentials) are raised at once.

One pool may be shared by any number of threads: per-call settings travel with the call, and the
pool's own state (round-robin position, server health, statistics) changes only under its lock.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from flux2split_proto import codec, shared
from flux2split_proto.v1 import encoder_pb2 as pb

from .cache import EmbeddingCache
from .encoder import (
    Encoder,
    EncodeResult,
    EncoderInfo,
    FingerprintMismatchError,
    RemoteEncoderError,
    UpsampleOptions,
    UpsampleResult,
    prompt_list,
)

if TYPE_CHECKING:
    import torch

__all__ = ["RETRYABLE", "EncoderPool", "PoolStats", "RetryPolicy", "connect", "using_encoder"]

T = TypeVar("T")

# Worth another server or a later try: the server is down, overloaded, draining or timed out, or the
# payload arrived corrupt. CANCELLED too: a call racing a server's final close is cancelled by gRPC itself
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


def connect(target: str, **options: Any) -> Encoder:
    """The client for one target: `http(s)://…` -> `HttpTextEncoder`, anything else -> `RemoteTextEncoder`.
    `options` are their shared keyword arguments (model, timeout, expected_fingerprint, max_payload_bytes,
    token, tls, root_certificates, client_certificate, client_private_key, server_name_override)."""
    from .http_encoder import HttpTextEncoder, is_http_target

    if is_http_target(target):
        return HttpTextEncoder(target, **options)
    from .remote import RemoteTextEncoder

    return RemoteTextEncoder(target, **options)


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts`: tries per request over all servers; `backoff`..`max_backoff`: seconds slept after a
    full round of failures, doubling; `cooldown`: seconds a failed server is skipped while others are up;
    `deadline`: seconds a whole `encode` may take (None: attempts x timeout). A call's `timeout=`
    replaces `deadline` for that call. A server's suggested delay (RetryInfo, Retry-After) is always
    waited out before that server is asked again; when it reaches past the deadline, the server is not
    asked again in this call."""

    attempts: int = 6
    backoff: float = 0.1
    max_backoff: float = 2.0
    cooldown: float = 5.0
    deadline: float | None = None


@dataclass(frozen=True)
class PoolStats:
    """A snapshot: answers per target, failed attempts, rows the client cache answered."""

    served_by: dict[str, int] = field(default_factory=dict)
    failovers: int = 0
    cache_hits: int = 0


@dataclass
class _Endpoint:
    target: str
    encoder: Encoder
    down_until: float = 0.0  # cool-down after a failure: asked after the healthy ones
    not_before: float = 0.0  # the server asked for no retry before this time
    failures: int = 0


class EncoderPool:
    """Encode prompts on whichever of `targets` answers. An `Encoder` itself.

    Args:
        targets: each server, as `host:port`, another gRPC target (`dns:///name:port`), or an
            `http(s)://…/predict` URL; all must serve the same model (responses are checked against
            `expected_fingerprint` when given, else against the first answer's digest).
        model: the served model to encode with on servers hosting several (`info().models` lists them);
            None: each server's default. `for_model(name)` gives a pool over the same servers for another.
        timeout: deadline of one attempt, seconds.
        retry: attempts, backoff, cool-down and overall deadline (`RetryPolicy`).
        cache: an `EmbeddingCache`; hits skip the network. Needs the model digest before asking, so
            with no `expected_fingerprint` the pool learns it from a server's info once.
        client_options: passed to every client (token, tls, root_certificates, client_certificate,
            client_private_key, server_name_override, max_payload_bytes).
    """

    def __init__(
        self,
        targets: Sequence[str],
        *,
        model: str | None = None,
        timeout: float = 120.0,
        expected_fingerprint: str | None = None,
        retry: RetryPolicy | None = None,
        cache: EmbeddingCache | None = None,
        **client_options: Any,
    ):
        if isinstance(targets, str):
            targets = [targets]
        if not targets:
            raise ValueError("targets: at least one encoder server address is needed")
        self.model = model or None
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.cache = cache
        self.expected_fingerprint = expected_fingerprint
        self._client_options = dict(client_options)
        self._lock = threading.Lock()
        self._endpoints: list[_Endpoint] = []
        try:
            for target in targets:
                encoder = connect(
                    target, model=model, timeout=timeout, expected_fingerprint=expected_fingerprint, **client_options
                )
                self._endpoints.append(_Endpoint(target, encoder))
        except BaseException:
            self.close()
            raise
        self._next = 0
        self._digest = expected_fingerprint or ""
        self._served_by: dict[str, int] = {}
        self._failovers = 0
        self._cache_hits = 0

    def __repr__(self) -> str:
        return f"EncoderPool({self.targets!r}" + (f", model={self.model!r})" if self.model else ")")

    def for_model(self, model: str) -> EncoderPool:
        """A new pool over the same servers, options, retry policy and cache, encoding with the served model
        `model` (this pool is left as it is; close both)."""
        return EncoderPool(
            self.targets,
            model=model,
            timeout=self.timeout,
            expected_fingerprint=self.expected_fingerprint,
            retry=self.retry,
            cache=self.cache,
            **self._client_options,
        )

    @property
    def targets(self) -> list[str]:
        return [e.target for e in self._endpoints]

    @property
    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(dict(self._served_by), self._failovers, self._cache_hits)

    def close(self) -> None:
        for e in self._endpoints:
            e.encoder.close()

    def __enter__(self) -> EncoderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the Encoder protocol ------------------------------------------------------------------------
    def info(self, *, timeout: float | None = None) -> EncoderInfo:
        info, _ = self._call(lambda enc, t: enc.info(timeout=t), timeout)
        return info

    def digest(self, *, timeout: float | None = None) -> str:
        """The model digest the pool serves: the expected one, or learned once from a server."""
        with self._lock:
            digest = self._digest
        if not digest:
            digest = self.info(timeout=timeout).fingerprint.digest
            with self._lock:
                self._digest = self._digest or digest
                digest = self._digest
        return digest

    def upsample(
        self,
        prompts: str | Sequence[str],
        options: UpsampleOptions = UpsampleOptions(),  # noqa: B008 (frozen dataclass)
        *,
        timeout: float | None = None,
    ) -> UpsampleResult:
        """`prompts` rewritten by a server's prompt upsampling, with the pool's failover and retries.
        Without `options.seed` each attempt's server draws its own seed (the result reports it)."""
        prompts = prompt_list(prompts)
        if not prompts:
            raise ValueError("prompts: at least one prompt is required")
        result, _ = self._call(lambda enc, t: enc.upsample(prompts, options, timeout=t), timeout)  # type: ignore[attr-defined]
        if result.fingerprint.digest:  # an HTTP server names its model only after an /info
            self._check_model(result.fingerprint)
        return result

    def encode(
        self, prompts: str | Sequence[str], *, timeout: float | None = None, upsample: UpsampleOptions | None = None
    ) -> EncodeResult:
        """Embeddings (B, L, D) for `prompts`, rows in prompt order. Prompts found in the cache are not
        sent. `timeout`: seconds for this whole call, retries included (default: the retry policy's
        deadline). With `upsample`, a server rewrites the prompts first and the rows are the embeddings of
        the rewritten prompts (`upsampled_prompts`); the cache is not asked (the rewritten prompts are not
        known before), the rows are stored under the rewritten prompts."""
        import torch

        prompts = prompt_list(prompts)
        if not prompts:
            raise ValueError("prompts: at least one prompt is required")
        if upsample is not None:
            encoded, _ = self._call(lambda enc, t: enc.encode(prompts, timeout=t, upsample=upsample), timeout)  # type: ignore[call-arg]
            self._check_model(encoded.fingerprint)
            if self.cache is not None and encoded.upsampled_prompts is not None:
                for j, rewritten in enumerate(encoded.upsampled_prompts):
                    self.cache.put(encoded.fingerprint, rewritten, encoded.prompt_embeds[j : j + 1])
            return encoded
        started = time.monotonic()
        rows: list[torch.Tensor | None] = [None] * len(prompts)
        fingerprint: pb.ModelFingerprint | None = None
        if self.cache is not None:
            digest = self.digest(timeout=timeout)
            for i, prompt in enumerate(prompts):
                hit = self.cache.get(digest, prompt)
                if hit is not None:
                    rows[i], fingerprint = hit
            with self._lock:
                self._cache_hits += sum(row is not None for row in rows)
        missing = [i for i, row in enumerate(rows) if row is None]
        if not missing:
            assert fingerprint is not None
            tensor = torch.cat([r for r in rows if r is not None], dim=0)
            return EncodeResult(tensor, (True,) * len(prompts), fingerprint)

        remaining = None if timeout is None else timeout - (time.monotonic() - started)
        sent = [prompts[i] for i in missing]
        encoded, _ = self._call(lambda enc, t: enc.encode(sent, timeout=t), remaining)
        self._check_model(encoded.fingerprint)
        if self.cache is not None:
            for j, i in enumerate(missing):
                self.cache.put(encoded.fingerprint, prompts[i], encoded.prompt_embeds[j : j + 1])
        if len(missing) == len(prompts):
            return encoded  # one response answered every row: its checksum and header describe these bytes
        hits = [True] * len(prompts)
        for j, i in enumerate(missing):
            rows[i] = encoded.prompt_embeds[j : j + 1]
            hits[i] = encoded.cache_hit[j]
        tensor = torch.cat([r for r in rows if r is not None], dim=0)
        # Rows from two sources: no checksum or header describes the concatenation, so none is claimed.
        return EncodeResult(tensor, tuple(hits), encoded.fingerprint, served_by=encoded.served_by)

    # -- attempts over the servers ------------------------------------------------------------------
    def _check_model(self, fingerprint: pb.ModelFingerprint) -> None:
        with self._lock:
            if not self._digest:
                self._digest = fingerprint.digest
            expected = self._digest
        if fingerprint.digest != expected:
            raise FingerprintMismatchError(
                shared.fingerprint_mismatch_message(expected, fingerprint.digest, fingerprint.weights_id)
            )

    def _order(self) -> list[_Endpoint]:
        """Round-robin start; healthy servers first, then those cooling down, then those that asked for a
        delay (soonest first)."""
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self._endpoints)
            now = time.monotonic()
            rotated = self._endpoints[start:] + self._endpoints[:start]
            waiting = sorted((e for e in rotated if e.not_before > now), key=lambda e: e.not_before)
            ready = [e for e in rotated if e.not_before <= now]
            return [e for e in ready if e.down_until <= now] + [e for e in ready if e.down_until > now] + waiting

    def _failed(self, endpoint: _Endpoint, retry_after: float | None) -> None:
        with self._lock:
            now = time.monotonic()
            endpoint.failures += 1
            endpoint.down_until = now + self.retry.cooldown
            if retry_after is not None:
                endpoint.not_before = max(endpoint.not_before, now + retry_after)
            self._failovers += 1

    def _succeeded(self, endpoint: _Endpoint) -> None:
        with self._lock:
            endpoint.failures = 0
            endpoint.down_until = 0.0
            self._served_by[endpoint.target] = self._served_by.get(endpoint.target, 0) + 1

    def _call(self, what: Callable[[Encoder, float], T], timeout: float | None) -> tuple[T, str]:
        """`what(encoder, attempt_timeout)` on the servers in turn until one answers; (answer, target)."""
        policy = self.retry
        budget = timeout if timeout is not None else policy.deadline
        deadline = time.monotonic() + (budget if budget is not None else policy.attempts * self.timeout)
        last: RemoteEncoderError | codec.WireError | None = None
        attempts = 0
        round_no = 0
        while attempts < policy.attempts:
            tried = False
            for endpoint in self._order():
                if attempts >= policy.attempts:
                    break
                wait = endpoint.not_before - time.monotonic()
                if wait > 0:
                    if time.monotonic() + wait >= deadline:
                        continue  # it asked for more time than this call has left
                    time.sleep(wait)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                attempts += 1
                tried = True
                attempt_timeout = min(self.timeout, remaining)
                try:
                    answer = what(endpoint.encoder, attempt_timeout)
                except RemoteEncoderError as exc:
                    if exc.code not in RETRYABLE:
                        raise
                    last = exc
                    if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED and attempt_timeout < self.timeout:
                        continue  # the call's own deadline cut this attempt short: no fault of the server
                    self._failed(endpoint, exc.retry_after)
                except codec.WireError as exc:
                    last = exc
                    self._failed(endpoint, None)
                else:
                    self._succeeded(endpoint)
                    return answer, endpoint.target
            remaining = deadline - time.monotonic()
            if not tried or remaining <= 0 or attempts >= policy.attempts:
                break
            sleep = min(policy.max_backoff, policy.backoff * 2**round_no) * random.uniform(0.5, 1.0)
            time.sleep(min(sleep, remaining))
            round_no += 1
        n = len(self._endpoints)
        if isinstance(last, RemoteEncoderError):
            raise RemoteEncoderError(
                last.code, f"all {n} encoder servers failed: {last.message}", retry_after=last.retry_after
            )
        if last is None:
            raise RemoteEncoderError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no attempt fit in the deadline ({n} servers)")
        raise RemoteEncoderError(grpc.StatusCode.UNAVAILABLE, f"all {n} encoder servers failed: {last}")


@contextlib.contextmanager
def using_encoder(encoder: Encoder | str | Sequence[str], **pool_options: Any) -> Iterator[Encoder]:
    """`encoder` as it is (the caller keeps owning it), or a pool over the target(s) it names, closed on
    exit. `pool_options` go to `EncoderPool` and apply only when one is built here."""
    if isinstance(encoder, (str, Sequence)):
        with EncoderPool(encoder, **pool_options) as pool:
            yield pool
    else:
        yield encoder
