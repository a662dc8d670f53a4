"""Health tells the engine's state: a dead worker thread, batches that keep failing and a failed self-test
turn it NOT_SERVING (readiness and the `liveness` service); loading and draining touch readiness only.
No model: `FakeEngine` with fixed rows."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from flux2_client.remote import RemoteEncoderError, RemoteTextEncoder
from flux2_encoder_server.core import SELF_TEST_PROMPT
from flux2_encoder_server.server import LIVENESS_SERVICE
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings, wait_until
from flux2split_proto import SERVICE_NAME
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health(target: str) -> dict[str, int]:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {
            name: stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            for name in ("", SERVICE_NAME, LIVENESS_SERVICE)
        }


def _all(status: int) -> dict[str, int]:
    return {"": status, SERVICE_NAME: status, LIVENESS_SERVICE: status}


@pytest.fixture
def served():
    started: list[ServerThread] = []

    def make(engine: FakeEngine, load: bool = True, **overrides) -> ServerThread:
        settings = local_settings(http_port=0, cache_bytes=0, **overrides)
        thread = ServerThread(settings, lambda _s: engine).start(load=load)
        started.append(thread)
        return thread

    yield make
    for thread in started:
        thread.stop()


def test_liveness_is_serving_while_loading_and_draining_readiness_is_not(served):
    engine = FakeEngine()
    thread = served(engine, load=False)
    assert _health(thread.target) == {"": NOT_SERVING, SERVICE_NAME: NOT_SERVING, LIVENESS_SERVICE: SERVING}
    thread.run(thread.server.load())
    assert _health(thread.target) == _all(SERVING)
    assert httpx.get(thread.http_url + "/health").status_code == 200
    thread.core.start_draining()
    assert _health(thread.target) == {"": NOT_SERVING, SERVICE_NAME: NOT_SERVING, LIVENESS_SERVICE: SERVING}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash, on purpose
def test_readiness_waits_for_the_warm_up_encode_to_pass(served):
    engine = FakeEngine()
    thread = served(engine, load=False, warmup=True)
    engine.hold()  # the warm-up forward reaches the engine and stops there
    loading = asyncio.run_coroutine_threadsafe(thread.server.load(), thread.loop)
    assert engine.entered.wait(10)
    # Loaded, batcher running, warm-up forward under way: not ready yet, on both front-ends.
    assert _health(thread.target) == {"": NOT_SERVING, SERVICE_NAME: NOT_SERVING, LIVENESS_SERVICE: SERVING}
    assert httpx.get(thread.http_url + "/health").status_code == 503
    engine.release()
    loading.result(10)
    assert engine.batches == [[SELF_TEST_PROMPT]]
    assert _health(thread.target) == _all(SERVING)
    assert httpx.get(thread.http_url + "/health").status_code == 200


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash, on purpose
def test_a_dead_worker_thread_turns_health_not_serving(served):
    engine = FakeEngine()
    thread = served(engine)
    assert _health(thread.target) == _all(SERVING)
    engine.crash_worker()
    with RemoteTextEncoder(thread.target, timeout=2) as enc, pytest.raises(RemoteEncoderError):
        enc.encode("this batch kills the worker")
    wait_until(lambda: not thread.core.live, what="the dead worker to be noticed")
    assert _health(thread.target) == _all(NOT_SERVING)
    response = httpx.get(thread.http_url + "/health")
    assert response.status_code == 503
    # Nothing would ever answer: new requests are sent elsewhere at once, not left to time out.
    with RemoteTextEncoder(thread.target, timeout=10) as enc, pytest.raises(RemoteEncoderError) as err:
        enc.encode("after the crash")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_batches_failing_in_a_row_turn_health_not_serving_until_a_self_test_passes(served):
    engine = FakeEngine()
    thread = served(engine, unhealthy_after_failed_batches=3, self_test_interval_s=0)
    engine.fail_every_batch = True  # a device in a sticky error state
    with RemoteTextEncoder(thread.target, timeout=10) as enc:
        for i in range(3):
            with pytest.raises(RemoteEncoderError) as err:
                enc.encode(f"prompt {i}")
            assert err.value.code == grpc.StatusCode.INTERNAL
    assert _health(thread.target) == _all(NOT_SERVING)
    assert httpx.get(thread.http_url + "/health").status_code == 503
    # The server keeps running its self-test; it keeps failing while the device does.
    wait_until(lambda: thread.core.metrics.value("flux2_encoder_self_tests_total", {"result": "failed"}) >= 1)
    assert _health(thread.target)[LIVENESS_SERVICE] == NOT_SERVING
    engine.fail_every_batch = False  # the fault clears: the next self-test passes and health recovers
    wait_until(lambda: thread.core.live, what="a passing self-test")
    assert _health(thread.target) == _all(SERVING)


def test_a_failing_self_test_at_load_never_reports_serving(served):
    engine = FakeEngine()
    engine.fail_every_batch = True
    thread = served(engine, load=False, warmup=True)
    with pytest.raises(RuntimeError, match="self-test"):
        thread.run(thread.server.load())
    assert _health(thread.target)[SERVICE_NAME] == NOT_SERVING


def test_metrics_follow_the_naming_guide_and_start_at_zero(served):
    thread = served(FakeEngine(), load=False)  # from the start, before the model is loaded
    text = thread.core.metrics.exposition().decode()
    for line in (
        'flux2_encoder_requests_total{code="UNAVAILABLE",frontend="http",model="default"} 0.0',
        'flux2_encoder_requests_total{code="CANCELLED",frontend="grpc",model="default"} 0.0',
        'flux2_encoder_requests_total{code="NOT_FOUND",frontend="grpc",model=""} 0.0',
        'flux2_encoder_sent_bytes_total{frontend="grpc",model="default"} 0.0',
        'flux2_encoder_request_duration_seconds_count{frontend="http",model="default"} 0.0',
        'flux2_encoder_rejected_total{limit="max_inflight_bytes",model="default"} 0.0',
        'flux2_encoder_dropped_total{model="default",reason="deadline"} 0.0',
        'flux2_encoder_cache_lookups_total{model="default",result="miss",tier="disk"} 0.0',
        'flux2_encoder_self_tests_total{model="default",result="failed"} 0.0',
        'flux2_encoder_batch_failures_total{model="default"} 0.0',
        'flux2_encoder_dropped_total{model="default",reason="send_timeout"} 0.0',
        'flux2_encoder_dropped_total{model="",reason="http_header_timeout"} 0.0',
        'flux2_encoder_rejected_total{limit="http_max_concurrent_requests",model="default"} 0.0',
        'flux2_encoder_upsample_requests_total{code="OK",frontend="http",model="default"} 0.0',
    ):
        assert line in text, line
    thread.run(thread.server.load())
    text = thread.core.metrics.exposition().decode()
    assert 'flux2_encoder_build_info{model="default",precision="bf16",version="' in text
    assert 'weights="fake"} 1.0' in text
    assert "bytes_sent" not in text and "flux2_encoder_request_seconds" not in text
    RemoteTextEncoder(thread.target).encode("a")
    assert thread.core.metrics.value("flux2_encoder_sent_bytes_total", {"frontend": "grpc"}) > 0
