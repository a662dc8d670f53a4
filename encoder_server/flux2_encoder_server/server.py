"""Server lifecycle: bind, load the models while health says NOT_SERVING, warm up, serve, drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import grpc
from flux2split_proto import SERVICE_NAME
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from .core import EncoderCore, Engine
from .cuda_graphs import graph_batch_sizes
from .engine import EncoderEngine
from .frontends import FrontendSupervisor
from .grpc_service import (
    BearerAuthInterceptor,
    TextEncoderService,
    add_health_service,
    add_reflection_service,
    add_text_encoder_service,
)
from .http_app import HttpFrontEnd, create_app
from .metrics import NO_MODEL
from .settings import Settings

log = logging.getLogger(__name__)

#: Loads the engine to serve (blocking; runs in a worker thread): `load_engine`, or a test's stand-in. It is
#: called once per hosted model with `Settings.for_model(spec)`: `settings.model` is that model's source.
EngineFactory = Callable[[Settings], Engine]

#: The gRPC health service name the liveness probe asks for: SERVING from start and through a drain,
#: NOT_SERVING only when the engine is broken (its worker died, batches keep failing, the self-test fails).
#: "" and the TextEncoder's name are readiness: NOT_SERVING while loading, draining or broken (any model).
LIVENESS_SERVICE = "liveness"


def model_health_service(name: str) -> str:
    """The gRPC health service name of one hosted model's readiness: "flux2split.v1.TextEncoder/<name>"."""
    return f"{SERVICE_NAME}/{name}"


#: How often the server looks at the engine's state (and runs a self-test when failures accumulate).
_HEALTH_POLL_S = 0.25
#: Least time between two self-tests run because batches failed.
_SELF_TEST_RETRY_S = 1.0


class PortInUseError(RuntimeError):
    """A port the server must listen on cannot be bound (another process holds it)."""


class _EngineHealthServicer(HealthServicer):
    """grpc.health.v1 whose Check reads the engine's state at the moment of the call (Watch follows the
    server's periodic refresh)."""

    def __init__(self, refresh: Callable[[], Awaitable[None]]):
        super().__init__()
        self._refresh = refresh

    async def Check(self, request: Any, context: Any) -> Any:
        await self._refresh()
        return await super().Check(request, context)


class HealthState(Protocol):
    """What health reports: `EncoderCore`, or a front-end process's `RemoteCore`."""

    @property
    def ready(self) -> bool: ...

    @property
    def live(self) -> bool: ...

    @property
    def models(self) -> Mapping[str, object]: ...

    def model_ready(self, name: str) -> bool: ...


