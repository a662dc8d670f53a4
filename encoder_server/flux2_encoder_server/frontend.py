"""One front-end process of `--frontends N` (docs/design.md#architecture, "Front-end processes").

    python -m flux2_encoder_server.frontend SOCKET RING_FD INDEX

Started by the model process (`frontends.FrontendSupervisor`), never by hand: it connects to SOCKET, gets
the settings, the tokens' digests, the ports and the model state, maps the response ring (RING_FD), and
serves today's gRPC servicer and HTTP app over a `RemoteCore` on the shared ports (SO_REUSEPORT). It
ignores SIGINT and SIGTERM (the model process leads the drain and tells it to stop) and exits when its
socket to the model process closes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from grpc_health.v1._async import HealthServicer

from .http_app import HttpFrontEnd
from .ipc import RingView, read_frame, write_frame
from .logs import configure_logging
from .remote_core import RemoteCore
from .security import TokenAuthenticator
from .server import PortInUseError, bind_grpc, grpc_server, http_front_end, report_health, server_credentials
from .settings import Settings

log = logging.getLogger(__name__)


class _Tagged(logging.Filter):
    """Adds the front-end's index to every record's fields (JSON and text formatters both show them)."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        record.fields = {**(fields if isinstance(fields, dict) else {}), "frontend_process": self.index}
        return True


class _Health(HealthServicer):
    """grpc.health.v1 from the model process's last state (NOT_SERVING once it is unreachable)."""

    def __init__(self, core: RemoteCore):
        super().__init__()
        self.core = core
        self.reported: dict[str, int] = {}

    async def refresh(self) -> None:
        await report_health(self, self.core, self.reported)

    async def Check(self, request: Any, context: Any) -> Any:
        await self.core.refresh_state()  # the model process's state at the moment of the call
        await self.refresh()
        return await super().Check(request, context)


async def run(socket_path: str, ring_fd: int, index: int) -> int:
    try:
        reader, writer = await asyncio.open_unix_connection(socket_path, limit=1 << 20)
        write_frame(writer, {"t": "hello", "index": index})
        setup, _ = await read_frame(reader)
    except (OSError, asyncio.IncompleteReadError) as exc:  # the model process is gone (or going)
        print(f"flux2-encoder-server front-end {index}: the model process is not reachable ({exc})", file=sys.stderr)
        return 1
    settings = Settings(**{**setup["settings"], "port": int(setup["port"]), "http_port": setup["http_port"]})
    configure_logging(settings.log_level, settings.log_format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Tagged(index))
    authenticator = TokenAuthenticator.from_digests((bytes.fromhex(d), label) for d, label in setup["token_digests"])
    core = RemoteCore(settings, writer, RingView(ring_fd, int(setup["ring_size"])), authenticator, setup["state"])
    health = _Health(core)
    await health.refresh()
    server = grpc_server(core, settings, health, reuse_port=True)
    http: HttpFrontEnd | None = None
    try:
        bind_grpc(server, settings, server_credentials(settings))
        await server.start()
        if settings.http_port is not None:
            http = http_front_end(core, settings, core.serving_now, reuse_port=True)
            await http.start()
    except (PortInUseError, OSError) as exc:
        log.error("front-end %d cannot listen: %s", index, exc)
        return 2
    write_frame(writer, {"t": "ready"})

    async def stop_serving(grace: float) -> None:
        # Draining: the model process has let admitted requests finish; requests still open here (one
        # that arrived during the drain, waiting for its UNAVAILABLE) get `grace`, their replies still read.
        await health.refresh()
        stops = [server.stop(grace)]
        if http is not None:
            stops.append(http.stop(grace))
        await asyncio.gather(*stops)
        writer.close()

    stopping: asyncio.Task | None = None
    try:
        while True:
            message, _ = await read_frame(reader)
            kind = message["t"]
            if kind == "state" and "id" in message:  # the answer to a health probe's question
                core.on_reply(message)
            elif kind == "state":  # pushed by the model process when its state changed
                core.apply_state(message)
                await health.refresh()
            elif kind == "stop":
                stopping = stopping or asyncio.create_task(stop_serving(float(message["grace"])))
            else:  # a reply to a request
                core.on_reply(message)
    except (asyncio.IncompleteReadError, ConnectionError):
        if stopping is None:
            log.warning("front-end %d: the model process closed the connection; stopping", index)
    core.disconnected()  # health NOT_SERVING; requests still waiting on the model process fail UNAVAILABLE
    await (stopping or stop_serving(0.0))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        print("usage: python -m flux2_encoder_server.frontend SOCKET RING_FD INDEX (started by the server)")
        return 2
    # A terminal's Ctrl-C reaches the whole process group: the model process leads the drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return asyncio.run(run(args[0], int(args[1]), int(args[2])))


if __name__ == "__main__":
    sys.exit(main())
