"""Authentication and per-token limits, shared by every front-end (gRPC and HTTP /predict).

Tokens are `label:token` pairs loaded once at start from a file and/or the environment. Only their
sha256 digests are kept; a presented token is hashed and compared with every known digest through
`hmac.compare_digest`, without stopping at the first match, so neither the time taken nor an early exit
tells an attacker how much of a token was right. The label (never the token) names the caller in logs
and metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import RateLimited, Unauthenticated


@dataclass(frozen=True)
class Principal:
    """Who sent a request: the label of the bearer token that authenticated it."""

    name: str


#: The caller when authentication is off (no tokens configured).
ANONYMOUS = Principal("anonymous")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def parse_token_lines(lines: Iterable[str], source: str) -> dict[str, str]:
    """`label:token` per entry; blank entries and `#` comments are skipped. Returns {label: token}."""
    tokens: dict[str, str] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        label, sep, token = line.partition(":")
        label, token = label.strip(), token.strip()
        if not sep or not label or not token:
            raise ValueError(f"{source} entry {number}: expected `label:token`")
        if label in tokens:
            raise ValueError(f"{source} entry {number}: label {label!r} is used twice")
        if len(token) < 16:
            raise ValueError(f"{source} entry {number} ({label}): tokens must have at least 16 characters")
        tokens[label] = token
    return tokens


class TokenAuthenticator:
    """Maps a bearer token to its Principal. With no tokens, authentication is off: everyone is ANONYMOUS."""

    def __init__(self, tokens: dict[str, str]):
        self._digests = [(hashlib.sha256(token.encode()).digest(), Principal(label)) for label, token in tokens.items()]

    @classmethod
    def from_sources(cls, tokens_file: str | None, tokens_inline: str | None) -> TokenAuthenticator:
        tokens: dict[str, str] = {}
        if tokens_file:
            tokens.update(parse_token_lines(Path(tokens_file).read_text().splitlines(), tokens_file))
        if tokens_inline:
            inline = parse_token_lines(tokens_inline.split(","), "auth_tokens")
            clash = set(inline) & set(tokens)
            if clash:
                raise ValueError(f"auth_tokens: labels {sorted(clash)} are also in {tokens_file}")
            tokens.update(inline)
        return cls(tokens)

    @classmethod
    def from_digests(cls, digests: Iterable[tuple[bytes, str]]) -> TokenAuthenticator:
        """An authenticator that knows only the tokens' sha256 digests and labels (a front-end process's:
        the tokens themselves stay in the model process)."""
        authenticator = cls({})
        authenticator._digests = [(digest, Principal(label)) for digest, label in digests]
        return authenticator

    @property
    def digests(self) -> list[tuple[bytes, Principal]]:
        return list(self._digests)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    @property
    def labels(self) -> list[str]:
        return [principal.name for _, principal in self._digests]

    def authenticate(self, token: str | None) -> Principal:
        if not self._digests:
            return ANONYMOUS
        if not token:
            raise Unauthenticated("missing bearer token: send the header `authorization: Bearer <token>`")
        presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found: Principal | None = None
        for digest, principal in self._digests:
            if hmac.compare_digest(presented, digest):
                found = principal
        if found is None:
            raise Unauthenticated("invalid bearer token")
        return found


class _Bucket:
    def __init__(self, capacity: float, now: float):
        self.level = capacity
        self.updated = now


class PrincipalLimiter:
    """Per-principal token-bucket rate limit (in prompts) and concurrency limit (in requests)."""

    def __init__(self, prompts_per_s: float, burst_prompts: int, max_concurrent: int):
        self.prompts_per_s = prompts_per_s
        self.burst_prompts = burst_prompts
        self.max_concurrent = max_concurrent
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self._active: dict[str, int] = {}

    def active(self, principal: Principal) -> int:
        with self._lock:
            return self._active.get(principal.name, 0)

    def acquire(self, principal: Principal, prompts: int) -> None:
        """Take a concurrency slot and `prompts` from the bucket, or raise RateLimited (nothing taken)."""
        now = time.monotonic()
        with self._lock:
            active = self._active.get(principal.name, 0)
            if self.max_concurrent and active >= self.max_concurrent:
                raise RateLimited(
                    f"token {principal.name!r} already has {active} requests in flight "
                    f"(max_concurrent_requests_per_token={self.max_concurrent})",
                    limit="max_concurrent_requests_per_token",
                )
            if self.prompts_per_s > 0:
                bucket = self._buckets.setdefault(principal.name, _Bucket(self.burst_prompts, now))
                bucket.level = min(self.burst_prompts, bucket.level + (now - bucket.updated) * self.prompts_per_s)
                bucket.updated = now
                if bucket.level < prompts:
                    wait = (prompts - bucket.level) / self.prompts_per_s
                    raise RateLimited(
                        f"token {principal.name!r} is over its rate limit "
                        f"(rate_limit_prompts_per_s={self.prompts_per_s:g}, "
                        f"rate_limit_burst_prompts={self.burst_prompts}); retry in {wait:.1f}s",
                        limit="rate_limit_prompts_per_s",
                        retry_after_s=wait,
                    )
                bucket.level -= prompts
            self._active[principal.name] = active + 1

    def release(self, principal: Principal) -> None:
        with self._lock:
            left = self._active.get(principal.name, 0) - 1
            if left > 0:
                self._active[principal.name] = left
            else:
                self._active.pop(principal.name, None)
