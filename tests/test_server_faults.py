"""Faults and backpressure on a real in-process gRPC server: overload, in-flight bytes, deadlines,
cancellation, a failing batch. The engine is `FakeEngine` (a fixed row per prompt, no model time), which
can hold the worker at a gate so that requests pile up in a known state; what is tested is the server's
queue and limits, not the model's bytes (tests/test_embeddings_exact.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from flux2_client.remote import RemoteEncoderError, RemoteTextEncoder
from flux2_encoder_server.errors import DEFAULT_RETRY_AFTER_S
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings, wait_until
from flux2split_proto import shared
from flux2split_proto.v1 import encoder_pb2 as pb
from flux2split_proto.v1 import encoder_pb2_grpc as pb_grpc

PER_PROMPT = 512 * 192 * 2  # bytes of one embedding of FakeEngine's default width


def alone(prompts: list[str]) -> torch.Tensor:
    """The rows of `prompts` encoded by themselves, on an engine of their own."""
    return FakeEngine().encode(prompts)


@pytest.fixture
def make_server():
    started: list[tuple[ServerThread, FakeEngine]] = []

    def make(**overrides):
        wrapped = FakeEngine()
        thread = ServerThread(local_settings(**overrides), lambda _s: wrapped).start()
        started.append((thread, wrapped))
        return thread, wrapped

    yield make
    for thread, wrapped in started:
        wrapped.release_all()
        thread.stop()


def _hold_worker(thread: ServerThread, wrapped: FakeEngine, pool: ThreadPoolExecutor):
    """Send a request and wait until its batch is inside the model, held at the gate."""
    wrapped.hold()
    future = pool.submit(lambda: RemoteTextEncoder(thread.target).encode("blocker", bypass_cache=True))
    assert wrapped.entered.wait(30)
    return future


def test_full_queue_is_resource_exhausted_at_once(make_server):
    thread, wrapped = make_server(max_queued_requests=2, cache_bytes=0)
    with ThreadPoolExecutor(4) as pool:
        blocker = _hold_worker(thread, wrapped, pool)
        queued = [pool.submit(RemoteTextEncoder(thread.target).encode, f"queued {i}") for i in range(2)]
        wait_until(lambda: thread.core.queued_requests == 2, what="two queued requests")
        with RemoteTextEncoder(thread.target) as enc, pytest.raises(RemoteEncoderError) as err:
            enc.encode("one too many")
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queued_requests=2" in err.value.message
        # Next to the message, the suggested delay as a structured google.rpc.RetryInfo detail.
        with grpc.insecure_channel(thread.target) as channel, pytest.raises(grpc.RpcError) as raw:
            list(pb_grpc.TextEncoderStub(channel).Encode(pb.EncodeRequest(prompts=["and another"]), timeout=30))
        assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queued_requests=2" in raw.value.details()
        assert shared.retry_delay_from_call(raw.value) == DEFAULT_RETRY_AFTER_S
        wrapped.release()
        assert blocker.result(30).prompt_embeds.shape == (1, 512, 192)
        for f in queued:
            f.result(30)
    assert thread.server.metrics.value("flux2_encoder_rejected_total", {"limit": "max_queued_requests"}) == 2
    with RemoteTextEncoder(thread.target) as enc:  # the queue drained; the server serves again
        enc.encode("after overload")


def test_inflight_bytes_limit(make_server):
    thread, wrapped = make_server(max_inflight_bytes=3 * PER_PROMPT, cache_bytes=0)
    with ThreadPoolExecutor(2) as pool:
        blocker = _hold_worker(thread, wrapped, pool)  # reserves 1 prompt
        second = pool.submit(RemoteTextEncoder(thread.target).encode, ["two", "prompts"])  # reserves 2 more
        wait_until(lambda: thread.core.inflight_bytes == 3 * PER_PROMPT, what="3 prompts reserved")
        with RemoteTextEncoder(thread.target) as enc:
            with pytest.raises(RemoteEncoderError) as err:
                enc.encode("no room")
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"max_inflight_bytes={3 * PER_PROMPT}" in err.value.message
            # A request that could never fit is the caller's error, not a busy server.
            with pytest.raises(RemoteEncoderError) as err:
                enc.encode(["a", "b", "c", "d"])
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_inflight_bytes" in err.value.message
        wrapped.release()
        blocker.result(30)
        second.result(30)
    wait_until(lambda: thread.core.inflight_bytes == 0, what="reservations released")
    with RemoteTextEncoder(thread.target) as enc:
        enc.encode("room again")


def test_expired_deadlines_never_reach_the_model(make_server):
    thread, wrapped = make_server(cache_bytes=0)
    with ThreadPoolExecutor(2) as pool:
        blocker = _hold_worker(thread, wrapped, pool)
        with RemoteTextEncoder(thread.target, timeout=0.3) as enc, pytest.raises(RemoteEncoderError) as err:
            enc.encode(["late one", "late two"])
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: thread.core.inflight_requests == 1, what="the late request to be dropped")
        assert thread.core.queued_requests == 0
        wrapped.release()
        blocker.result(30)
    with RemoteTextEncoder(thread.target) as enc:
        enc.encode("next one")
    seen = wrapped.prompts_seen
    assert "next one" in seen and "blocker" in seen
    assert "late one" not in seen and "late two" not in seen


def test_batcher_drops_a_job_whose_deadline_passed_in_the_queue():
    """Below the front-end: the worker itself skips an expired job it finds at the head of the queue."""
    import asyncio

    from flux2_encoder_server.batcher import Batcher
    from flux2_encoder_server.errors import DeadlineExceeded

    wrapped = FakeEngine()
    drops: list[str] = []
    batcher = Batcher(wrapped.launch, max_batch_prompts=4, max_wait_s=0.0, on_drop=drops.append)

    async def scenario():
        wrapped.hold()
        first = asyncio.ensure_future(batcher.submit(["first"]))
        await asyncio.to_thread(wrapped.entered.wait, 30)
        # The caller keeps waiting (no timeout of its own) but the job carries a deadline.
        late = asyncio.ensure_future(batcher.submit(["expired"]))
        await asyncio.sleep(0)
        with batcher._cond:
            batcher._queue[-1].deadline = 0.0  # already past
        wrapped.release()
        await first
        with pytest.raises(DeadlineExceeded):
            await late

    try:
        asyncio.run(scenario())
    finally:
        batcher.close()
        batcher.join(5)
    assert drops == ["deadline"]
    assert wrapped.prompts_seen == ["first"]


def test_cancel_mid_stream_frees_the_slot(make_server):
    thread, _wrapped = make_server(
        chunk_bytes=1024, auth_tokens="alice:alice-secret-token-0001", max_concurrent_requests_per_token=1
    )
    metadata = (("authorization", "Bearer alice-secret-token-0001"),)
    with grpc.insecure_channel(thread.target) as channel:
        stub = pb_grpc.TextEncoderStub(channel)
        # 32 copies of one prompt: the model runs once, the answer is 6 MiB in 6144 chunks.
        call = stub.Encode(pb.EncodeRequest(prompts=["cancel me"] * 32), metadata=metadata, timeout=30)
        first = next(call)
        assert first.WhichOneof("part") == "header"
        assert next(call).WhichOneof("part") == "chunk"
        assert thread.core.limiter.active(thread.core.authenticate("alice-secret-token-0001")) == 1
        call.cancel()
    wait_until(lambda: thread.core.inflight_requests == 0, what="the cancelled request to finish")
    assert thread.core.inflight_bytes == 0
    assert thread.server.metrics.value("flux2_encoder_requests_total", {"frontend": "grpc", "code": "CANCELLED"}) == 1
    with RemoteTextEncoder(thread.target, token="alice-secret-token-0001") as enc:  # the one slot is free again
        assert enc.encode("after cancel").prompt_embeds.shape[0] == 1


def test_cancel_while_queued_frees_the_slot(make_server):
    thread, wrapped = make_server(cache_bytes=0, max_queued_requests=1)
    with ThreadPoolExecutor(2) as pool, grpc.insecure_channel(thread.target) as channel:
        blocker = _hold_worker(thread, wrapped, pool)
        call = pb_grpc.TextEncoderStub(channel).Encode(pb.EncodeRequest(prompts=["queued then cancelled"]), timeout=30)
        wait_until(lambda: thread.core.queued_requests == 1, what="the request to queue")
        call.cancel()
        wait_until(lambda: thread.core.queued_requests == 0, what="the cancelled request to leave the queue")
        queued_again = pool.submit(RemoteTextEncoder(thread.target).encode, "takes the freed slot")
        wait_until(lambda: thread.core.queued_requests == 1, what="the next request to queue")
        wrapped.release()
        blocker.result(30)
        queued_again.result(30)
    assert "queued then cancelled" not in wrapped.prompts_seen


def test_a_failing_batch_fails_only_its_requests(make_server):
    thread, wrapped = make_server(cache_bytes=0, max_batch_prompts=2)
    poison = [wrapped.poison + " a", wrapped.poison + " b"]  # fills one batch of 2
    with ThreadPoolExecutor(3) as pool:
        blocker = _hold_worker(thread, wrapped, pool)
        bad = pool.submit(RemoteTextEncoder(thread.target).encode, poison)
        wait_until(lambda: thread.core.queued_requests == 1, what="the poisoned request to queue")
        good = pool.submit(RemoteTextEncoder(thread.target).encode, "innocent bystander")
        wait_until(lambda: thread.core.queued_requests == 2, what="the good request to queue")
        wrapped.release()
        blocker.result(30)
        with pytest.raises(RemoteEncoderError) as err:
            bad.result(30)
        assert err.value.code == grpc.StatusCode.INTERNAL
        assert "injected failure" in err.value.message
        got = good.result(30).prompt_embeds
    assert torch.equal(got, alone(["innocent bystander"]))
    assert poison in wrapped.batches and ["innocent bystander"] in wrapped.batches
    assert thread.server.metrics.value("flux2_encoder_batch_failures_total") == 1
    with RemoteTextEncoder(thread.target) as enc:
        assert torch.equal(enc.encode("after the failure").prompt_embeds, alone(["after the failure"]))


def test_each_request_is_answered_when_its_own_batches_are_done():
    """A request does not wait for later batches; one spread over several batches is reassembled exactly."""
    import asyncio

    from flux2_encoder_server.batcher import Batcher

    fake = FakeEngine(hold_results=True)
    batcher = Batcher(fake.launch, max_batch_prompts=2, max_wait_s=0.05)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(["a", "b"]))
        spread = asyncio.ensure_future(batcher.submit(["c", "d", "e"]))
        await asyncio.to_thread(wait_until, lambda: len(fake.launched) == 2, 30, "two launches")
        fake.launched[0].release()
        done = await first  # answered while the next batch is still held in the model
        assert not spread.done()
        fake.release_all()
        await asyncio.to_thread(wait_until, lambda: len(fake.launched) == 3, 30, "the third launch")
        fake.release_all()
        return done, await spread

    try:
        first, spread = asyncio.run(scenario())
    finally:
        fake.release_all()
        batcher.close()
        batcher.join(5)
    assert fake.batches == [["a", "b"], ["c", "d"], ["e"]]
    assert torch.equal(first.embeds, alone(["a", "b"]))
    assert torch.equal(spread.embeds, alone(["c", "d", "e"]))


def test_http_client_disconnect_drops_its_queued_request(make_server):
    """A /predict caller that hangs up while queued is dropped before the model, as a cancelled gRPC call is."""
    import json
    import socket

    thread, wrapped = make_server(cache_bytes=0, http_port=0)
    port = thread.server.http_port
    body = json.dumps({"prompt": "queued then abandoned"}).encode()
    with ThreadPoolExecutor(2) as pool:
        blocker = _hold_worker(thread, wrapped, pool)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: thread.core.queued_requests == 1, what="the HTTP request to queue")
        sock.close()
        wait_until(lambda: thread.core.queued_requests == 0, what="the abandoned request to leave the queue")
        wrapped.release()
        blocker.result(30)
    assert "queued then abandoned" not in wrapped.prompts_seen
    wait_until(
        lambda: (
            thread.server.metrics.value("flux2_encoder_requests_total", {"frontend": "http", "code": "CANCELLED"}) == 1
        ),
        what="the abandoned request counted as CANCELLED",
    )


def test_pipelined_batches_launch_while_one_runs_and_answer_in_order():
    """Depth 2: the next batch is formed and launched while the first is still on the device, never a third;
    each caller gets its own rows; a batch whose device work fails fails only its callers."""
    import asyncio

    from flux2_encoder_server.batcher import Batcher
    from flux2_encoder_server.errors import EncodeFailed

    fake = FakeEngine(hold_results=True, poison="poison", fail_in="result")
    launched = fake.launched
    batcher = Batcher(fake.launch, max_batch_prompts=1, max_wait_s=0.0, pipeline_depth=2)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(["a"]))
        await asyncio.to_thread(wait_until, lambda: len(launched) == 1, 30, "the first launch")
        second = asyncio.ensure_future(batcher.submit(["poison"]))
        third = asyncio.ensure_future(batcher.submit(["c"]))
        # The second batch launches while the first is still held; the third waits for a free slot.
        await asyncio.to_thread(wait_until, lambda: len(launched) == 2, 30, "the second launch")
        await asyncio.sleep(0.2)
        assert len(launched) == 2 and not first.done()
        launched[1].release()  # the second batch's device work ends first; answers stay in order
        await asyncio.sleep(0.1)
        assert not second.done()
        launched[0].release()
        assert torch.equal((await first).embeds, alone(["a"]))
        with pytest.raises(EncodeFailed, match="injected failure"):
            await second
        await asyncio.to_thread(wait_until, lambda: len(launched) == 3, 30, "the third launch")
        launched[2].release()
        assert torch.equal((await third).embeds, alone(["c"]))

    try:
        asyncio.run(scenario())
    finally:
        fake.release_all()
        batcher.close()
        batcher.join(5)
    assert fake.batches == [["a"], ["poison"], ["c"]]


def test_pipeline_depth_one_runs_one_batch_at_a_time():
    import asyncio

    from flux2_encoder_server.batcher import Batcher

    fake = FakeEngine(hold_results=True)
    launched = fake.launched
    batcher = Batcher(fake.launch, max_batch_prompts=1, max_wait_s=0.0, pipeline_depth=1)

    async def scenario():
        jobs = [asyncio.ensure_future(batcher.submit([p])) for p in ("a", "b")]
        await asyncio.to_thread(wait_until, lambda: len(launched) == 1, 30, "the first launch")
        await asyncio.sleep(0.2)
        assert len(launched) == 1  # the second waits until the first is answered
        launched[0].release()
        await asyncio.to_thread(wait_until, lambda: len(launched) == 2, 30, "the second launch")
        launched[1].release()
        return [await job for job in jobs]

    try:
        results = asyncio.run(scenario())
    finally:
        fake.release_all()
        batcher.close()
        batcher.join(5)
    assert [torch.equal(r.embeds, alone([p])) for r, p in zip(results, "ab", strict=True)] == [True, True]
    with pytest.raises(ValueError, match="pipeline_depth must be at least 1"):
        Batcher(fake.launch, pipeline_depth=0)


def test_requests_are_tokenized_ahead_on_their_own_thread_while_a_batch_runs():
    """With prepare/launch_prepared (the engine's tokenize_rows/launch_rows) each request is tokenized as it
    queues, on the batcher's tokenizer thread, while the batch before it is still on the device; the worker
    only stacks the rows and launches; every caller gets its own rows."""
    import asyncio
    import threading

    from flux2_encoder_server.batcher import Batcher

    fake = FakeEngine(hold_results=True)
    launched = fake.launched
    prepared: list[tuple[str, str]] = []

    def prepare(prompts: list[str]) -> list[object]:
        prepared.extend((p, threading.current_thread().name) for p in prompts)
        return list(prompts)  # the fake's "model inputs" are the prompts themselves

    batcher = Batcher(
        None,  # type: ignore[arg-type]  # never called: every batch goes through launch_prepared
        max_batch_prompts=1,
        max_wait_s=0.0,
        pipeline_depth=2,
        prepare=prepare,
        launch_prepared=lambda rows: fake.launch([str(r) for r in rows]),
    )

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(["a"]))
        await asyncio.to_thread(wait_until, lambda: len(launched) == 1, 30, "the first launch")
        later = [asyncio.ensure_future(batcher.submit([p])) for p in ("b", "c")]
        # Both are tokenized while the first batch is still held on the "device".
        await asyncio.to_thread(wait_until, lambda: len(prepared) == 3, 30, "b and c tokenized")
        assert not first.done()
        for i in range(3):
            await asyncio.to_thread(wait_until, lambda: len(launched) > i, 30, f"launch {i + 1}")  # noqa: B023
            launched[i].release()
        return [await job for job in (first, *later)]

    try:
        results = asyncio.run(scenario())
    finally:
        fake.release_all()
        batcher.close()
        batcher.join(5)
    assert prepared == [(p, "encoder-tokenizer") for p in "abc"]
    assert [torch.equal(r.embeds, alone([p])) for r, p in zip(results, "abc", strict=True)] == [True] * 3
    with pytest.raises(ValueError, match="go together"):
        Batcher(fake.launch, prepare=prepare)


@pytest.mark.parametrize("launch_lead_s", [0.05, None])
def test_a_batch_fills_while_the_device_is_busy_instead_of_going_alone(launch_lead_s):
    """Depth 2, 50 ms of imitated device time per prompt. While a batch of 4 runs (200 ms), one request
    arrives, then three more 60 ms later. Filling (the default lead, 50 ms) launches the four together once
    the device is about to finish; without it (None) the first went alone 5 ms after it arrived and the
    three followed it (the fragmentation a closed loop of clients showed on an H200)."""
    import asyncio

    from flux2_encoder_server.batcher import Batcher

    fake = FakeEngine(device_ms_per_prompt=50)
    # Balancing off: this test isolates the lead (balancing would split the late arrivals further).
    batcher = Batcher(
        fake.launch, max_batch_prompts=8, max_wait_s=0.005, launch_lead_s=launch_lead_s, balance_batches=False
    )

    async def scenario():
        await batcher.submit(["warm"])  # the device's time per prompt, measured
        first = [asyncio.ensure_future(batcher.submit([p])) for p in "abcd"]
        await asyncio.to_thread(wait_until, lambda: len(fake.batches) == 2, 30, "the batch of four")
        late = [asyncio.ensure_future(batcher.submit(["e"]))]
        await asyncio.sleep(0.06)
        late += [asyncio.ensure_future(batcher.submit([p])) for p in "fgh"]
        return await asyncio.gather(*first, *late)

    try:
        results = asyncio.run(scenario())
    finally:
        batcher.close()
        batcher.join(5)
    assert [r.embeds.shape[0] for r in results] == [1] * 8
    sizes = [len(b) for b in fake.batches[1:]]
    assert sizes == ([4, 4] if launch_lead_s is not None else [4, 1, 3]), fake.batches


@pytest.mark.parametrize("balance", [True, False])
def test_balanced_batches_even_out_a_closed_loop_of_clients(balance):
    """Eight closed-loop clients (each sends again once answered), six starting first: with two batches in
    flight they run as groups of 6 and 2 for as long as they run; with `balance_batches` the next batch holds
    at most half of what is queued and launched, and the groups even out to 4 and 4."""
    import asyncio

    from flux2_encoder_server.batcher import Batcher

    fake = FakeEngine(device_ms_per_prompt=20)
    batcher = Batcher(fake.launch, max_batch_prompts=8, max_wait_s=0.005, balance_batches=balance)

    async def client(name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        for i in range(6):
            await batcher.submit([f"{name} {i}"])

    async def scenario():
        await batcher.submit(["warm"])  # the device's time per prompt, measured
        await asyncio.gather(*(client(f"c{k}", 0.0 if k < 6 else 0.03) for k in range(8)))

    try:
        asyncio.run(scenario())
    finally:
        batcher.close()
        batcher.join(5)
    sizes = [len(b) for b in fake.batches[1:]]
    assert sizes[:2] == [6, 2], sizes
    settled = sizes[4:8]
    assert settled == ([4, 4, 4, 4] if balance else [6, 2, 6, 2]), sizes
