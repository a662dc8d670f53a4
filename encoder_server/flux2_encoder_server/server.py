"""Server lifecycle: bind, load the model while health says NOT_SERVING, warm up, serve, drain."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
from flux2split_proto import SERVICE_NAME
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from .batcher import Batcher
from .core import EncoderCore
from .cuda_graphs import graph_batch_sizes
from .engine import EncoderEngine
from .grpc_service import BearerAuthInterceptor, TextEncoderService, add_text_encoder_service
from .http_app import HttpFrontEnd, create_app
from .settings import Settings

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], EncoderEngine]


def load_engine(settings: Settings) -> EncoderEngine:
    import torch

    engine = EncoderEngine.from_pretrained(
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
    if settings.cuda_graphs:
        sizes = engine.capture_cuda_graphs(graph_batch_sizes(settings.max_batch_prompts, engine.min_batch))
        log.info("captured CUDA graphs for batch sizes %s", list(sizes))
    return engine


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from --tls-cert/--tls-key; with --tls-client-ca clients must present a certificate (mTLS)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    client_ca = _read(settings.tls_client_ca) if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(_read(settings.tls_key), _read(settings.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class EncoderServer:
    """One gRPC server (and, with `http_port` set, the HTTP /predict front-end) over one engine.
    `await start()`, `await load()`, later `await stop()`."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory = load_engine):
        self.settings = settings
        self.core = EncoderCore(settings)
        self.metrics = self.core.metrics
        self.engine: EncoderEngine | None = None
        self.batcher: Batcher | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_server: Any = None
        self.http_port: int | None = None
        self._engine_factory = engine_factory
        self._health = HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._http: HttpFrontEnd | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        s = self.settings
        # Requests are small; allow the largest one the limits admit (UTF-8: up to 4 bytes a character).
        max_request = max(4 << 20, s.max_prompts_per_request * (s.max_prompt_chars * 4 + 16) + (64 << 10))
        server = grpc.aio.server(
            interceptors=[BearerAuthInterceptor(self.core)],
            options=[("grpc.max_receive_message_length", max_request)],
        )
        add_text_encoder_service(TextEncoderService(self.core), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if s.reflection:
            reflection.enable_server_reflection(
                (
                    SERVICE_NAME,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ),
                server,
            )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        credentials = server_credentials(s)
        address = f"{s.host}:{s.port}"
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        await server.start()
        self._server = server
        if s.metrics_port is not None:
            from prometheus_client import start_http_server

            self._metrics_server, _ = start_http_server(s.metrics_port, s.metrics_host, registry=self.metrics.registry)
            self.metrics_port = self._metrics_server.server_port
        if not self.core.authenticator.enabled:
            log.warning("no bearer tokens configured: authentication is OFF, anyone who reaches the port may encode")
        log.info(
            "listening on %s:%d (%s, auth %s, NOT_SERVING until the model is loaded)",
            s.host,
            self.port,
            "plaintext" if credentials is None else ("mutual TLS" if s.tls_client_ca else "TLS"),
            "on for " + ", ".join(self.core.authenticator.labels) if self.core.authenticator.enabled else "off",
        )
        if self.settings.http_port is not None:
            self._http = HttpFrontEnd(create_app(self.core, self.serving), self.settings.host, self.settings.http_port)
            self.http_port = await self._http.start()
            log.info("HTTP /predict listening on %s:%d", self.settings.host, self.http_port)
        return self.port

    def serving(self) -> bool:
        """Readiness, as both health endpoints report it: loaded, warmed up and not draining."""
        return self.core.ready

    async def load(self) -> None:
        started = time.monotonic()
        engine = await asyncio.to_thread(self._engine_factory, self.settings)
        if self.settings.warmup:
            await asyncio.to_thread(engine.encode, ["warm-up"])
        self.engine = engine
        self.batcher = self.core.make_batcher(engine.launch)
        self.core.attach(self.batcher, engine.fingerprint, engine.embedding_dim)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING %s (digest %s)", engine.fingerprint.weights_id, engine.fingerprint.digest[:16])
        self._report_load(engine, time.monotonic() - started)

    def _report_load(self, engine: EncoderEngine, seconds: float) -> None:
        report = engine.load_report
        self.metrics.record_load(
            seconds, report.bytes_read if report else None, report.bytes_downloaded if report else 0
        )
        log.info("time to SERVING %.1fs (weights: %s)", seconds, report.describe() if report else "built in memory")

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new work, let admitted requests finish within the grace period.

        The drain happens in the core, with the gRPC server still accepting calls: newcomers get a
        clean UNAVAILABLE ("draining") instead of whatever a closing transport would give them, and
        load balancers have the grace period to notice NOT_SERVING. Only then is the server stopped,
        which cancels anything still running.
        """
        grace = self.settings.grace_period_s if grace is None else grace
        deadline = time.monotonic() + grace
        self.core.start_draining()  # every front-end over this core refuses new work from now on
        await self._health.enter_graceful_shutdown()
        if not await self.core.wait_idle(grace):
            log.warning(
                "grace period of %.1fs is over with %d requests in flight; cancelling them",
                grace,
                self.core.inflight_requests,
            )
        remaining = max(0.0, deadline - time.monotonic())
        fronts = []
        if self._server is not None:
            fronts.append(self._server.stop(remaining))
        if self._http is not None:
            fronts.append(self._http.stop(remaining))
        await asyncio.gather(*fronts)
        if self.batcher is not None:
            self.batcher.close()
            await asyncio.to_thread(self.batcher.join, 5.0)
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.shutdown)
            self._metrics_server.server_close()
            self._metrics_server = None
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)


async def serve(settings: Settings, engine_factory: EngineFactory = load_engine) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    if settings.gil_switch_interval_ms > 0:
        # Process-wide, so only here, where this process is the server (never in EncoderServer, which
        # tests and benchmarks embed in processes of their own).
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    server = EncoderServer(settings, engine_factory)
    port = await server.start()
    print(f"flux2-encoder-server listening on {settings.host}:{port}", flush=True)
    if server.metrics_port is not None:
        print(
            f"flux2-encoder-server metrics on http://{settings.metrics_host}:{server.metrics_port}/metrics", flush=True
        )
    if server.http_port is not None:
        print(f"flux2-encoder-server HTTP /predict on {settings.host}:{server.http_port}", flush=True)
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
