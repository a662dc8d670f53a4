"""`--frontends N`: gRPC and HTTP served by front-end processes over the model process's core, answers
through the shared response ring (docs/design.md#architecture, "Front-end processes").

Real server processes, started as `flux2-encoder-server serve` starts them (the `_SERVE_FAKE` of
test_server_operations.py, over a FakeEngine): one shared by the tests that can share it, one for SIGTERM.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from flux2_client.demo import wait_serving
from flux2_encoder_server.ipc import ResponseRing, RingTooSmall
from flux2_encoder_server.testing import FakeEngine
from flux2split_proto import codec
from flux2split_proto.v1 import encoder_pb2 as pb
from flux2split_proto.v1 import encoder_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TOKEN = "frontends-test-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)

_SERVE_FAKE = """
import asyncio, sys
from flux2_encoder_server.logs import configure_logging
from flux2_encoder_server.server import serve
from flux2_encoder_server.settings import Settings
from flux2_encoder_server.testing import FakeEngine
ms = float(sys.argv[1])
settings = Settings.from_cli(sys.argv[2:], {})
configure_logging(settings.log_level, settings.log_format)
asyncio.run(serve(settings, lambda _s: FakeEngine(device_ms_per_prompt=ms, distinct_rows=None)))
"""


#: The same, with a stand-in upsampler on the engine ("<prompt> (upsampled <seed>)"), as `--upsampling` attaches
#: the real one: what crosses the front-end is the subject, not the text (tests/test_upsample.py has that).
_SERVE_FAKE_UPSAMPLING = _SERVE_FAKE.replace(
    "asyncio.run(serve(settings, lambda _s: FakeEngine(device_ms_per_prompt=ms, distinct_rows=None)))",
    """from flux2_encoder_server.upsample import Upsampled
class EchoUpsampler:
    supports_images = False
    def generate(self, job, should_stop=lambda: False):
        texts = [f"{p} (upsampled {job.seed})" for p in job.prompts]
        return Upsampled(texts, job.seed, [1] * len(texts))
def engine(_s):
    fake = FakeEngine(device_ms_per_prompt=ms, distinct_rows=None)
    fake.upsampler = EchoUpsampler()
    return fake
asyncio.run(serve(settings, engine))""",
)


class Server:
    """A `--frontends 2` server process and where it listens (with `root_certificates`: a TLS server)."""

    def __init__(
        self,
        log_path: Path,
        device_ms: float,
        *flags: str,
        script: str = _SERVE_FAKE,
        root_certificates: bytes | None = None,
    ):
        self.log_path = log_path
        args = ["--model", "fake", "--device", "cpu", "--host", "127.0.0.1", "--port", "0", "--http-port", "0"]
        args += ["--metrics-port", "0", "--metrics-host", "127.0.0.1", "--no-warmup", "--cache-bytes", "0"]
        args += ["--log-format", "json", "--frontends", "2", "--max-inflight-bytes", str(64 << 20), *flags]
        with log_path.open("w") as log:
            cmd = [sys.executable, "-c", script, str(device_ms), *args]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.proc.stdout is not None
        lines = [self.proc.stdout.readline() for _ in range(3)]
        text = "".join(lines)
        found = {
            key: re.search(pattern, text)
            for key, pattern in (("grpc", r"listening on (\S+)\n"), ("metrics", r"metrics on (\S+)\n"))
        }
        http = re.search(r"HTTPS? /predict on (\S+)\n", text)
        assert found["grpc"] and found["metrics"] and http, text + log_path.read_text()
        self.target = found["grpc"].group(1)
        self.metrics_url = found["metrics"].group(1)
        self.http = f"{'https' if http.group(0).startswith('HTTPS') else 'http'}://{http.group(1)}"
        credentials = grpc.ssl_channel_credentials(root_certificates) if root_certificates is not None else None
        wait_serving(self.target, self.proc, timeout=60, credentials=credentials)

    def metric(self, name: str) -> float:
        text = httpx.get(self.metrics_url, timeout=10).text
        found = re.search(rf"^flux2_encoder_{name} (\S+)$", text, re.MULTILINE)
        assert found, name
        return float(found.group(1))

    def wait_metric(self, name: str, value: float, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.metric(name) != value:
            assert time.monotonic() < deadline, f"{name} = {self.metric(name)}, expected {value}"
            time.sleep(0.05)

    def frontend_pids(self) -> dict[int, int]:
        """{front-end index: pid} from the model process's children."""
        out = {}
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for pid in children:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"flux2_encoder_server.frontend" in cmdline:
                out[int(cmdline[-2])] = int(pid)
        return out

    def access_lines(self) -> list[dict]:
        lines = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]
        return [line for line in lines if line["logger"] == "flux2_encoder_server.access"]

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert found
        return int(found.group(1)) * 1024

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory):
    server = Server(
        tmp_path_factory.mktemp("frontends") / "server.log",
        2.0,
        "--auth-tokens",
        f"test:{TOKEN}",
        "--chunk-bytes",
        str(64 << 10),
        "--grace-period-s",
        "60",
    )
    yield server
    server.close()


