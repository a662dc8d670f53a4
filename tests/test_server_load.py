"""Load: 64 clients x 20 mixed requests against two real servers, gRPC and HTTP, one of them drained
mid-load exactly as SIGTERM drains it. No request may fail, every row must be bit-identical to the same
prompt encoded alone, the drained server must finish every request it admitted, and the survivor's
metrics must add up exactly and show that requests were merged into batches.

The engines are `FakeEngine`s (a fixed row per prompt, whatever it is batched with; no model time), so
the load costs only what the servers do: admission, the batcher, the cache, repeated prompts, framing and
both front-ends, which is what this test is about. That the model's own bytes do not depend on the batch
is tested on the tiny model in tests/test_engine_paths.py and, through a server, test_embeddings_exact.py.

Clients, 16 of each kind:
- raw gRPC stubs to the survivor B: 1-4 prompts, some repeated within the request, one in four
  with bypass_cache, one in ten cancelled once the header has arrived;
- raw HTTP (httpx) to B: the same mix without bypass, one in ten closed once the response head arrived;
- `EncoderPool` threads over both servers' gRPC ports, and over both HTTP URLs: they must see no error
  while A drains and stops (UNAVAILABLE while draining, refused connections after; both retried on B).
"""

from __future__ import annotations

import io
import random
import threading
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import httpx
import torch
from flux2_client.endpoints import EncoderPool, RetryPolicy
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings, wait_until
from flux2split_proto import codec
from flux2split_proto.v1 import encoder_pb2 as pb
from flux2split_proto.v1 import encoder_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

CLIENTS_PER_KIND = 16  # x 4 kinds = 64 clients
REQUESTS_PER_CLIENT = 20
WIDTH = 16  # 16 KiB a prompt: the bytes are checked, their size costs nothing here
DISTINCT_ROWS = 64
ROW_BYTES = 512 * WIDTH * 2


def fake_engine() -> FakeEngine:
    return FakeEngine(width=WIDTH, distinct_rows=DISTINCT_ROWS)  # every one gives the same row per prompt


def prompt_pool(n: int = 32) -> dict[str, torch.Tensor]:
    """`n` prompts whose rows all differ, each with its row encoded alone: a row answered for the wrong
    prompt (or slot, or request) cannot go unnoticed."""
    alone = fake_engine()
    pool: dict[str, torch.Tensor] = {}
    for i in range(8 * n):
        prompt = f"load prompt {i}: a {['red', 'green', 'blue'][i % 3]} {i * 7919 % 1000} fox"
        row = alone.encode([prompt])[0]
        if not any(torch.equal(row, kept) for kept in pool.values()):
            pool[prompt] = row
        if len(pool) == n:
            return pool
    raise AssertionError("not enough distinct rows")


@dataclass
class Request:
    prompts: list[str]
    bypass_cache: bool = False
    cancel: bool = False


def plans(rng: random.Random, pool: list[str], *, bypass: bool, cancel: bool) -> list[list[Request]]:
    def one() -> Request:
        prompts = rng.sample(pool, rng.choice([1, 1, 2, 3, 4]))
        if len(prompts) > 1 and rng.random() < 0.2:
            prompts.append(prompts[0])  # the same prompt twice in one request
        return Request(prompts, bypass and rng.random() < 0.25, cancel and rng.random() < 0.1)

    return [[one() for _ in range(REQUESTS_PER_CLIENT)] for _ in range(CLIENTS_PER_KIND)]


@dataclass
class Tally:
    """What the clients saw: problems (must stay empty) and what reached each server."""

    problems: list[str] = field(default_factory=list)
    completed: Counter[str] = field(default_factory=Counter)  # frontend -> requests answered to B (raw)
    cancelled: Counter[str] = field(default_factory=Counter)  # frontend -> requests cancelled by us (raw, B)
    completed_rows: Counter[str] = field(default_factory=Counter)  # frontend -> rows received from B
    cancelled_rows: Counter[str] = field(default_factory=Counter)
    pool_answers: Counter[str] = field(default_factory=Counter)  # served_by target -> answers
    pool_rows: Counter[str] = field(default_factory=Counter)
    pool_done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, tensor: torch.Tensor, prompts: list[str], alone: dict[str, torch.Tensor], who: str) -> None:
        if tensor.shape != (len(prompts), 512, WIDTH):
            self.problems.append(f"{who}: shape {tuple(tensor.shape)} for {len(prompts)} prompts")
            return
        for row, prompt in zip(tensor, prompts, strict=True):
            if not torch.equal(row, alone[prompt]):
                self.problems.append(f"{who}: the row for {prompt!r} differs from encoding it alone")


def ok_answers(server: ServerThread) -> float:
    return sum(
        server.core.metrics.value("flux2_encoder_requests_total", {"frontend": frontend, "code": "OK"})
        for frontend in ("grpc", "http")
    )


