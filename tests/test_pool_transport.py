"""One transport stack: the pool over any mix of gRPC targets and HTTP /predict URLs, shared by threads,
with per-call deadlines that change nothing shared, and retries that wait as long as the server asked
(`google.rpc.RetryInfo` on gRPC, `Retry-After` on HTTP) but never past the call's deadline."""

from __future__ import annotations

import io
import json
import ssl
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
import torch
from flux2_client.endpoints import EncoderPool, RetryPolicy
from flux2_client.remote import RemoteEncoderError
from flux2_encoder_server.testing import ServerThread, local_settings
from flux2split_proto import codec, shared
from flux2split_proto.v1 import encoder_pb2 as pb
from flux2split_proto.v1 import encoder_pb2_grpc as pb_grpc

FINGERPRINT = pb.ModelFingerprint(weights_id="scripted", digest="d" * 64, dtype=pb.DTYPE_BFLOAT16, max_length=4)
QUICK = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.02, cooldown=30.0, deadline=30.0)


def rows_for(prompts: list[str]) -> torch.Tensor:
    """What the scripted servers answer: one distinct (4, 8) bf16 row per prompt."""
    return torch.stack([torch.full((4, 8), float(len(p)), dtype=torch.bfloat16) for p in prompts])


class BusyThenServe:
    """The scripted behaviour both fakes share: refuse the first `busy` calls with a suggested delay,
    then answer; records when each call arrived."""

    def __init__(self, busy: int, delay: float):
        self.busy, self.delay = busy, delay
        self.arrivals: list[float] = []
        self._lock = threading.Lock()

    def refuse(self) -> bool:
        with self._lock:
            self.arrivals.append(time.monotonic())
            return len(self.arrivals) <= self.busy


class ScriptedGrpcService(pb_grpc.TextEncoderServicer):
    def __init__(self, script: BusyThenServe):
        self.script = script

    def Encode(self, request, context):
        if self.script.refuse():
            context.abort_with_status(
                shared.retry_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy, come back later", self.script.delay)
            )
        payload = codec.serialize(rows_for(list(request.prompts)))
        yield pb.EncodeResponse(header=payload.header(fingerprint=FINGERPRINT))
        yield from codec.iter_chunks(payload.data)

    def Info(self, request, context):
        return pb.InfoResponse(fingerprint=FINGERPRINT, embedding_dim=8)


@pytest.fixture
def scripted_grpc():
    def start(script: BusyThenServe) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_TextEncoderServicer_to_server(ScriptedGrpcService(script), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    servers: list[grpc.Server] = []
    yield start
    for server in servers:
        server.stop(0)


@pytest.fixture
def scripted_http():
    def start(script: BusyThenServe, tls: ssl.SSLContext | None = None) -> str:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                prompts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompt"]
                if script.refuse():
                    error = {"error": {"code": "UNAVAILABLE", "message": "busy"}}
                    headers = {"Retry-After": str(script.delay), "Content-Type": "application/json"}
                    return self.reply(503, json.dumps(error).encode(), headers)
                buffer = io.BytesIO()
                torch.save(rows_for([prompts] if isinstance(prompts, str) else prompts), buffer)
                return self.reply(200, buffer.getvalue(), {shared.FINGERPRINT_HEADER: FINGERPRINT.digest})

            def do_GET(self):
                info = {"fingerprint": shared.fingerprint_to_dict(FINGERPRINT), "embedding_dim": 8, "limits": {}}
                return self.reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}/predict"

    servers: list[ThreadingHTTPServer] = []
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_retry_waits_the_delay_the_server_suggested(transport, scripted_grpc, scripted_http):
    script = BusyThenServe(busy=1, delay=0.6)
    target = (scripted_grpc if transport == "grpc" else scripted_http)(script)
    with EncoderPool([target], retry=QUICK) as pool:
        result = pool.encode(["a", "bbb"])
    assert torch.equal(result.prompt_embeds, rows_for(["a", "bbb"]))
    assert result.fingerprint.digest == FINGERPRINT.digest
    first, second = script.arrivals
    # The pool's own backoff is 10-20 ms: only the server's suggestion explains this wait.
    assert second - first >= 0.6
    assert pool.stats.failovers == 1


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_suggested_delay_past_the_deadline_fails_at_once(transport, scripted_grpc, scripted_http):
    script = BusyThenServe(busy=10, delay=30.0)
    target = (scripted_grpc if transport == "grpc" else scripted_http)(script)
    with EncoderPool([target], retry=QUICK) as pool:
        started = time.monotonic()
        with pytest.raises(RemoteEncoderError) as err:
            pool.encode("a", timeout=5.0)
        elapsed = time.monotonic() - started
    assert err.value.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
    assert err.value.retry_after == pytest.approx(30.0)
    assert len(script.arrivals) == 1  # not asked again before the time it named
    assert elapsed < 2.0  # and not slept on a wait that cannot fit in the deadline