ALONE = FakeEngine(distinct_rows=None)


def _channel(target: str) -> grpc.Channel:
    """A channel with a TCP connection of its own: gRPC shares one connection between the channels of a
    process by default, and SO_REUSEPORT spreads connections, not calls, over the front-end processes."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _encode(channel: grpc.Channel, prompts: list[str], request_id: str = "", token: str | None = TOKEN) -> torch.Tensor:
    """One Encode, assembled and checked (sha256, length) by the client's codec."""
    stub = pb_grpc.TextEncoderStub(channel)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    stream = stub.Encode(pb.EncodeRequest(prompts=prompts, request_id=request_id), metadata=metadata, timeout=60)
    return codec.assemble(stream)[1]


def _http_predict(base: str, prompts: list[str], token: str | None = TOKEN, path: str = "/predict") -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(base + path, json={"prompt": prompts}, headers=headers, timeout=30)


# -- 1. bytes -----------------------------------------------------------------------------------------------


def test_answers_through_frontends_are_the_engines_rows(shared: Server):
    failures: list[str] = []

    def grpc_client(worker: int) -> None:
        with _channel(shared.target) as channel:
            for i in range(4):
                prompts = [f"grpc {worker} {i}", f"shared {i}"]
                if not torch.equal(_encode(channel, prompts), ALONE.encode(prompts)):
                    failures.append(f"grpc {prompts}")

    def http_client(worker: int) -> None:
        for i in range(4):
            prompts = [f"http {worker} {i}"]
            response = _http_predict(shared.http, prompts)
            if response.status_code != 200 or not torch.equal(
                torch.load(io.BytesIO(response.content)), ALONE.encode(prompts)
            ):
                failures.append(f"http {prompts}: {response.status_code}")

    threads = [threading.Thread(target=grpc_client, args=(w,)) for w in range(8)]
    threads += [threading.Thread(target=http_client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    served_by = {line.get("frontend_process") for line in shared.access_lines() if line["status"] == "OK"}
    assert served_by == {0, 1}  # 12 connections spread by the kernel (all on one: p = 2**-11)
    shared.wait_metric("response_ring_used_bytes", 0)


# -- TLS and upsampling through the front-ends ----------------------------------------------------------------


def test_tls_and_upsampling_through_frontends(tmp_path: Path, certs: dict[str, Path]):
    """Each front-end process serves TLS with the server's own certificate (a plaintext client is refused),
    and an Upsample call, and Encode's upsample option (rewritten prompt and its rows through the ring), pass
    through a front-end unchanged."""
    from flux2_client.encoder import RemoteEncoderError, UpsampleOptions
    from flux2_client.remote import RemoteTextEncoder

    ca = certs["ca"].read_bytes()
    tls = ["--tls-cert", str(certs["server_cert"]), "--tls-key", str(certs["server_key"]), "--upsampling"]
    server = Server(tmp_path / "tls.log", 0.0, *tls, script=_SERVE_FAKE_UPSAMPLING, root_certificates=ca)
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    try:
        for i in range(12):  # 12 connections: both front-end processes serve TLS (all on one: p = 2**-11)
            with RemoteTextEncoder(server.target, root_certificates=ca, channel_options=own_connection) as enc:
                assert torch.equal(enc.encode([f"over TLS {i}"]).prompt_embeds, ALONE.encode([f"over TLS {i}"]))
        with RemoteTextEncoder(server.target, root_certificates=ca, channel_options=own_connection) as enc:
            options = UpsampleOptions(seed=7, max_new_tokens=8)
            assert list(enc.upsample(["a fox"], options).prompts) == ["a fox (upsampled 7)"]
            both = enc.encode(["a fox"], upsample=options)
            assert both.upsampled_prompts == ("a fox (upsampled 7)",)
            assert torch.equal(both.prompt_embeds, ALONE.encode(["a fox (upsampled 7)"]))
        with RemoteTextEncoder(server.target, timeout=5) as plaintext, pytest.raises(RemoteEncoderError):
            plaintext.encode("plaintext to a TLS port")
        assert server.http.startswith("https://")  # /predict is HTTPS with the same certificate
        verify = ssl.create_default_context(cafile=str(certs["ca"]))
        answer = httpx.post(server.http + "/predict", json={"prompt": ["https"]}, verify=verify, timeout=30)
        assert answer.status_code == 200
        assert torch.equal(torch.load(io.BytesIO(answer.content)), ALONE.encode(["https"]))
        served_by = {line.get("frontend_process") for line in server.access_lines() if line["status"] == "OK"}
        assert served_by == {0, 1}
        server.wait_metric("response_ring_used_bytes", 0)
    finally:
        server.close()
    assert server.proc.returncode == 0


# -- 5. bad input, unknown model, auth ----------------------------------------------------------------------


def test_errors_keep_their_status_through_a_frontend(shared: Server):
    with grpc.insecure_channel(shared.target) as channel:
        stub = pb_grpc.TextEncoderStub(channel)
        cases = [
            (
                pb.EncodeRequest(prompts=["x"] * 65),
                AUTH,
                grpc.StatusCode.INVALID_ARGUMENT,
                "prompts: 65 prompts exceed",
            ),
            (pb.EncodeRequest(prompts=["x"], model="nope"), AUTH, grpc.StatusCode.NOT_FOUND, "model: 'nope' is not"),
            (pb.EncodeRequest(prompts=["x"]), None, grpc.StatusCode.UNAUTHENTICATED, "missing bearer token"),
        ]
        for request, metadata, code, message in cases:
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Encode(request, metadata=metadata, timeout=10))
            assert caught.value.code() == code and caught.value.details().startswith(message), caught.value
        with pytest.raises(grpc.RpcError) as caught:  # upsampling crosses to the model process too
            stub.Upsample(pb.UpsampleRequest(prompts=["x"]), metadata=AUTH, timeout=10)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (
            caught.value.details() == "upsampling: this server does not upsample prompts (start it with --upsampling)"
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.Info(pb.InfoRequest(), timeout=10)  # front-end authenticates from the tokens' digests
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Info(pb.InfoRequest(), metadata=AUTH, timeout=10).default_model == "default"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    bad = _http_predict(shared.http, [1])  # type: ignore[list-item]
    assert (bad.status_code, bad.json()["error"]["message"]) == (400, "prompt[0]: expected a string, got int")
    unknown = _http_predict(shared.http, ["x"], path="/models/nope/predict")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "NOT_FOUND"
    assert _http_predict(shared.http, ["x"], token=None).status_code == 401
    assert httpx.get(shared.http + "/info", timeout=10).status_code == 401
    assert httpx.get(shared.http + "/info", headers={"authorization": f"Bearer {TOKEN}"}, timeout=10).status_code == 200
    assert httpx.get(shared.http + "/health", timeout=10).json() == {"status": "SERVING"}
    log = shared.log_path.read_text()
    assert "UNAUTHENTICATED" in log and TOKEN not in log


# -- 4. no leak after cancelled requests -------------------------------------------------------------------


def _http_cancel(base: str, prompt: str, after_body_bytes: int) -> None:
    """POST /predict on a raw socket, then close: after `after_body_bytes` of the body, or (0) at once."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"prompt": [prompt]}).encode()
    head = (
        f"POST /predict HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {TOKEN}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        received = b""
        while after_body_bytes and len(received.partition(b"\r\n\r\n")[2]) < after_body_bytes:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST: gone mid-body


def test_cancelled_requests_leave_no_ring_bytes_behind(shared: Server):
    rss_before = shared.rss_bytes()

    def grpc_worker(worker: int, count: int) -> None:
        with _channel(shared.target) as channel:
            stub = pb_grpc.TextEncoderStub(channel)
            for i in range(count):
                call = stub.Encode(pb.EncodeRequest(prompts=[f"cancel {worker} {i}"]), metadata=AUTH, timeout=30)
                if i % 2:
                    next(call)  # the header has arrived: the answer sits in the ring
                call.cancel()

    def http_worker(worker: int, count: int) -> None:
        for i in range(count):
            _http_cancel(shared.http, f"http cancel {worker} {i}", 1000 if i % 2 else 0)

    threads = [threading.Thread(target=grpc_worker, args=(w, 100)) for w in range(6)]
    threads += [threading.Thread(target=http_worker, args=(w, 100)) for w in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - started
    shared.wait_metric("inflight_requests", 0)
    shared.wait_metric("response_ring_used_bytes", 0)
    shared.wait_metric("inflight_bytes", 0)
    rss_after = shared.rss_bytes()
    cancelled = shared.metric('requests_total{code="CANCELLED",frontend="grpc",model="default"}')
    print(
        f"\n1000 cancelled requests in {elapsed:.1f}s; model process RSS {rss_before / 2**20:.1f} MiB -> "
        f"{rss_after / 2**20:.1f} MiB ({(rss_after - rss_before) / 2**20:+.1f} MiB); gRPC CANCELLED {cancelled:.0f}"
    )
    assert rss_after - rss_before < 96 << 20


# -- 2. a front-end killed mid-load -----------------------------------------------------------------------


def test_killed_frontend_costs_only_its_own_requests(shared: Server):
    restarts = shared.metric("frontend_restarts_total")
    victim = shared.frontend_pids()[0]
    outcomes: list[tuple[str, float, object]] = []  # (request id, start, tensor or error)
    lock = threading.Lock()
    stop = threading.Event()

    def client(worker: int) -> None:
        i = 0
        while not stop.is_set():
            with _channel(shared.target) as channel:  # a new connection every 10 requests: both processes get some
                for _ in range(10):
                    prompts, rid = [f"kill {worker} {i}"], f"kill-{worker}-{i}"
                    started = time.monotonic()
                    try:
                        result: object = _encode(channel, prompts, rid)
                        assert torch.equal(result, ALONE.encode(prompts))  # type: ignore[arg-type]
                    except (grpc.RpcError, codec.WireError) as exc:
                        result = exc
                    with lock:
                        outcomes.append((rid, started, result))
                    i += 1

    def successes() -> int:
        with lock:
            return sum(not isinstance(o[2], Exception) for o in outcomes)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()

    def served_by(process: int) -> int:
        return sum(
            line.get("frontend_process") == process
            for line in shared.access_lines()
            if line["request_id"].startswith("kill-")
        )

    try:
        while successes() < 20 or not served_by(0) or not served_by(1):
            time.sleep(0.02)
        os.kill(victim, signal.SIGKILL)
        shared.wait_metric("frontend_restarts_total", restarts + 1)
        noticed = time.monotonic()  # the process is gone: new calls go to the other one
        target = successes() + 20
        while successes() < target:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    shared.wait_metric("frontend_processes", 2, timeout=60)  # a fresh Python importing torch, on a busy box
    assert shared.frontend_pids()[0] != victim
    for worker in range(8):  # after the restart, fresh connections (on either process) are answered
        with _channel(shared.target) as channel:
            prompts = [f"after restart {worker}"]
            assert torch.equal(_encode(channel, prompts), ALONE.encode(prompts))
    by_id = {line["request_id"]: line for line in shared.access_lines() if line["request_id"].startswith("kill-")}
    failed = [(rid, start, error) for rid, start, error in outcomes if isinstance(error, Exception)]
    per_process = [sum(line["frontend_process"] == p for line in by_id.values()) for p in (0, 1)]
    print(f"\n{len(outcomes)} requests (by process {per_process}), {len(failed)} failed with the killed front-end")
    for rid, start, error in failed:
        line = by_id.get(rid)
        # Only requests on the killed process fail (the model process logs them CANCELLED, process 0), or
        # ones that never reached the model process at all; none started after the restart.
        assert line is None or (line["frontend_process"] == 0 and line["status"] == "CANCELLED"), (rid, error, line)
        assert start < noticed, (rid, error)
    assert all(line["status"] == "OK" for line in by_id.values() if line["frontend_process"] == 1)
    shared.wait_metric("response_ring_used_bytes", 0)
    shared.wait_metric("inflight_bytes", 0)


# -- the ring's allocator -----------------------------------------------------------------------------------


def test_ring_larger_than_the_memory_is_refused_in_one_line():
    with pytest.raises(RingTooSmall, match=r"--max-inflight-bytes"):
        ResponseRing(1 << 60)


def test_ring_allocator_first_fit_merges_and_waits():
    import asyncio

    ring = ResponseRing(1024)
    a, b, c = ring.alloc(256), ring.alloc(256), ring.alloc(512)
    assert (a, b, c, ring.used_bytes) == (0, 256, 512, 1024) and ring.alloc(1) is None
    ring.free(b)
    assert ring.alloc(512) is None  # 256 free in the middle: fragmented
    ring.free(a)
    assert ring.alloc(512) == 0  # merged with its neighbour
    ring.free(0)
    ring.free(c)
    assert ring.used_bytes == 0 and ring._free == [(0, 1024)]
    tensor = torch.arange(12, dtype=torch.bfloat16).view(3, 4)
    ring.write(ring.alloc(tensor.numel() * 2) or 0, tensor)

    async def waiting() -> tuple[int | None, int | None]:
        big = ring.alloc(1024 - 64)
        later = asyncio.get_running_loop().call_later(0.05, ring.free, big)
        got = await ring.alloc_waiting(512, 2.0)
        later.cancel()
        return got, await ring.alloc_waiting(4096, 0.05)

    assert asyncio.run(waiting()) == (64, None)


# -- 3. SIGTERM drains every process -----------------------------------------------------------------------


def test_sigterm_drains_model_and_frontend_processes(shared: Server):
    """Last in this file: it stops the shared server."""
    server = shared
    frontends = list(server.frontend_pids().values())
    outcomes: list[tuple[float, float, list[str], object, str]] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        with _channel(server.target) as channel:
            for i in range(40):
                prompts, rid = [f"worker {worker} request {i}"], f"w{worker}-r{i}"
                started = time.monotonic()
                try:
                    result: object = _encode(channel, prompts, rid)
                except Exception as exc:
                    result = exc
                with lock:
                    outcomes.append((started, time.monotonic(), prompts, result, rid))
                if isinstance(result, Exception):
                    return

    workers = [threading.Thread(target=client, args=(w,)) for w in range(6)]
    try:
        for w in workers:
            w.start()
        while sum(not isinstance(o[3], Exception) for o in outcomes) < 8:
            assert server.proc.poll() is None
            time.sleep(0.01)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for w in workers:
            w.join(60)
        assert server.proc.wait(60) == 0
    finally:
        server.close()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in frontends):
        assert time.monotonic() < deadline, "front-end processes outlived the server"
        time.sleep(0.05)
    access = [line for line in server.access_lines() if re.fullmatch(r"w\d+-r\d+", line["request_id"])]
    seen = {line["request_id"] for line in access}
    successes = [o for o in outcomes if not isinstance(o[3], Exception)]
    for _, _, prompts, tensor, _ in successes:
        assert torch.equal(tensor, ALONE.encode(prompts))  # type: ignore[arg-type]
    errors = [o for o in outcomes if isinstance(o[3], Exception)]
    assert errors, "requests sent after SIGTERM must be refused"
    for start, _, _, error, rid in errors:
        allowed = {grpc.StatusCode.UNAVAILABLE}
        if start > signalled or rid not in seen:
            allowed.add(grpc.StatusCode.CANCELLED)
        assert isinstance(error, grpc.RpcError) and error.code() in allowed, error
    assert any(start < signalled < end for start, end, _, _, _ in successes)
    assert sum(line["status"] == "OK" for line in access) == len(successes)
    processes = sorted({line["frontend_process"] for line in access if line["status"] == "OK"})
    print(f"\nSIGTERM: {len(successes)} answered OK (through front-end processes {processes}), {len(errors)} refused")
    assert any("draining" in line for line in server.log_path.read_text().splitlines())


def test_remote_core_errors_keep_their_class_and_an_unreachable_model_process_is_not_serving():
    import asyncio

    from flux2_encoder_server.errors import RateLimited, Unavailable
    from flux2_encoder_server.frontends import error_message
    from flux2_encoder_server.remote_core import RemoteCore, service_error
    from flux2_encoder_server.security import TokenAuthenticator
    from flux2_encoder_server.settings import Settings

    limited = service_error(error_message(7, RateLimited("slow down", "rate_limit_prompts_per_s", retry_after_s=2.5)))
    assert type(limited) is RateLimited and (str(limited), limited.limit, limited.retry_after_s) == (
        "slow down",
        "rate_limit_prompts_per_s",
        2.5,
    )

    class Writer:
        def __init__(self) -> None:
            self.frames: list[bytes] = []

        def is_closing(self) -> bool:
            return False

        def write(self, data: bytes) -> None:
            self.frames.append(data)

    state = {"default_model": "default", "ready": True, "live": True, "models": {}}
    model = {"is_default": True, "fingerprint": None, "embedding_dim": 0, "upsample_limits": None, "ready": True}
    state["models"] = {"default": {**model, "max_batch_prompts": 3, "max_queued_requests": 7}}

    async def scenario() -> None:
        core = RemoteCore(Settings(), Writer(), None, TokenAuthenticator({}), state)  # type: ignore[arg-type]
        assert core.ready and core.model_ready("default")
        hosted = core.model("default")  # a model's own limits, as Info and /info report them (--model-setting)
        assert (hosted.max_batch_prompts, hosted.max_queued_requests) == (3, 7)
        opening = asyncio.ensure_future(core.request("grpc").__aenter__())
        await asyncio.sleep(0)
        core.disconnected()  # the model process is gone: waiting requests fail, health NOT_SERVING
        with pytest.raises(Unavailable):
            await opening
        assert not core.ready and not core.live and not core.model_ready("default")
        with pytest.raises(Unavailable):
            await core.request("http").__aenter__()

    asyncio.run(scenario())


def test_a_port_held_by_another_program_is_one_line_naming_the_flag():
    from flux2_encoder_server.server import PortInUseError, reserve_ports
    from flux2_encoder_server.settings import Settings

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        with pytest.raises(PortInUseError, match=rf"^cannot listen on 127\.0\.0\.1:{taken} \(--http-port\): "):
            reserve_ports(Settings(host="127.0.0.1", port=0, http_port=taken, frontends=2))
    grpc_port, http_port = reserve_ports(Settings(host="127.0.0.1", port=0, http_port=0, frontends=2))
    assert grpc_port != http_port and 0 not in (grpc_port, http_port)
