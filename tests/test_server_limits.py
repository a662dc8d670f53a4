"""Limits that hold against clients that stop reading or send slowly (issue 14, items 1-3).

Non-reading clients are raw loopback sockets that send a request and never call recv():
- HTTP: a plain socket with a small receive buffer; uvicorn's send blocks once the socket is full.
- gRPC: raw HTTP/2 (preface, SETTINGS, HEADERS, DATA) and never a WINDOW_UPDATE, so the server may
  send at most the 64 KiB initial flow-control window. A grpc channel whose stream is never iterated is
  no such client: grpc core keeps reading into its own buffers and granting window.
Answers are made large with a FakeEngine of width 1024 (1 MiB per prompt: 512 tokens * 1024 * 2 bytes).
"""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest
import requests
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings, wait_until
from flux2split_proto import SERVICE_NAME
from flux2split_proto.v1 import encoder_pb2 as pb

WIDTH = 1024
PROMPT_BYTES = 512 * WIDTH * 2


def limited_server(**overrides) -> ServerThread:
    engine = FakeEngine(width=WIDTH)
    settings = local_settings(http_port=0, cache_bytes=0, **overrides)
    return ServerThread(settings, lambda _s: engine).start()


def counter(server: ServerThread, name: str, **labels: str) -> float:
    return server.core.metrics.value(f"flux2_encoder_{name}", labels)


# -- clients that never read ---------------------------------------------------------------------------
def _socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small TCP window
    sock.connect(("127.0.0.1", port))
    return sock


def unread_http(server: ServerThread, prompts: int) -> socket.socket:
    """POSTs `prompts` prompts to /predict and never reads the answer."""
    body = json.dumps({"prompt": [f"unread prompt {i}" for i in range(prompts)]}).encode()
    sock = _socket(int(server.http_url.rsplit(":", 1)[1]))
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    return sock


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: str, value: str) -> bytes:
    # HPACK "literal header field without indexing, new name", no Huffman (lengths < 127 here).
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        data += sock.recv(n - len(data))
    return data