def test_other_servers_serve_while_one_asks_for_a_delay(scripted_grpc):
    busy = BusyThenServe(busy=10, delay=30.0)
    ready = BusyThenServe(busy=0, delay=0.0)
    targets = [scripted_grpc(busy), scripted_grpc(ready)]
    no_cooldown = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.02, cooldown=0.0, deadline=30.0)
    with EncoderPool(targets, retry=no_cooldown) as pool:  # only the server's own delay keeps it aside
        for _ in range(4):
            assert torch.equal(pool.encode("abc", timeout=10.0).prompt_embeds, rows_for(["abc"]))
    assert len(busy.arrivals) == 1  # asked once, then left alone for the 30 s it asked for
    assert len(ready.arrivals) == 4


@pytest.fixture(scope="module")
def grpc_and_http_server(tiny, rows_engine):
    thread = ServerThread(local_settings(str(tiny.pipeline), http_port=0), lambda _s: rows_engine).start()
    yield thread
    thread.stop()


def test_one_pool_over_mixed_targets_shared_by_threads(grpc_and_http_server, rows_engine):
    server = grpc_and_http_server
    targets = [server.target, f"dns:///{server.target}", server.http_url + "/predict"]
    prompts = [f"prompt {i}" for i in range(6)]
    expected = dict(zip(prompts, rows_engine.encode(prompts), strict=True))
    results: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    with EncoderPool(targets, timeout=60, retry=QUICK) as pool:
        encoders = [e.encoder for e in pool._endpoints]
        defaults = [(e.timeout, e.expected_fingerprint) for e in encoders]
        for prompt in prompts[:3]:  # round-robin: each transport answers one
            results[prompt] = pool.encode(prompt).prompt_embeds[0]
        assert pool.stats.served_by == dict.fromkeys(targets, 1)

        def work(prompt: str) -> None:
            try:
                results[prompt] = pool.encode(prompt).prompt_embeds[0]
                # A per-call deadline too short for any server fails this call only.
                with pytest.raises(RemoteEncoderError) as err:
                    pool.encode("hurried", timeout=1e-4)
                assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(prompt,)) for prompt in prompts[3:]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        stats = pool.stats
        assert pool.timeout == 60
        assert [(e.timeout, e.expected_fingerprint) for e in encoders] == defaults  # nothing shared changed
    assert not errors, errors
    assert all(torch.equal(results[p], expected[p]) for p in prompts)
    assert sum(stats.served_by.values()) == len(prompts)  # every success counted, under concurrency too


def test_pool_info_is_the_same_over_grpc_and_http(grpc_and_http_server, rows_engine):
    server = grpc_and_http_server
    with EncoderPool([server.target]) as over_grpc, EncoderPool([server.http_url]) as over_http:
        a, b = over_grpc.info(), over_http.info()
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint.digest == rows_engine.fingerprint.digest
    assert a.embedding_dim == b.embedding_dim == rows_engine.embedding_dim
    assert a.limits.max_prompts_per_request == b.limits.max_prompts_per_request > 0
    assert a.batching_mode == b.batching_mode == pb.BATCHING_MODE_REPRODUCIBLE


def test_pool_speaks_mutual_tls_to_an_https_predict_url(scripted_http, certs):
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(certs["server_cert"], certs["server_key"])
    tls.load_verify_locations(certs["ca"])
    tls.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no client certificate, no connection
    url = scripted_http(BusyThenServe(busy=0, delay=0.0), tls)
    ca = certs["ca"].read_bytes()
    pair = {
        "client_certificate": certs["client_cert"].read_bytes(),
        "client_private_key": certs["client_key"].read_bytes(),
    }
    with EncoderPool([url], retry=QUICK, root_certificates=ca, **pair) as pool:
        assert torch.equal(pool.encode(["over", "mTLS"]).prompt_embeds, rows_for(["over", "mTLS"]))
    with EncoderPool([url], retry=QUICK, root_certificates=ca) as no_cert, pytest.raises(RemoteEncoderError) as err:
        no_cert.encode("no client certificate", timeout=5)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ValueError, match="use https://"):
        EncoderPool([url.replace("https://", "http://")], root_certificates=ca)
