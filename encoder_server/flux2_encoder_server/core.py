"""The front-end-agnostic core: validates a request, checks the fingerprint, hands the prompts to the
batcher. The gRPC service (and the HTTP /predict front-end) are thin layers over this."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .batcher import Batcher
from .engine import Fingerprint
from .errors import FailedPrecondition, InvalidArgument, Unavailable
from .settings import Settings


@dataclass(frozen=True)
class Principal:
    """Who sent a request: the label of the bearer token that authenticated it."""

    name: str


ANONYMOUS = Principal("anonymous")


@dataclass
class EncodeResult:
    embeds: torch.Tensor
    cache_hit: list[bool]


class EncoderCore:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.batcher: Batcher | None = None
        self.fingerprint: Fingerprint | None = None
        self.embedding_dim = 0

    def attach(self, batcher: Batcher, fingerprint: Fingerprint, embedding_dim: int) -> None:
        """Called once the model is loaded; before that every request gets UNAVAILABLE."""
        self.fingerprint = fingerprint
        self.embedding_dim = embedding_dim
        self.batcher = batcher

    @property
    def ready(self) -> bool:
        return self.batcher is not None

    def validate_prompts(self, prompts: Sequence[object], field: str = "prompts") -> list[str]:
        limits = self.settings
        if len(prompts) == 0:
            raise InvalidArgument(f"{field}: at least one prompt is required")
        if len(prompts) > limits.max_prompts_per_request:
            raise InvalidArgument(
                f"{field}: {len(prompts)} prompts exceed max_prompts_per_request={limits.max_prompts_per_request}"
            )
        out = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise InvalidArgument(f"{field}[{i}]: expected a string, got {type(prompt).__name__}")
            if len(prompt) > limits.max_prompt_chars:
                raise InvalidArgument(
                    f"{field}[{i}]: {len(prompt)} characters exceed max_prompt_chars={limits.max_prompt_chars}"
                )
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgument(f"{field}[{i}]: not valid UTF-8 (lone surrogate)") from None
            out.append(prompt)
        return out

    def authenticate(self, bearer_token: str | None) -> Principal:
        """Front-ends pass the raw bearer token (None when the request carried none)."""
        return ANONYMOUS

    async def encode(
        self,
        prompts: Sequence[object],
        *,
        principal: Principal = ANONYMOUS,
        expected_fingerprint: str = "",
        timeout: float | None = None,
        bypass_cache: bool = False,
    ) -> EncodeResult:
        if self.batcher is None or self.fingerprint is None:
            raise Unavailable("the model is still loading; retry shortly")
        valid = self.validate_prompts(prompts)
        if expected_fingerprint and expected_fingerprint != self.fingerprint.digest:
            raise FailedPrecondition(
                f"expected_fingerprint {expected_fingerprint[:16]}… does not match this server's model "
                f"{self.fingerprint.weights_id} (digest {self.fingerprint.digest[:16]}…)"
            )
        embeds = await self.batcher.submit(valid, timeout=timeout)
        return EncodeResult(embeds=embeds, cache_hit=[False] * len(valid))