def unread_grpc(server: ServerThread, prompts: int) -> socket.socket:
    """Calls Encode over raw HTTP/2 and never reads past the server's SETTINGS (never a WINDOW_UPDATE)."""
    sock = _socket(int(server.target.rsplit(":", 1)[1]))
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b""))
    while True:  # the server's first SETTINGS, to acknowledge it
        header = _read_exact(sock, 9)
        _read_exact(sock, int.from_bytes(header[:3], "big"))
        if header[3] == 4 and not header[4] & 1:
            break
    headers = b"".join(
        _literal(k, v)
        for k, v in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", f"/{SERVICE_NAME}/Encode"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )
    message = pb.EncodeRequest(prompts=[f"unread prompt {i}" for i in range(prompts)]).SerializeToString()
    body = b"\x00" + struct.pack(">I", len(message)) + message
    sock.sendall(_frame(4, 1, 0, b"") + _frame(1, 4, 1, headers) + _frame(0, 1, 1, body))
    return sock


# -- tests -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frontend", ["http", "grpc"])
def test_an_unread_answer_holds_its_reservation_until_the_send_deadline_then_frees_it(frontend):
    send_timeout = 1.5
    server = limited_server(send_timeout_s=send_timeout, max_inflight_bytes=64 * PROMPT_BYTES)
    try:
        sock = (unread_http if frontend == "http" else unread_grpc)(server, 16)
        wait_until(lambda: server.core.inflight_bytes == 16 * PROMPT_BYTES, 10, "the request's admission")
        admitted = time.monotonic()
        time.sleep(send_timeout / 2)
        # Still sending (the client reads nothing): the reservation and the in-flight count are held.
        assert server.core.inflight_bytes == 16 * PROMPT_BYTES
        assert server.core.inflight_requests == 1
        wait_until(lambda: server.core.inflight_bytes == 0, 10, "the reservation's release")
        assert time.monotonic() - admitted < send_timeout + 2
        wait_until(lambda: server.core.inflight_requests == 0, 5, "the request's end")
        assert counter(server, "dropped_total", reason="send_timeout") == 1
        assert counter(server, "requests_total", frontend=frontend, code="DEADLINE_EXCEEDED") == 1
        if frontend == "http":  # the connection is gone: the server cut it (EOF or reset once drained)
            sock.settimeout(5)
            try:
                while sock.recv(1 << 16):
                    pass
            except ConnectionResetError:
                pass
        sock.close()
        # A reader is served normally afterwards.
        answer = requests.post(server.http_url + "/predict", json={"prompt": "a reader"}, timeout=30)
        assert answer.status_code == 200 and len(answer.content) > PROMPT_BYTES
    finally:
        server.stop()


def _half_sent_request(server: ServerThread, declared: int = 100) -> socket.socket:
    sock = _socket(int(server.http_url.rsplit(":", 1)[1]))
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    sock.sendall(head.encode() + b'{"prompt": ')
    return sock


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    return data


def test_a_slow_loris_body_is_cut_at_the_read_timeout_and_does_not_hold_the_drain():
    server = limited_server(http_read_timeout_s=1.0, grace_period_s=30.0)
    try:
        sock = _half_sent_request(server)
        opened = time.monotonic()
        for _ in range(3):  # 1 byte per 0.25 s: the body never completes within the read timeout
            time.sleep(0.25)
            sock.sendall(b" ")
        answer = _read_all(sock, 10)  # the server answers and closes (EOF), well before our 10 s
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
        assert b"http_read_timeout_s=1" in answer
        assert time.monotonic() - opened < 4
        wait_until(lambda: server.core.inflight_requests == 0, 5, "the request's end")
        assert counter(server, "requests_total", frontend="http", code="DEADLINE_EXCEEDED") == 1
        # Drain on SIGTERM does not wait the grace period (30 s) for a half-sent request.
        stalled = _half_sent_request(server)
        wait_until(lambda: server.core.inflight_requests == 1, 5, "the half-sent request's arrival")
        stopping = time.monotonic()
        server.stop(grace=None)
        assert time.monotonic() - stopping < 5
        stalled.close()
        sock.close()
    finally:
        server.stop()


def test_slow_loris_headers_are_cut_at_the_read_timeout_and_do_not_hold_the_drain():
    """uvicorn alone waits for request headers forever (its keep-alive timeout covers only idle connections
    between answers): a connection that sends nothing, one that sends its headers a byte at a time, and a
    kept-alive one whose next request stalls mid-head must each get 408 and be closed."""
    server = limited_server(http_read_timeout_s=1.0, grace_period_s=30.0)
    port = int(server.http_url.rsplit(":", 1)[1])
    try:
        silent = _socket(port)
        trickling = _socket(port)
        trickling.sendall(b"POST /predict HTTP/1.1\r\nHo")
        kept_alive = _socket(port)
        kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        kept_alive.settimeout(5)
        first = b""
        while not first.endswith(b"}"):  # the whole answer (a JSON body), then the next request starts
            first += kept_alive.recv(1 << 16)
        assert first.startswith(b"HTTP/1.1 200 ")
        kept_alive.sendall(b"GET /hea")
        opened = time.monotonic()
        for _ in range(3):  # a byte every 0.25 s: the head never completes within the read timeout
            time.sleep(0.25)
            trickling.sendall(b"s")
            kept_alive.sendall(b"l")
        for sock in (silent, trickling, kept_alive):
            answer = _read_all(sock, 5)  # the server answers and closes (EOF)
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
            assert b"headers: not received within http_read_timeout_s=1" in answer
            sock.close()
        assert time.monotonic() - opened < 3
        assert counter(server, "dropped_total", reason="http_header_timeout") == 3
        assert server.core.inflight_requests == 0  # none of them ever was a request
        # Drain on SIGTERM (the settings' 30 s grace) does not wait for a connection stuck mid-head.
        stalled = _socket(port)
        stalled.sendall(b"POST /predict HTTP/1.1\r\n")
        stopping = time.monotonic()
        server.stop(grace=None)
        assert time.monotonic() - stopping < 5
        stalled.close()
    finally:
        server.stop()


def test_unfinished_http_requests_are_capped_with_503_and_retry_after():
    server = limited_server(http_read_timeout_s=2.0, http_max_concurrent_requests=2)
    try:
        stalled = [_half_sent_request(server) for _ in range(2)]
        wait_until(lambda: server.core.inflight_requests == 2, 5, "two half-sent requests")
        refused = requests.post(server.http_url + "/predict", json={"prompt": "one too many"}, timeout=10)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
        assert "http_max_concurrent_requests=2" in refused.json()["error"]["message"]
        assert counter(server, "rejected_total", limit="http_max_concurrent_requests") == 1
        for sock in stalled:  # the read timeout frees their slots
            assert _read_all(sock, 10).startswith(b"HTTP/1.1 408 ")
            sock.close()
        answer = requests.post(server.http_url + "/predict", json={"prompt": "now there is room"}, timeout=30)
        assert answer.status_code == 200
    finally:
        server.stop()


_RSS_SERVER = """
import sys
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings
settings = local_settings(http_port=0, cache_bytes=0, max_inflight_bytes={limit}, send_timeout_s=60.0,
                          http_max_concurrent_requests=1000, metrics_port=0, metrics_host="127.0.0.1")
engine = FakeEngine(width={width})
server = ServerThread(settings, lambda _s: engine).start()
print(server.target, server.http_url, server.server.metrics_port, flush=True)
sys.stdin.read()  # until the test closes our stdin
server.stop()
"""


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def _scrape(port: int, *names: str) -> float:
    """The sum of the samples whose lines start with any of `names`, from one scrape."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(names))


class _Peer:  # what the helpers above need of a server: its addresses
    def __init__(self, target: str, http_url: str):
        self.target, self.http_url = target, http_url


def test_rss_stays_within_the_inflight_limit_while_32_clients_never_read_and_comes_back():
    """16 HTTP clients and 16 gRPC streams, one after the other, ask for 16 MiB each and never read. The
    server (a subprocess, glibc's mmap threshold fixed at 1 MiB so freed answers go back to the OS) must
    stay within --max-inflight-bytes (64 MiB: four such answers) plus 96 MiB of overhead, 160 MiB in all,
    and come back once they go. Measured: +72 MiB. Before answers were sent inside their reservation,
    each unread HTTP answer (~15 MiB left in the transport's buffer) let the next one in: +271 MiB with
    these 16 (+592 MiB with 40), so 16 clients are enough to fail the old code by a wide margin."""
    import os
    import subprocess
    import sys

    limit, overhead, clients = 64 << 20, 96 << 20, 16
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    code = _RSS_SERVER.format(limit=limit, width=WIDTH)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        target, http_url, metrics = proc.stdout.readline().decode().split()
        peer, metrics_port = _Peer(target, http_url), int(metrics)
        for _ in range(2):  # warm: every code path has run once before the baseline
            answer = requests.post(http_url + "/predict", json={"prompt": [f"w{i}" for i in range(16)]}, timeout=60)
            assert answer.status_code == 200
        del answer
        baseline = _rss(proc.pid)
        socks: list[socket.socket] = []

        def settled() -> bool:  # every request so far refused, or admitted and stuck sending (or done)
            counted = _scrape(metrics_port, "flux2_encoder_requests_total{", "flux2_encoder_inflight_requests ")
            return counted >= 2 + len(socks)

        # One at a time, so each is admitted if the limit allows (all HTTP first: answers that escaped the
        # reservation while being sent would pile up here).
        for open_unread in [unread_http] * clients + [unread_grpc] * clients:
            socks.append(open_unread(peer, 16))  # type: ignore[arg-type]
            wait_until(settled, 30, "the unread request to be answered or stuck")
        peak = max(_rss(proc.pid) for _ in range(5) if time.sleep(0.1) is None)
        assert _scrape(metrics_port, "flux2_encoder_inflight_bytes ") <= limit
        assert peak - baseline <= limit + overhead, f"RSS grew {(peak - baseline) >> 20} MiB"
        for sock in socks:
            sock.close()
        wait_until(lambda: _scrape(metrics_port, "flux2_encoder_inflight_bytes ") == 0, 30, "the reservations")
        wait_until(lambda: _rss(proc.pid) - baseline <= overhead, 30, "RSS to come back")
        print(f"baseline {baseline >> 20} MiB, peak +{(peak - baseline) >> 20} MiB")
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
