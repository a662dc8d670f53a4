"""One model a server hosts: its engine's fingerprint and width, its own batcher, and its health.

A server hosting several models (FLUX.2-dev's Mistral beside FLUX.2 [klein]'s Qwen3, say) gives each one
a `HostedModel`: its own queue and its own worker thread, so a model batch only ever holds prompts of one
model, and a model whose batches fail turns health NOT_SERVING without touching the other's batches. On
one GPU the models share the device; their batches interleave as their workers launch them.

What the models share (authentication, per-token limits, the in-flight byte budget, the embedding cache,
the metrics registry, draining) stays in `EncoderCore`, which routes each request to one of these by name.
Nothing here knows a transport.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from .batcher import Batcher, BatchStats, Encoded
from .errors import ResourceExhausted, Unavailable
from .upsample import Upsampled, UpsampleLimits

if TYPE_CHECKING:
    from .core import Engine
    from .fingerprint import Fingerprint
    from .metrics import Metrics
    from .settings import Settings
    from .upsample import UpsampleJob, Upsampler

log = logging.getLogger(__name__)

__all__ = ["SELF_TEST_PROMPT", "HostedModel"]

#: What the self-test encodes (as text-embeddings-inference's health check runs a forward on a fixed input).
SELF_TEST_PROMPT = "A photo of a red apple on a wooden table."


class HostedModel:
    """The served model named `name`: `start(engine)` builds and starts its batcher, `close()` stops it."""

    def __init__(self, name: str, settings: Settings, metrics: Metrics, *, is_default: bool):
        self.name = name
        self.is_default = is_default
        #: This model's settings: the server's with its own `--model-setting` values (`Settings.for_model`).
        self.settings = settings
        self.metrics = metrics
        self.fingerprint: Fingerprint | None = None
        self.embedding_dim = 0
        self._batcher: Batcher | None = None
        self._failed_batches = 0  # in a row; a batch that succeeds resets it
        self._self_test_error: str | None = None
        #: The warm-up encode passed (or was switched off): readiness waits for it (`EncoderCore.warm_up`).
        self.warmed = False
        #: The engine's prompt upsampler (`--upsampling`), None when this model does not upsample.
        self.upsampler: Upsampler | None = None
        self._upsample_limits: UpsampleLimits | None = None
        metrics.queue_depth.labels(name).set_function(lambda: self.queued)
        metrics.upsample_queue_depth.labels(name).set_function(lambda: self.queued_upsamples)

    # What Info and /info report of this model's own queue and batches (a front-end's `RemoteModel` carries
    # the same two from the model process).
    @property
    def max_batch_prompts(self) -> int:
        return self.settings.max_batch_prompts

    @property
    def max_queued_requests(self) -> int:
        return self.settings.max_queued_requests

    def __repr__(self) -> str:
        weights = self.fingerprint.weights_id if self.fingerprint is not None else "not loaded"
        return f"HostedModel({self.name!r}, {weights})"

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self, engine: Engine) -> None:
        if self._batcher is not None:
            raise RuntimeError(f"model {self.name!r} serves one engine for its lifetime")
        self.fingerprint = engine.fingerprint
        self.embedding_dim = engine.embedding_dim
        s = self.settings
        self._batcher = Batcher(
            engine.launch,
            max_batch_prompts=s.max_batch_prompts,
            max_wait_s=s.max_wait_ms / 1000,
            max_queued_requests=s.max_queued_requests,
            pipeline_depth=s.pipeline_depth,
            launch_lead_s=s.launch_lead_ms / 1000 if s.launch_lead_ms > 0 else None,
            balance_batches=s.balance_batches,
            on_batch=self._on_batch,
            on_drop=lambda reason: self.metrics.dropped.labels(reason, self.name).inc(),
            max_queued_tasks=s.upsample_max_queued_requests,
            task_share=s.upsample_share,
            # Tokenize each request as it queues, off the model thread (engines that can; a test's fake runs
            # `launch` with prompts).
            prepare=getattr(engine, "tokenize_rows", None),
            launch_prepared=getattr(engine, "launch_rows", None),
        )
        self.upsampler = getattr(engine, "upsampler", None)
        self._upsample_limits = UpsampleLimits(
            max_prompts=s.upsample_max_prompts,
            max_images=s.upsample_max_images,
            max_image_bytes=s.upsample_max_image_bytes,
            max_image_pixels=s.upsample_max_image_pixels,
            max_temperature=s.upsample_max_temperature,
            max_new_tokens=s.upsample_max_new_tokens,
            images=bool(self.upsampler is not None and self.upsampler.supports_images),
        )

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()

    def join(self, timeout: float) -> None:
        if self._batcher is not None:
            self._batcher.join(timeout)

    @property
    def started(self) -> bool:
        return self._batcher is not None

    @property
    def alive(self) -> bool:
        """Started and its worker thread running."""
        return self._batcher is not None and self._batcher.alive

    @property
    def queued(self) -> int:
        """Requests waiting for this model."""
        return self._batcher.queued if self._batcher is not None else 0

    @property
    def queued_upsamples(self) -> int:
        """Upsampling requests waiting for this model."""
        return self._batcher.queued_tasks if self._batcher is not None else 0

    @property
    def upsample_limits(self) -> UpsampleLimits | None:
        """What upsampling requests to this model may ask for; None when it does not upsample."""
        return self._upsample_limits if self.upsampler is not None else None

    # -- health -------------------------------------------------------------------------------------------
    @property
    def problem(self) -> str | None:
        """Why this model cannot serve, None while it can (or is still loading): its worker thread died,
        `unhealthy_after_failed_batches` batches failed in a row, or the last self-test failed."""
        batcher = self._batcher
        if batcher is None:
            return None
        if not batcher.alive:
            return "the batcher's worker thread died"
        if self._self_test_error is not None:
            return f"the self-test encode failed: {self._self_test_error}"
        limit = self.settings.unhealthy_after_failed_batches
        if self._failed_batches >= limit:
            return f"{self._failed_batches} model batches failed in a row (unhealthy_after_failed_batches={limit})"
        return None

    @property
    def needs_self_test(self) -> bool:
        """Batches have been failing (or the last self-test failed): only a passing self-test clears it."""
        return self._self_test_error is not None or self._failed_batches >= self.settings.unhealthy_after_failed_batches

    async def self_test(self, timeout: float) -> bool:
        """Encode `SELF_TEST_PROMPT` through the batcher (no cache, no admission) and check its rows; a pass
        clears the failure count, a failure keeps the model unhealthy until a later pass."""
        batcher = self._batcher
        if batcher is None or not batcher.alive:
            return False
        try:
            encoded = await batcher.submit([SELF_TEST_PROMPT], timeout=timeout)
            embeds = encoded.embeds
            if embeds.shape[0] != 1 or embeds.shape[-1] != self.embedding_dim:
                raise RuntimeError(f"unexpected shape {tuple(embeds.shape)}")
            if not bool(torch.isfinite(embeds).all()):
                raise RuntimeError("the rows are not finite")
        except Exception as exc:
            self._self_test_error = f"{type(exc).__name__}: {exc}"
            self.metrics.self_tests.labels("failed", self.name).inc()
            log.error("self-test of model %s failed: %s", self.name, self._self_test_error)
            return False
        self._self_test_error = None
        self._failed_batches = 0
        self.metrics.self_tests.labels("passed", self.name).inc()
        return True

    # -- requests -----------------------------------------------------------------------------------------
    def serving_fingerprint(self) -> Fingerprint:
        """The fingerprint of what this model serves, or Unavailable while it cannot take requests."""
        if self._batcher is None or self.fingerprint is None:
            raise Unavailable("the model is still loading; retry shortly")
        if not self._batcher.alive:  # nothing would ever answer: send the client elsewhere at once
            raise Unavailable("the server's model worker has stopped; retry on another replica")
        return self.fingerprint

    def response_bytes(self, prompts: int) -> int:
        """Bytes of the embeddings for `prompts` prompts: what admission reserves."""
        fp = self.serving_fingerprint()
        return prompts * fp.max_length * self.embedding_dim * fp.itemsize

    async def submit(self, prompts: list[str], timeout: float) -> Encoded:
        assert self._batcher is not None
        try:
            encoded = await self._batcher.submit(prompts, timeout=timeout)
        except ResourceExhausted:  # this model's queue is full
            self.metrics.rejected.labels("max_queued_requests", self.name).inc()
            raise
        self.metrics.stage_seconds.labels("queue", self.name).observe(encoded.queue_seconds)
        self.metrics.stage_seconds.labels("encode", self.name).observe(encoded.encode_seconds)
        return encoded

    async def upsample(self, job: UpsampleJob, timeout: float) -> Upsampled:
        """Run `job` on this model's worker thread, in turn with its encode batches (its own queue share)."""
        assert self._batcher is not None and self.upsampler is not None
        upsampler = self.upsampler
        try:
            done = await self._batcher.run_task(lambda should_stop: upsampler.generate(job, should_stop), timeout)
        except ResourceExhausted:
            self.metrics.rejected.labels("upsample_max_queued_requests", self.name).inc()
            raise
        upsampled = done.value
        assert isinstance(upsampled, Upsampled)
        m, name = self.metrics, self.name
        m.upsample_seconds.labels("queue", name).observe(done.queue_seconds)
        m.upsample_seconds.labels("generate", name).observe(done.run_seconds)
        m.upsample_prompts.labels(name).inc(len(job.prompts))
        m.upsample_tokens.labels(name).inc(sum(upsampled.new_tokens))
        return upsampled

    def _on_batch(self, stats: BatchStats) -> None:
        m, name = self.metrics, self.name
        if stats.failed:
            self._failed_batches += 1
            m.batch_failures.labels(name).inc()
            return
        self._failed_batches = 0
        m.batch_prompts.labels(name).observe(stats.prompts)
        m.batch_requests.labels(name).observe(stats.jobs)
        assert self.fingerprint is not None
        m.model_tokens.labels(name).inc(stats.prompts * self.fingerprint.max_length)
