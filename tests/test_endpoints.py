"""Several encoder servers: requests spread over them, the client fails over when one is killed, gives
up with a clear error when all are down, and an on-disk cache returns the received tensors unchanged.
The servers answer from `FakeEngine` (a fixed row per prompt, no model time): this is the client's pool."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest
import torch
from flux2_client.cache import EmbeddingCache
from flux2_client.endpoints import EncoderPool, RetryPolicy
from flux2_client.remote import RemoteEncoderError, RemoteTextEncoder
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings

PROMPTS = ["a red fox in snow", "a lighthouse at dusk"]
FAST = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.05, cooldown=30.0, deadline=60.0)


def closed_port() -> str:
    """An address nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def two_servers():
    servers = [ServerThread(local_settings(), lambda _s: FakeEngine()).start() for _ in range(2)]
    yield servers
    for s in servers:
        if not getattr(s, "killed", False):
            s.stop()


def kill(server: ServerThread) -> None:
    server.stop()
    server.killed = True  # type: ignore[attr-defined]


def test_requests_spread_and_fail_over_when_a_server_is_killed(two_servers):
    first, second = two_servers
    with RemoteTextEncoder(first.target) as direct:
        expected = direct.encode(PROMPTS[0]).prompt_embeds
    with EncoderPool([first.target, second.target], timeout=10, retry=FAST) as pool:
        a = pool.encode(PROMPTS[0]).prompt_embeds
        b = pool.encode(PROMPTS[0]).prompt_embeds
        assert torch.equal(a, expected) and torch.equal(b, expected)
        assert pool.stats.served_by == {first.target: 1, second.target: 1}  # round-robin

        kill(first)  # killed: its port refuses connections from now on
        for _ in range(3):
            assert torch.equal(pool.encode(PROMPTS[0]).prompt_embeds, expected)
        assert pool.stats.served_by[second.target] == 4
        assert pool.stats.served_by[first.target] == 1
        assert pool.stats.failovers >= 1


def test_dead_first_server_is_skipped(two_servers):
    _, second = two_servers
    with EncoderPool([closed_port(), second.target], timeout=10, retry=FAST) as pool:
        out = pool.encode(PROMPTS)
    assert out.prompt_embeds.shape[0] == 2
    assert pool.stats.served_by == {second.target: 1}


def test_all_servers_down_raises_unavailable():
    with (
        EncoderPool([closed_port(), closed_port()], timeout=5, retry=FAST) as pool,
        pytest.raises(RemoteEncoderError) as info,
    ):
        pool.encode("x")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "all 2 encoder servers failed" in str(info.value)


def test_bad_input_is_not_retried_on_other_servers(two_servers):
    first, second = two_servers
    pool = EncoderPool([first.target, second.target], timeout=10, retry=FAST)
    with pool, pytest.raises(RemoteEncoderError) as info:
        pool.encode(["x" * 100_000])  # beyond the server's max_prompt_chars
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert pool.stats.failovers == 0


def test_cache_returns_identical_tensors_without_a_server(two_servers, tmp_path):
    first, second = two_servers
    cache = EmbeddingCache(tmp_path / "cache")
    with EncoderPool([first.target], timeout=10, retry=FAST, cache=cache) as pool:
        received = pool.encode(PROMPTS)
        digest = received.fingerprint.digest
    assert received.cache_hit == (False, False)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2

    kill(first)
    kill(second)
    # No server is up: the cache alone answers, bit for bit, with the fingerprint it was stored under.
    with EncoderPool([first.target], timeout=5, retry=FAST, cache=cache, expected_fingerprint=digest) as pool:
        cached = pool.encode(PROMPTS)
    assert torch.equal(cached.prompt_embeds, received.prompt_embeds)
    assert cached.prompt_embeds.dtype == received.prompt_embeds.dtype == torch.bfloat16
    assert cached.cache_hit == (True, True)
    assert cached.fingerprint == received.fingerprint
    # Another model's digest never sees these entries.
    assert cache.get("0" * 64, PROMPTS[0]) is None


def test_pool_sends_the_token_and_does_not_retry_a_refused_one():
    settings = local_settings(auth_tokens="alice:s3cret-s3cret-s3cret")
    server = ServerThread(settings, lambda _s: FakeEngine()).start()
    try:
        with EncoderPool([server.target], token="s3cret-s3cret-s3cret") as pool:
            got = pool.encode(["a fox"]).prompt_embeds
        assert torch.equal(got, FakeEngine().encode(["a fox"]))
        with EncoderPool([server.target, server.target], token="wrong") as pool:
            with pytest.raises(RemoteEncoderError) as err:
                pool.encode(["a fox"])
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert pool.stats.failovers == 0  # a refused token is final, not a reason to try elsewhere
    finally:
        server.stop()


class _StubServer:
    """A gRPC server whose Encode and Info misbehave as told: "cancel" answers CANCELLED, "hang" never
    answers (a hung replica)."""

    def __init__(self, behaviour: str):
        from concurrent import futures

        from flux2split_proto import SERVICE_NAME

        self.calls = 0
        self._release = threading.Event()

        def handle(request, context):
            self.calls += 1
            if behaviour == "cancel":
                context.abort(grpc.StatusCode.CANCELLED, "cancelled by the server's close")
            self._release.wait(60)
            context.abort(grpc.StatusCode.UNAVAILABLE, "released")

        handlers = {
            "Encode": grpc.unary_stream_rpc_method_handler(lambda r, c: iter(handle(r, c) or ())),
            "Info": grpc.unary_unary_rpc_method_handler(handle),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def close(self) -> None:
        self._release.set()
        self.server.stop(0)


def test_pool_retries_cancelled_on_another_server():
    from flux2_encoder_server.testing import FakeEngine

    stub = _StubServer("cancel")
    policy = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.05, cooldown=0.0, deadline=60.0)
    try:
        # Round robin: one of the two encodes starts at the stub and meets a CANCELLED first.
        with (
            ServerThread(local_settings(cache_bytes=0), lambda _s: FakeEngine()) as good,
            EncoderPool([stub.target, good.target], timeout=10, retry=policy) as pool,
        ):
            for i in range(2):
                assert pool.encode(f"after a cancel {i}").prompt_embeds.shape[0] == 1
        assert stub.calls >= 1
    finally:
        stub.close()


def test_a_hung_server_costs_no_more_than_the_calls_remaining_deadline():
    stub = _StubServer("hang")
    try:
        policy = RetryPolicy(attempts=3, backoff=0.01, cooldown=0.0, deadline=1.0)
        with EncoderPool([stub.target], timeout=60, retry=policy) as pool:
            started = time.monotonic()
            with pytest.raises(RemoteEncoderError) as err:
                pool.encode("to a hung server")
            assert time.monotonic() - started < 5  # not the 60 s per-attempt timeout
        assert err.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    finally:
        stub.close()
