"""Server lifecycle: bind, load the model while health says NOT_SERVING, warm up, serve, drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import grpc
from flux2split_proto import SERVICE_NAME
from flux2split_proto.v1 import encoder_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from .batcher import Batcher
from .core import EncoderCore
from .engine import EncoderEngine
from .grpc_service import TextEncoderService
from .settings import Settings

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], EncoderEngine]


def load_engine(settings: Settings) -> EncoderEngine:
    import torch

    return EncoderEngine.from_pretrained(
        settings.model,
        revision=settings.revision,
        device=settings.device,
        dtype=getattr(torch, settings.dtype),
        text_encoder_subfolder=settings.text_encoder_subfolder,
        tokenizer_subfolder=settings.tokenizer_subfolder,
        precision=settings.precision,
        batching_mode=settings.batching_mode,
        compile=settings.compile,
    )


class EncoderServer:
    """One gRPC server over one engine. `await start()`, `await load()`, later `await stop()`."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory = load_engine):
        self.settings = settings
        self.core = EncoderCore(settings)
        self.engine: EncoderEngine | None = None
        self.batcher: Batcher | None = None
        self.port: int | None = None
        self._engine_factory = engine_factory
        self._health = HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        server = grpc.aio.server()
        pb_grpc.add_TextEncoderServicer_to_server(TextEncoderService(self.core), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        await server.start()
        self._server = server
        log.info("listening on %s:%d (NOT_SERVING until the model is loaded)", self.settings.host, self.port)
        return self.port

    async def load(self) -> None:
        engine = await asyncio.to_thread(self._engine_factory, self.settings)
        if self.settings.warmup:
            await asyncio.to_thread(engine.encode, ["warm-up"])
        self.engine = engine
        self.batcher = Batcher(
            engine.encode,
            max_batch_prompts=self.settings.max_batch_prompts,
            max_wait_s=self.settings.max_wait_ms / 1000,
            max_queued_requests=self.settings.max_queued_requests,
        )
        self.core.attach(self.batcher, engine.fingerprint, engine.embedding_dim)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING %s (digest %s)", engine.fingerprint.weights_id, engine.fingerprint.digest[:16])

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight ones finish within the grace period."""
        grace = self.settings.grace_period_s if grace is None else grace
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        if self.batcher is not None:
            self.batcher.close()
            await asyncio.to_thread(self.batcher.join, 5.0)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)


async def serve(settings: Settings, engine_factory: EngineFactory = load_engine) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    server = EncoderServer(settings, engine_factory)
    port = await server.start()
    print(f"flux2-encoder-server listening on {settings.host}:{port}", flush=True)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task] = []

    def on_signal(signum: int) -> None:
        if not stopping:
            log.info("signal %s: draining for up to %.0fs", signal.Signals(signum).name, settings.grace_period_s)
            stopping.append(loop.create_task(server.stop()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    load_task = loop.create_task(server.load())
    stopped_task = loop.create_task(server.wait_stopped())
    done, _ = await asyncio.wait({load_task, stopped_task}, return_when=asyncio.FIRST_COMPLETED)
    if load_task in done and load_task.exception() is not None:
        await server.stop(0)
        raise load_task.exception()  # type: ignore[misc]
    await server.wait_stopped()
    print("flux2-encoder-server stopped", flush=True)
