"""Doors that must stay shut: a second server on a bound port, routes without a token, request ids
that would flood or forge log lines. No model: `FakeEngine` with fixed rows."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def open_server():
    with ServerThread(local_settings(http_port=0, cache_bytes=0), lambda _s: FakeEngine()) as thread:
        yield thread


def test_a_second_server_on_a_bound_port_exits_non_zero_with_one_line(open_server):
    port = open_server.target.rsplit(":", 1)[1]
    argv = [sys.executable, "-m", "flux2_encoder_server.cli", "serve", "--model", "unused", "--device", "cpu"]
    argv += ["--host", "127.0.0.1", "--port", port, "--no-warmup", "--log-format", "text"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
    assert "listening on" not in done.stdout


def test_an_http_port_in_use_is_one_clear_error_and_frees_the_grpc_port():
    import socket

    from flux2_encoder_server.server import PortInUseError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        thread = ServerThread(local_settings(http_port=port), lambda _s: FakeEngine())
        try:
            with pytest.raises(PortInUseError, match=f"cannot listen on 127.0.0.1:{port} \\(--http-port\\)"):
                thread.start()
            grpc_port = thread.server.port
        finally:
            thread.stop()
    with socket.socket() as again:  # the gRPC port it had bound is free again
        again.bind(("127.0.0.1", grpc_port))


TOKEN = "harden-token-0123456789abcdef"


@pytest.fixture(scope="module")
def guarded_server():
    settings = local_settings(http_port=0, cache_bytes=0, auth_tokens=f"ops:{TOKEN}")
    with ServerThread(settings, lambda _s: FakeEngine()) as thread:
        yield thread


def _grpc_calls(target: str):
    """Every rpc of the gRPC front-end as raw bytes (well-formed and malformed): name -> (call, bytes)."""
    from flux2split_proto import SERVICE_NAME
    from flux2split_proto.v1 import encoder_pb2 as pb
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    return {
        "Encode": ("unary_stream", f"/{SERVICE_NAME}/Encode", pb.EncodeRequest(prompts=["a"]).SerializeToString()),
        "Encode malformed": ("unary_stream", f"/{SERVICE_NAME}/Encode", b"\x0a\x02\xff\xfe"),
        "Info": ("unary_unary", f"/{SERVICE_NAME}/Info", pb.InfoRequest().SerializeToString()),
        "Info malformed": ("unary_unary", f"/{SERVICE_NAME}/Info", b"\xff\xff\xff"),
        "reflection": (
            "stream_stream",
            reflection,
            reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString(),
        ),
        "health": (
            "unary_unary",
            "/grpc.health.v1.Health/Check",
            health_pb2.HealthCheckRequest(service=SERVICE_NAME).SerializeToString(),
        ),
    }


def test_every_route_of_both_front_ends_needs_a_token_except_health(guarded_server):
    import grpc
    import httpx

    with grpc.insecure_channel(guarded_server.target) as channel:
        for name, (kind, method, raw) in _grpc_calls(guarded_server.target).items():
            stub = getattr(channel, kind)(method, request_serializer=None, response_deserializer=None)
            try:
                if kind == "unary_unary":
                    stub(raw, timeout=30)
                elif kind == "unary_stream":
                    list(stub(raw, timeout=30))
                else:
                    list(stub(iter([raw]), timeout=30))
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            expected = grpc.StatusCode.OK if name == "health" else grpc.StatusCode.UNAUTHENTICATED
            assert code == expected, name
    url = guarded_server.http_url
    assert httpx.post(url + "/predict", content=b'{"prompt": ["a"]}').status_code == 401
    assert httpx.post(url + "/predict", content=b"\xff not json").status_code == 401  # token before parsing
    assert httpx.get(url + "/info").status_code == 401
    assert httpx.get(url + "/info", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/healthz").status_code == 200


def test_request_ids_are_cut_and_escaped_so_they_cannot_flood_or_forge_log_lines(open_server, caplog):
    import logging

    import grpc
    import httpx
    from flux2_encoder_server.core import MAX_REQUEST_ID_CHARS
    from flux2_encoder_server.logs import TextFormatter, access_log
    from flux2split_proto import SERVICE_NAME, codec
    from flux2split_proto.v1 import encoder_pb2 as pb

    forged = "abc\n2026-12-01 00:00:00 INFO flux2.access: request status=OK\r\x1b[2J"
    with caplog.at_level(logging.INFO, logger=access_log.name), grpc.insecure_channel(open_server.target) as channel:
        stub = channel.unary_stream(f"/{SERVICE_NAME}/Encode", request_serializer=None, response_deserializer=None)
        raw = pb.EncodeRequest(prompts=["a"], request_id=forged).SerializeToString()
        header, _ = codec.assemble(pb.EncodeResponse.FromString(m) for m in stub(raw, timeout=30))
    assert "\n" not in header.request_id and header.request_id.startswith("abc\\n")
    lines = [TextFormatter().format(r) for r in caplog.records if r.name == access_log.name]
    assert lines and all("\n" not in line and "\r" not in line and "\x1b" not in line for line in lines)

    # 10 KB reaches the server and comes back cut; 100 KB may be refused by the HTTP parser, never echoed.
    for size in (10_000, 100_000):
        response = httpx.post(
            open_server.http_url + "/predict", json={"prompt": ["a"]}, headers={"x-request-id": "x" * size}
        )
        assert response.status_code == 200 or size > 10_000
        if response.status_code == 200:
            assert response.headers["x-request-id"] == "x" * MAX_REQUEST_ID_CHARS
        else:
            assert "x" * MAX_REQUEST_ID_CHARS not in response.text


_CONTROL_PLANE_BYTES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"\x0a\x02\xff\xfe", b"\x0a\x05abc", b"\xff\xff\xff", b"\x08", b"\x1a\x03\xc3\x28x"]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_CONTROL_PLANE_BYTES)
def test_malformed_health_and_reflection_requests_are_invalid_argument_never_unknown(open_server, raw):
    import grpc

    allowed = {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}
    with grpc.insecure_channel(open_server.target) as channel:
        for method, kind in (
            ("/grpc.health.v1.Health/Check", "unary_unary"),
            ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "stream_stream"),
        ):
            stub = getattr(channel, kind)(method, request_serializer=None, response_deserializer=None)
            try:
                stub(raw, timeout=30) if kind == "unary_unary" else list(stub(iter([raw]), timeout=30))
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            assert code in allowed, (method, raw, code)


def test_a_client_that_disconnects_mid_body_is_cancelled_without_a_traceback(open_server, caplog):
    import logging
    import socket

    from flux2_encoder_server.testing import wait_until

    metrics = open_server.core.metrics
    labels = {"frontend": "http", "code": "CANCELLED"}
    before = metrics.value("flux2_encoder_requests_total", labels)
    host, port = open_server.http_url.removeprefix("http://").split(":")
    with caplog.at_level(logging.INFO):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b'{"prompt": ["')
        wait_until(lambda: metrics.value("flux2_encoder_requests_total", labels) == before + 1, what="CANCELLED")
    assert metrics.value("flux2_encoder_requests_total", {"frontend": "http", "code": "INTERNAL"}) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_a_client_cancelling_mid_stream_is_cancelled_without_an_error_log(caplog):
    import logging

    import grpc
    from flux2_encoder_server.testing import wait_until
    from flux2split_proto import SERVICE_NAME
    from flux2split_proto.v1 import encoder_pb2 as pb

    settings = local_settings(cache_bytes=0, chunk_bytes=1024)
    with caplog.at_level(logging.INFO), ServerThread(settings, lambda _s: FakeEngine()) as thread:
        with grpc.insecure_channel(thread.target) as channel:
            stub = channel.unary_stream(f"/{SERVICE_NAME}/Encode", request_serializer=None, response_deserializer=None)
            for _ in range(3):
                call = stub(pb.EncodeRequest(prompts=["a"] * 8).SerializeToString(), timeout=30)
                next(call), next(call)  # the header and one chunk of many
                call.cancel()
            wait_until(lambda: thread.core.inflight_requests == 0, what="the cancelled streams to end")
        labels = {"frontend": "grpc", "code": "CANCELLED"}
        assert thread.core.metrics.value("flux2_encoder_requests_total", labels) == 3
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
