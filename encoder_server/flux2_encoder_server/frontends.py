"""The model process's side of `--frontends N` (docs/design.md#architecture, "Front-end processes").

`FrontendSupervisor` starts N front-end processes (`python -m flux2_encoder_server.frontend`, through
`subprocess.Popen`: never a fork of a process that may hold CUDA), listens for them on a Unix socket in a
private 0700 directory, restarts one that dies (with a back-off), and serves their requests over the one
`EncoderCore` of the server: each request a front-end opens becomes a real `RequestScope` here, so
authentication, the per-token limits, the in-flight bytes, the cache, the batchers, the metrics, the access
log and the drain are exactly today's. An answer is copied once into the response ring (`ipc.ResponseRing`,
shared memory) and only its offset travels over the socket; its region is freed when the front-end says
the request is done, or when that front-end's socket closes (it died or was killed): nothing else frees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import RateLimited, ResourceExhausted, ServiceError
from .ipc import ResponseRing, read_frame, write_frame
from .logs import resolve_log_format
from .upsample import UpsampleSpec

if TYPE_CHECKING:
    from .core import EncoderCore, RequestScope
    from .settings import Settings

log = logging.getLogger(__name__)

__all__ = ["FrontendStartError", "FrontendSupervisor", "core_state", "settings_message"]

#: Counters a front-end may relay (what grpc_service.py / http_app.py bump on the core's metrics directly).
RELAYED_COUNTERS = ("rejected", "dropped")
#: How long a front-end may take to bind its ports and say it is ready.
_START_TIMEOUT_S = 60.0
#: Restart back-off: the first restart is at once-ish, then doubling up to the cap; reset after a long life.
_BACKOFF_S = (0.1, 5.0)
_STABLE_S = 30.0


class FrontendStartError(RuntimeError):
    """A front-end process could not start (its own log line says why)."""


def settings_message(settings: Settings) -> dict[str, Any]:
    """The settings a front-end process runs with: every field but the secrets (authentication happens in
    the model process; front-ends get the tokens' digests only, for Info and reflection)."""
    out = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    out["auth_tokens"] = None
    out["auth_tokens_file"] = None
    out["log_format"] = resolve_log_format(settings.log_format, sys.stderr)
    return out


def core_state(core: EncoderCore) -> dict[str, Any]:
    """What the front-ends answer Info, /info and health from (sent again whenever it changes)."""
    models = {}
    for name, hosted in core.models.items():
        fp = hosted.fingerprint
        limits = hosted.upsample_limits
        models[name] = {
            "is_default": hosted.is_default,
            "fingerprint": None if fp is None else dataclasses.asdict(fp),
            "embedding_dim": hosted.embedding_dim,
            "max_batch_prompts": hosted.max_batch_prompts,
            "max_queued_requests": hosted.max_queued_requests,
            "upsample_limits": None if limits is None else dataclasses.asdict(limits),
            "ready": core.model_ready(name),
        }
    return {"default_model": core.default_model, "models": models, "ready": core.ready, "live": core.live}


def error_message(rid: int, exc: ServiceError) -> dict[str, Any]:
    """A ServiceError as it crosses to a front-end, which raises the same class again (`remote_core`)."""
    return {
        "t": "error",
        "id": rid,
        "class": type(exc).__name__,
        "message": str(exc),
        "retry_after_s": exc.retry_after_s,
        "limit": exc.limit if isinstance(exc, RateLimited) else None,
    }


@dataclass
class _Request:
    """One request a front-end opened, as this process tracks it until the front-end says it is done."""

    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    busy: bool = False  # encoding or upsampling: a "done" now cancels the work (client gone)
    task: asyncio.Task | None = None
    #: The answer's ring region and the copy filling it (freed only once the copy is over).
    region: int | None = None
    copy: asyncio.Future | None = None


class _Connection:
    """One front-end process's socket and the requests it has open."""

    def __init__(self, supervisor: FrontendSupervisor, index: int, writer: asyncio.StreamWriter):
        self.supervisor = supervisor
        self.index = index
        self.writer = writer
        self.requests: dict[int, _Request] = {}
        self.ready = asyncio.Event()

    def send(self, header: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            write_frame(self.writer, header)

    def deliver_done(self, rid: int, message: dict[str, Any]) -> None:
        entry = self.requests.get(rid)
        if entry is None:
            return
        entry.inbox.put_nowait(message)
        if entry.busy and entry.task is not None:
            entry.task.cancel()

    def lost(self) -> None:
        """The socket closed: every open request of this front-end ends CANCELLED, its region freed."""
        for rid in list(self.requests):
            self.deliver_done(rid, {"t": "done", "status": "CANCELLED", "error": "the front-end process went away"})


class FrontendSupervisor:
    """Starts and keeps `settings.frontends` front-end processes; serves their requests over `core`."""

    def __init__(self, core: EncoderCore, settings: Settings, port: int, http_port: int | None):
        self.core = core
        self.settings = settings
        self.port = port
        self.http_port = http_port
        self.ring = ResponseRing(settings.max_inflight_bytes)
        self.ring_registered = self.ring.register_with_cuda()
        self.restarts = 0
        self._dir = tempfile.mkdtemp(prefix="flux2-frontends-")  # 0700: only this user reaches the socket
        self.socket_path = os.path.join(self._dir, "model.sock")
        self._server: asyncio.AbstractServer | None = None
        self._procs: list[subprocess.Popen | None] = [None] * settings.frontends
        self._conns: list[_Connection | None] = [None] * settings.frontends
        self._monitors: list[asyncio.Task] = []
        self._handlers: set[asyncio.Task] = set()
        self._stopping = False
        self._state: dict[str, Any] | None = None
        metrics = core.metrics
        metrics.track(metrics.frontend_processes, lambda: sum(c is not None for c in self._conns))
        metrics.track(metrics.response_ring_used_bytes, lambda: self.ring.used_bytes)

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every front-end and wait until each has bound its ports (on failure, stop those started)."""
        try:
            await self._start()
        except BaseException:
            await self.stop(0)
            raise

    async def _start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, path=self.socket_path)
        os.chmod(self.socket_path, 0o600)
        for index in range(self.settings.frontends):
            self._spawn(index)
        deadline = time.monotonic() + _START_TIMEOUT_S
        for index in range(self.settings.frontends):
            while (conn := self._conns[index]) is None or not conn.ready.is_set():
                proc = self._procs[index]
                if proc is not None and proc.poll() is not None:
                    raise FrontendStartError(f"front-end process {index} exited with code {proc.returncode}")
                if time.monotonic() > deadline:
                    raise FrontendStartError(f"front-end process {index} did not start in {_START_TIMEOUT_S:.0f}s")
                await asyncio.sleep(0.02)
        self._monitors = [asyncio.create_task(self._monitor(i)) for i in range(self.settings.frontends)]

    def _spawn(self, index: int) -> None:
        cmd = [sys.executable, "-m", "flux2_encoder_server.frontend", self.socket_path, str(self.ring.fd), str(index)]
        self._procs[index] = subprocess.Popen(cmd, pass_fds=(self.ring.fd,), stdin=subprocess.DEVNULL)

    async def _monitor(self, index: int) -> None:
        """Restart front-end `index` whenever it exits, with a back-off while it keeps dying."""
        delay = _BACKOFF_S[0]
        while not self._stopping:
            proc = self._procs[index]
            assert proc is not None
            started = time.monotonic()
            code = await _exited(proc)
            if self._stopping:
                return
            self.restarts += 1
            self.core.metrics.frontend_restarts.inc()
            delay = _BACKOFF_S[0] if time.monotonic() - started > _STABLE_S else min(delay * 2, _BACKOFF_S[1])
            log.warning("front-end process %d exited with code %s; restarting in %.1fs", index, code, delay)
            await asyncio.sleep(delay)
            if not self._stopping:
                self._spawn(index)

    async def stop(self, grace: float) -> None:
        """Tell every front-end to stop (`grace` seconds for what it still sends), wait for them, clean up."""
        self._stopping = True
        for conn in self._conns:
            if conn is not None:
                conn.send({"t": "stop", "grace": grace})
        for index, proc in enumerate(self._procs):
            if proc is None:
                continue
            try:
                await asyncio.wait_for(_exited(proc), grace + 5.0)
            except TimeoutError:
                log.warning("front-end process %d did not stop; killing it", index)
                proc.kill()
                await _exited(proc)
        for task in self._monitors:
            task.cancel()
        if self._server is not None:
            self._server.close()
        for conn in self._conns:  # normally gone with their processes already
            if conn is not None:
                conn.lost()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._handlers, return_exceptions=True), 5.0)
        shutil.rmtree(self._dir, ignore_errors=True)

    def publish_state(self) -> None:
        """Send the core's state to every front-end when it changed (health, models, fingerprints)."""
        state = core_state(self.core)
        if state == self._state:
            return
        self._state = state
        for conn in self._conns:
            if conn is not None:
                conn.send({"t": "state", **state})

    # -- one front-end's socket -----------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn: _Connection | None = None
        try:
            hello, _ = await read_frame(reader)
            index = int(hello.get("index", -1))
            if hello["t"] != "hello" or not 0 <= index < len(self._conns):
                writer.close()
                return
            conn = _Connection(self, index, writer)
            write_frame(writer, self._setup_message())
            while True:
                message, attachments = await read_frame(reader)
                self._dispatch(conn, message, attachments)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("front-end connection failed")
        finally:
            if conn is not None:
                conn.lost()
                if self._conns[conn.index] is conn:
                    self._conns[conn.index] = None
            writer.close()

    def _setup_message(self) -> dict[str, Any]:
        authenticator = self.core.authenticator
        return {
            "t": "setup",
            "settings": settings_message(self.settings),
            "token_digests": [[digest.hex(), principal.name] for digest, principal in authenticator.digests],
            "ring_size": self.ring.size,
            "port": self.port,
            "http_port": self.http_port,
            "state": core_state(self.core),
        }

    def _dispatch(self, conn: _Connection, message: dict[str, Any], attachments: list[bytes]) -> None:
        kind = message["t"]
        if kind == "ready":
            self._conns[conn.index] = conn
            conn.ready.set()
            self._state = None
            self.publish_state()
        elif kind == "open":
            rid = int(message["id"])
            entry = _Request()
            conn.requests[rid] = entry
            entry.task = asyncio.create_task(self._serve(conn, rid, entry, message))
            self._handlers.add(entry.task)
            entry.task.add_done_callback(self._handlers.discard)
        elif kind in ("encode", "upsample"):
            request = conn.requests.get(int(message["id"]))
            if request is not None:
                request.inbox.put_nowait((message, attachments))
        elif kind == "done":
            conn.deliver_done(int(message["id"]), message)
        elif kind == "state?":  # a health probe: the state at the moment of the call
            conn.send({"t": "state", "id": message["id"], **core_state(self.core)})
        elif kind == "metric" and message.get("name") in RELAYED_COUNTERS:
            counter = getattr(self.core.metrics, message["name"])
            counter.labels(*[str(v) for v in message["labels"]]).inc(float(message.get("value", 1)))

    # -- one request ----------------------------------------------------------------------------------------
    async def _serve(self, conn: _Connection, rid: int, entry: _Request, opened: dict[str, Any]) -> None:
        scope = self.core.request(
            str(opened["frontend"]),
            request_id=opened.get("request_id"),
            bearer_token=opened.get("token"),
            model=str(opened.get("model") or ""),
        )
        opened.pop("token", None)
        scope.process = conn.index
        try:
            try:
                await scope.__aenter__()
            except ServiceError as exc:  # the scope has counted and logged it
                conn.send(error_message(rid, exc))
                return
            conn.send({"t": "opened", "id": rid, "request_id": scope.request_id})
            message = await entry.inbox.get()
            if isinstance(message, tuple):  # encode or upsample
                work, attachments = message
                entry.busy = True
                try:
                    if work["t"] == "encode":
                        await self._encode(conn, rid, entry, scope, work, attachments)
                    else:
                        await self._upsample(conn, rid, scope, work, attachments)
                except ServiceError as exc:
                    conn.send(error_message(rid, exc))
                except asyncio.CancelledError:
                    pass  # the front-end said done (client gone) or its socket closed: the done is queued
                except Exception as exc:  # a bug: this request fails, the server carries on
                    log.exception("request %s failed", scope.request_id)
                    conn.send(error_message(rid, ServiceError(f"internal error: {type(exc).__name__}")))
                entry.busy = False
                message = await entry.inbox.get()
            self._finish(scope, message)
        except asyncio.CancelledError:  # the supervisor is stopping
            scope.end("CANCELLED", "the server stopped")
        finally:
            conn.requests.pop(rid, None)
            if entry.copy is not None:
                with contextlib.suppress(Exception):
                    await entry.copy  # never free a region a copy is still writing
            if entry.region is not None:
                self.ring.free(entry.region)

    async def _encode(
        self,
        conn: _Connection,
        rid: int,
        entry: _Request,
        scope: RequestScope,
        work: dict[str, Any],
        attachments: list[bytes],
    ) -> None:
        spec = _upsample_spec(work["upsample"], attachments) if work.get("upsample") is not None else None
        result = await scope.encode(
            work["prompts"],
            expected_fingerprint=work.get("expected_fingerprint") or "",
            timeout=work.get("timeout"),
            bypass_cache=bool(work.get("bypass_cache")),
            field=str(work.get("field") or "prompts"),
            upsample=spec,
        )
        embeds = result.embeds
        region = await self.ring.alloc_waiting(embeds.numel() * embeds.element_size(), self.settings.send_timeout_s)
        if region is None:
            raise ResourceExhausted("server busy: the response ring has no free run long enough for this answer")
        entry.region = region
        # The copy runs in a thread and is shielded: a cancellation waits for it before the region is freed.
        entry.copy = asyncio.ensure_future(asyncio.to_thread(self.ring.write, region, embeds))
        await asyncio.shield(entry.copy)
        fp = result.fingerprint
        upsampled = result.upsampled
        conn.send(
            {
                "t": "result",
                "id": rid,
                "offset": region,
                "dtype": str(embeds.dtype).removeprefix("torch."),
                "shape": list(embeds.shape),
                "cache_hit": result.cache_hit,
                "model": result.model,
                "digest": None if fp is None else fp.digest,
                "upsampled": None if upsampled is None else dataclasses.asdict(upsampled),
                "queue_s": result.queue_seconds,
                "encode_s": result.encode_seconds,
            }
        )

    async def _upsample(
        self, conn: _Connection, rid: int, scope: RequestScope, work: dict[str, Any], attachments: list[bytes]
    ) -> None:
        spec = _upsample_spec(work["spec"], attachments)
        upsampled = await scope.upsample(work["prompts"], spec, timeout=work.get("timeout"), field=str(work["field"]))
        conn.send({"t": "upsampled", "id": rid, **dataclasses.asdict(upsampled)})

    def _finish(self, scope: RequestScope, done: dict[str, Any]) -> None:
        """Close the scope with what the front-end reported: its admission is released, the access-log
        line written, the request counted."""
        metrics = self.core.metrics
        sent = int(done.get("bytes_sent") or 0)
        if sent:
            scope.add_bytes_sent(sent)
        for name, seconds in (done.get("stages") or {}).items():
            if name in ("serialize", "send"):
                scope.stages[name] = scope.stages.get(name, 0.0) + float(seconds)
                metrics.stage_seconds.labels(name, scope.model).observe(float(seconds))
        if done.get("send_timeout"):
            metrics.dropped.labels("send_timeout", scope.model).inc()
        status = str(done.get("status") or "INTERNAL")
        scope.end(status, None if status == "OK" else str(done.get("error") or ""))


async def _exited(proc: subprocess.Popen) -> int:
    """Wait for `proc` to exit without holding a thread (a pidfd on the event loop; polling where there is
    none): the default executor's few threads are for the ring copies and the core's file reads."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3, or already reaped
        while proc.poll() is None:
            await asyncio.sleep(0.1)
        return proc.returncode
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(pidfd, on_exit)
    try:
        await readable
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return proc.wait()


def _upsample_spec(spec: dict[str, Any], images: list[bytes]) -> UpsampleSpec:
    return UpsampleSpec(
        temperature=spec.get("temperature"),
        max_new_tokens=int(spec.get("max_new_tokens") or 0),
        seed=spec.get("seed"),
        images=images,
        images_per_prompt=[int(c) for c in spec.get("images_per_prompt") or ()],
    )