async def report_health(health: HealthServicer, core: HealthState, reported: dict[str, int]) -> None:
    """Set readiness under "" and the TextEncoder's name (every model), each model's under
    `model_health_service(name)`, liveness under LIVENESS_SERVICE; `reported` holds what was set last
    (watchers are notified only on a change)."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    ready = serving if core.ready else not_serving
    wanted = {"": ready, SERVICE_NAME: ready, LIVENESS_SERVICE: serving if core.live else not_serving}
    for name in core.models:
        wanted[model_health_service(name)] = serving if core.model_ready(name) else not_serving
    for name, status in wanted.items():
        if reported.get(name) != status:
            reported[name] = status
            await health.set(name, status)


def grpc_server(core: Any, settings: Settings, health: HealthServicer, *, reuse_port: bool = False) -> grpc.aio.Server:
    """The gRPC server of one process: TextEncoder over `core` (an `EncoderCore`, or a front-end process's
    `RemoteCore`), health, reflection, the auth guard. Not yet bound."""
    s = settings
    # Requests are small; allow the largest one the limits admit (UTF-8: up to 4 bytes a character).
    max_request = max(4 << 20, s.max_prompts_per_request * (s.max_prompt_chars * 4 + 16) + (64 << 10))
    if s.upsampling:  # an upsampling request also carries its reference images
        max_request += s.upsample_max_images * (s.upsample_max_image_bytes + 16)
    server = grpc.aio.server(
        interceptors=[BearerAuthInterceptor(core)],
        options=[
            ("grpc.max_receive_message_length", max_request),
            # gRPC sets SO_REUSEPORT by default: a second server on the same port would start and take
            # a share of new connections (one without tokens beside one with them, say). Refuse instead,
            # except between the front-end processes of one server (`--frontends`), which share the port
            # on purpose after the model process has checked that no other program holds it.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    add_text_encoder_service(TextEncoderService(core), server)
    add_health_service(health, server)
    if s.reflection:
        add_reflection_service(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
    return server


def bind_grpc(server: grpc.aio.Server, settings: Settings, credentials: grpc.ServerCredentials | None) -> int:
    """Bind `server` to --host/--port; a port held elsewhere is PortInUseError. Returns the port."""
    address = f"{settings.host}:{settings.port}"
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpc's "Failed to bind to address ..."
        raise PortInUseError(f"cannot listen on {address}: the port is in use (or the address is not local)") from exc


def http_front_end(
    core: Any, settings: Settings, is_serving: Callable[[], bool | Awaitable[bool]], *, reuse_port: bool = False
) -> HttpFrontEnd:
    """The HTTP /predict front-end over `core` (not yet started); HTTPS with the gRPC port's certificate (and
    client-certificate rule) when --tls-cert / --tls-key are set: a bearer token never crosses in the clear on
    one port of a server that protects the other."""
    dropped = core.metrics.dropped.labels("http_header_timeout", NO_MODEL)
    return HttpFrontEnd(
        create_app(core, is_serving),
        settings.host,
        settings.http_port or 0,
        head_timeout_s=settings.http_read_timeout_s,
        on_head_timeout=dropped.inc,
        reuse_port=reuse_port,
        tls=http_tls(settings),
    )


def http_tls(settings: Settings) -> dict[str, Any] | None:
    """uvicorn's ssl_* options for --tls-cert / --tls-key / --tls-client-ca (None without TLS)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    import ssl

    options: dict[str, Any] = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
    if settings.tls_client_ca:
        options.update(ssl_ca_certs=settings.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


def reserve_ports(settings: Settings) -> tuple[int, int | None]:
    """`--frontends` mode: check --port and --http-port with a plain bind (another program holding one is
    PortInUseError naming the flag, as in single-process mode) and resolve port 0 to a free port, which
    every front-end process then binds with SO_REUSEPORT."""
    s = settings
    held: list[socket.socket] = []
    try:
        ports: list[int | None] = []
        for port, flag in ((s.port, "--port"), (s.http_port, "--http-port")):
            if port is None:
                ports.append(None)
                continue
            infos = socket.getaddrinfo(s.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
            held.append(sock)  # held until both are checked: port 0 twice must give two ports
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise PortInUseError(f"cannot listen on {s.host}:{port} ({flag}): {exc.strerror}") from None
            ports.append(int(sock.getsockname()[1]))
    finally:
        for sock in held:
            sock.close()
    assert ports[0] is not None
    return ports[0], ports[1]


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
        upsampling=settings.upsampling,
        # One server-wide flag: with several models it turns upsampling on for those that can (FLUX.2-dev's
        # Mistral); `EncoderServer.load` refuses when none can.
        upsampling_if_supported=settings.hosted_beside_others,
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
    """One gRPC server (and, with `http_port` set, the HTTP /predict front-end) over the engines of every
    hosted model. `await start()`, `await load()`, later `await stop()`."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory = load_engine):
        self.settings = settings
        self.core = EncoderCore(settings)
        self.metrics = self.core.metrics
        #: The default model's engine, and every hosted model's by name (filled as they load).
        self.engine: Engine | None = None
        self.engines: dict[str, Engine] = {}
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_server: Any = None
        self.http_port: int | None = None
        self._engine_factory = engine_factory
        self._health = _EngineHealthServicer(self._refresh_health)
        self._watcher: asyncio.Task | None = None
        self._reported: dict[str, int] = {}
        self._reported_problem: str | None = None
        self._server: grpc.aio.Server | None = None
        self._http: HttpFrontEnd | None = None
        self._frontends: FrontendSupervisor | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        s = self.settings
        await self._refresh_health()
        if s.frontends:
            return await self._start_frontends()
        server = grpc_server(self.core, s, self._health)
        credentials = server_credentials(s)
        self.port = bind_grpc(server, s, credentials)
        await server.start()
        self._server = server
        self._start_metrics()
        self._log_listening(credentials)
        if s.http_port is not None:
            self._http = http_front_end(self.core, s, lambda: self.serving())
            try:
                self.http_port = await self._http.start()
            except OSError as exc:
                await server.stop(0)
                raise PortInUseError(f"cannot listen on {s.host}:{s.http_port} (--http-port): {exc.strerror}") from exc
            log.info("HTTP /predict listening on %s:%d", self.settings.host, self.http_port)
        return self.port

    async def _start_frontends(self) -> int:
        """`--frontends N`: this process keeps the models and the core; N front-end processes serve gRPC and
        HTTP on the same ports (SO_REUSEPORT) over it (`frontends.FrontendSupervisor`)."""
        s = self.settings
        self.port, self.http_port = reserve_ports(s)
        self._frontends = FrontendSupervisor(self.core, s, self.port, self.http_port)
        await self._frontends.start()
        self._start_metrics()
        self._log_listening(server_credentials(s))
        log.info(
            "%d front-end processes serve gRPC%s over a %d byte response ring%s",
            s.frontends,
            f" and HTTP on port {self.http_port}" if self.http_port is not None else "",
            self._frontends.ring.size,
            " (registered with CUDA)" if self._frontends.ring_registered else "",
        )
        return self.port

    def _start_metrics(self) -> None:
        s = self.settings
        if s.metrics_port is not None:
            from prometheus_client import start_http_server

            self._metrics_server, _ = start_http_server(s.metrics_port, s.metrics_host, registry=self.metrics.registry)
            self.metrics_port = self._metrics_server.server_port

    def _log_listening(self, credentials: grpc.ServerCredentials | None) -> None:
        s = self.settings
        if not self.core.authenticator.enabled:
            log.warning("no bearer tokens configured: authentication is OFF, anyone who reaches the port may encode")
        log.info(
            "listening on %s:%d (%s, auth %s, NOT_SERVING until the model is loaded)",
            s.host,
            self.port,
            "plaintext" if credentials is None else ("mutual TLS" if s.tls_client_ca else "TLS"),
            "on for " + ", ".join(self.core.authenticator.labels) if self.core.authenticator.enabled else "off",
        )

    def serving(self) -> bool:
        """Readiness, as both health endpoints report it: loaded, warmed up, not draining, engine working."""
        return self.core.ready

    async def load(self) -> None:
        """Load every hosted model in turn (the default first; on one GPU they share the device), start its
        batcher and warm it up; health turns SERVING once all of them are."""
        for spec in self.settings.models:
            started = time.monotonic()
            engine = await asyncio.to_thread(self._engine_factory, self.settings.for_model(spec))
            self.engines[spec.name] = engine
            if spec.name == self.core.default_model:
                self.engine = engine
            self.core.start(engine, spec.name)
            # The warm-up is the first self-test: a model that cannot encode a fixed prompt never reports SERVING,
            # and none reports it before that forward has passed.
            if not await self.core.warm_up(self.settings.default_timeout_s, model=spec.name):
                raise RuntimeError(f"the engine of model {spec.name} failed its self-test: {self.core.engine_problem}")
            fp = engine.fingerprint
            log.info("model %s: %s (digest %s) loaded", spec.name, fp.weights_id, fp.digest[:16])
            self._report_load(spec.name, engine, time.monotonic() - started)
        if self.settings.upsampling and all(getattr(e, "upsampler", None) is None for e in self.engines.values()):
            raise ValueError(
                "--upsampling: none of the hosted models can upsample (it needs a FLUX.2-dev text encoder, "
                "--precision bf16 and no --compile)"
            )
        self._watcher = asyncio.get_running_loop().create_task(self._watch_engine())
        await self._refresh_health()
        log.info("SERVING %s", ", ".join(f"{name} ({e.fingerprint.weights_id})" for name, e in self.engines.items()))

    def _report_load(self, model: str, engine: Engine, seconds: float) -> None:
        # Engines built in memory (tests' fakes, from_model) carry no load report.
        report = getattr(engine, "load_report", None)
        self.metrics.record_load(
            model, seconds, report.bytes_read if report else None, report.bytes_downloaded if report else 0
        )
        log.info(
            "model %s: time to SERVING %.1fs (weights: %s)",
            model,
            seconds,
            report.describe() if report else "built in memory",
        )

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
        await self._refresh_health()  # readiness NOT_SERVING; liveness stays SERVING through the drain
        if not await self.core.wait_idle(grace):
            log.warning(
                "grace period of %.1fs is over with %d requests in flight; cancelling them",
                grace,
                self.core.inflight_requests,
            )
        remaining = max(0.0, deadline - time.monotonic())
        fronts = []
        if self._frontends is not None:
            fronts.append(self._frontends.stop(remaining))
        if self._server is not None:
            fronts.append(self._server.stop(remaining))
        if self._http is not None:
            fronts.append(self._http.stop(remaining))
        await asyncio.gather(*fronts)
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await asyncio.to_thread(self.core.close, 5.0)
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.shutdown)
            self._metrics_server.server_close()
            self._metrics_server = None
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _refresh_health(self) -> None:
        """Report the core's state (`report_health`), to the front-end processes too when there are some."""
        await report_health(self._health, self.core, self._reported)
        if self._frontends is not None:
            self._frontends.publish_state()
        problem = self.core.engine_problem
        if problem is not None and self._reported_problem != problem:
            log.error("health NOT_SERVING: %s", problem)
        self._reported_problem = problem

    async def _watch_engine(self) -> None:
        """Keeps health in step with the engine; runs the self-test when batches keep failing (until one
        passes) and every `self_test_interval_s` while nothing else proves the engine works."""
        interval = self.settings.self_test_interval_s
        last_test = time.monotonic()
        while True:
            await asyncio.sleep(_HEALTH_POLL_S)
            now = time.monotonic()
            core = self.core
            retry = core.needs_self_test and now - last_test >= _SELF_TEST_RETRY_S
            periodic = interval > 0 and now - last_test >= interval and core.inflight_requests == 0
            if (retry or periodic) and not core.draining:
                last_test = now
                await core.self_test(self.settings.default_timeout_s)
            await self._refresh_health()


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
        scheme = "HTTPS" if http_tls(settings) else "HTTP"
        print(f"flux2-encoder-server {scheme} /predict on {settings.host}:{server.http_port}", flush=True)
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