def test_64_clients_mixed_load_with_a_drain_is_exact_loses_nothing_and_batches():
    alone = prompt_pool()
    pool_prompts = list(alone)
    rng = random.Random(20261126)
    grpc_plans = plans(rng, pool_prompts, bypass=True, cancel=True)
    http_plans = plans(rng, pool_prompts, bypass=False, cancel=True)
    pool_grpc_plans = plans(rng, pool_prompts, bypass=False, cancel=False)
    pool_http_plans = plans(rng, pool_prompts, bypass=False, cancel=False)

    engine_a, engine_b = fake_engine(), fake_engine()
    common = dict(http_port=0, max_batch_prompts=16, max_wait_ms=10, grace_period_s=30.0)
    # A has no cache, so its load reaches the model (the drain below holds a model batch); B caches.
    a = ServerThread(local_settings(cache_bytes=0, **common), lambda _s: engine_a).start()
    b = ServerThread(local_settings(metrics_port=0, metrics_host="127.0.0.1", **common), lambda _s: engine_b).start()
    tally = Tally()
    drained: dict[str, int] = {}
    retry = RetryPolicy(attempts=8, backoff=0.01, max_backoff=0.1, cooldown=1.0)
    pools = {
        "grpc": EncoderPool([a.target, b.target], timeout=60, retry=retry),
        "http": EncoderPool([a.http_url + "/predict", b.http_url + "/predict"], timeout=60, retry=retry),
    }

    # Every client is a thread with a sync client: grpc.aio and httpx's async client cost more CPU per
    # request than the servers do here.
    def raw_grpc(stub: pb_grpc.TextEncoderStub, plan: list[Request]) -> None:
        for req in plan:
            call = stub.Encode(pb.EncodeRequest(prompts=req.prompts, bypass_cache=req.bypass_cache), timeout=60)
            if req.cancel:
                next(call)  # the header: the server has admitted and encoded it
                call.cancel()
                with tally.lock:
                    tally.cancelled["grpc"] += 1
                    tally.cancelled_rows["grpc"] += len(req.prompts)
                continue
            header, tensor = codec.assemble(call)
            tally.check(tensor, req.prompts, alone, "grpc")
            with tally.lock:
                if req.bypass_cache and any(header.cache_hit):
                    tally.problems.append("grpc: a bypass_cache request was answered from the cache")
                tally.completed["grpc"] += 1
                tally.completed_rows["grpc"] += len(req.prompts)

    def raw_http(client: httpx.Client, plan: list[Request]) -> None:
        for req in plan:
            with client.stream("POST", b.http_url + "/predict", json={"prompt": req.prompts}) as response:
                if response.status_code != 200:
                    with tally.lock:
                        tally.problems.append(f"http: {response.status_code} {response.read()[:200]!r}")
                    continue
                if req.cancel:  # leaving without reading the body closes the connection
                    with tally.lock:
                        tally.cancelled["http"] += 1
                        tally.cancelled_rows["http"] += len(req.prompts)
                    continue
                body = response.read()
            tally.check(torch.load(io.BytesIO(body), weights_only=True), req.prompts, alone, "http")
            with tally.lock:
                tally.completed["http"] += 1
                tally.completed_rows["http"] += len(req.prompts)

    def pool_client(pool: EncoderPool, plan: list[Request], frontend: str) -> None:
        for req in plan:
            try:
                result = pool.encode(req.prompts)
            except Exception as exc:
                with tally.lock:
                    tally.problems.append(f"pool {frontend}: {type(exc).__name__}: {exc}")
                continue
            tally.check(result.prompt_embeds, req.prompts, alone, f"pool {frontend}")
            with tally.lock:
                tally.pool_answers[str(result.served_by)] += 1
                tally.pool_rows[str(result.served_by)] += len(req.prompts)
                tally.pool_done += 1

    def drain_a_mid_load() -> None:
        """What SIGTERM does (`serve`'s handler calls `EncoderServer.stop()`), a third into the pools' load,
        with a model batch held on A so that admitted requests are in flight when the drain starts."""
        total = 2 * CLIENTS_PER_KIND * REQUESTS_PER_CLIENT
        wait_until(lambda: tally.pool_done >= total // 3, 120, "a third of the pools' requests")
        engine_a.hold()
        assert engine_a.entered.wait(30), "no model batch reached A"
        wait_until(lambda: a.core.queued_requests >= 2, 30, "requests queued behind the held batch on A")
        # A has no cache: with its model held nothing it admitted can finish, so every request in flight
        # now is still to be answered: the held batch's and those queued behind it.
        ok_before = ok_answers(a)
        drained["admitted"] = a.core.admitted_requests  # not scopes still reading a body: the drain refuses those
        stopper = threading.Thread(target=a.stop, kwargs={"grace": 30.0})
        stopper.start()
        wait_until(lambda: a.core.draining, 10, "A to start draining")
        engine_a.release()
        stopper.join(60)
        drained["stopped"] = not stopper.is_alive()
        drained["ok_after"] = ok_answers(a) - ok_before

    def run_all() -> None:
        with (
            ThreadPoolExecutor(4 * CLIENTS_PER_KIND + 1) as threads,
            grpc.insecure_channel(b.target) as channel,
            httpx.Client(timeout=60, limits=httpx.Limits(max_connections=CLIENTS_PER_KIND), verify=False) as client,
        ):
            stub = pb_grpc.TextEncoderStub(channel)
            jobs = [threads.submit(drain_a_mid_load)]
            jobs += [threads.submit(raw_grpc, stub, plan) for plan in grpc_plans]
            jobs += [threads.submit(raw_http, client, plan) for plan in http_plans]
            jobs += [threads.submit(pool_client, pools["grpc"], plan, "grpc") for plan in pool_grpc_plans]
            jobs += [threads.submit(pool_client, pools["http"], plan, "http") for plan in pool_http_plans]
            for job in jobs:
                job.result()

    try:
        run_all()
        assert tally.problems == []

        # The drain happened mid-load, with admitted requests in flight, and lost none of them: those in
        # flight when it began all ended OK (none was admitted after), every request A admitted (all but
        # its UNAVAILABLE refusals) ended OK, and each of those answers reached its pool client.
        assert drained["stopped"] and drained["ok_after"] >= drained["admitted"] >= 1, drained
        a_codes = {
            (sample.labels["frontend"], sample.labels["code"]): sample.value
            for family in a.core.metrics.registry.collect()
            for sample in family.samples
            if sample.name == "flux2_encoder_requests_total" and sample.value
        }
        assert {code for _, code in a_codes} <= {"OK", "UNAVAILABLE"}, a_codes
        a_ok = a_codes.get(("grpc", "OK"), 0) + a_codes.get(("http", "OK"), 0)
        assert a_ok == tally.pool_answers[a.target] + tally.pool_answers[a.http_url + "/predict"] > 0
        assert pools["grpc"].stats.failovers + pools["http"].stats.failovers > 0  # the pools saw the drain

        # B's metrics add up exactly. A cancelled request was admitted and encoded (its header or response
        # head had arrived), then counted CANCELLED, or OK when its last byte was already out.
        m = b.core.metrics
        for frontend in ("grpc", "http"):
            pool_b = b.target if frontend == "grpc" else b.http_url + "/predict"
            ok = m.value("flux2_encoder_requests_total", {"frontend": frontend, "code": "OK"})
            cancelled = m.value("flux2_encoder_requests_total", {"frontend": frontend, "code": "CANCELLED"})
            received = tally.completed[frontend] + tally.cancelled[frontend] + tally.pool_answers[pool_b]
            assert ok + cancelled == received, frontend
            assert tally.completed[frontend] + tally.pool_answers[pool_b] <= ok, frontend
            rows = tally.completed_rows[frontend] + tally.pool_rows[pool_b]
            sent = m.value("flux2_encoder_sent_bytes_total", {"frontend": frontend})
            if frontend == "grpc":  # the payload bytes exactly (HTTP counts the torch.save framing too)
                assert rows * ROW_BYTES <= sent <= (rows + tally.cancelled_rows[frontend]) * ROW_BYTES
            else:
                assert sent >= rows * ROW_BYTES
        everything = sum(
            s.value for fam in m.registry.collect() for s in fam.samples if s.name == "flux2_encoder_requests_total"
        )
        assert everything == sum(tally.completed.values()) + sum(tally.cancelled.values()) + sum(
            tally.pool_answers[t] for t in (b.target, b.http_url + "/predict")
        )
        assert m.value("flux2_encoder_prompts_total", {"source": "model"}) == len(engine_b.prompts_seen)
        assert m.value("flux2_encoder_prompts_total", {"source": "cache"}) > 0
        # Batching happened: model batches held several prompts from several requests.
        batches = m.value("flux2_encoder_batch_prompts_count")
        assert batches == len(engine_b.batches)
        assert m.value("flux2_encoder_batch_prompts_bucket", {"le": "1.0"}) < batches
        assert m.value("flux2_encoder_batch_requests_bucket", {"le": "1.0"}) < batches
        assert max(len(batch) for batch in engine_b.batches) > 1

        # The same numbers are what Prometheus scrapes from the metrics port.
        with urllib.request.urlopen(f"http://127.0.0.1:{b.server.metrics_port}/metrics", timeout=10) as page:
            scraped = {f.name: f for f in text_string_to_metric_families(page.read().decode())}
        # prometheus_client's parser names a counter's family without `_total` (samples keep it).
        for name in ("queue_depth", "batch_prompts", "model_tokens", "sent_bytes", "stage_seconds", "requests"):
            assert f"flux2_encoder_{name}" in scraped, name
        sent_samples = {
            s.labels["frontend"]: s.value
            for s in scraped["flux2_encoder_sent_bytes"].samples
            if s.name == "flux2_encoder_sent_bytes_total"
        }
        assert sent_samples["grpc"] == m.value("flux2_encoder_sent_bytes_total", {"frontend": "grpc"})
        stages = {s.labels["stage"] for s in scraped["flux2_encoder_stage_seconds"].samples if "stage" in s.labels}
        assert stages == {"queue", "encode", "serialize", "send"}
    finally:
        engine_a.release_all()
        for pool in pools.values():
            pool.close()
        a.stop()
        b.stop()
