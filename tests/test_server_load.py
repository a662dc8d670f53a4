"""Load: 32 concurrent clients x 50 requests of mixed sizes against one real server. Every row must be
bit-identical to the same prompt encoded alone, and the metrics must show that requests were merged.

Cost control (2 CPU cores): prompts come from a pool of 24, so most answers are cache hits; about one
request in four sets bypass_cache and goes through the model, together with each prompt's first
appearance. Those model-bound requests still arrive concurrently, which is what batching needs."""

from __future__ import annotations

import asyncio
import random

import grpc
import torch
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings
from flux2split_proto import codec
from flux2split_proto.v1 import encoder_pb2 as pb
from flux2split_proto.v1 import encoder_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

CLIENTS = 32
REQUESTS_PER_CLIENT = 50
POOL = [f"load prompt {i}: a {['red', 'green', 'blue'][i % 3]} {i * 7919 % 1000} fox" for i in range(24)]


def test_concurrent_load_is_exact_and_batched(tiny, engine):
    wrapped = FakeEngine(engine)
    settings = local_settings(str(tiny.pipeline), max_batch_prompts=16, max_wait_ms=20, metrics_port=0)
    thread = ServerThread(settings, lambda _s: wrapped).start()
    alone = {p: engine.encode([p])[0] for p in POOL}  # each prompt encoded by itself, batch of one
    rng = random.Random(20261126)
    plans = [
        [(rng.sample(POOL, rng.choice([1, 1, 2, 3, 4])), rng.random() < 1 / 4) for _ in range(REQUESTS_PER_CLIENT)]
        for _ in range(CLIENTS)
    ]

    async def client(channel: grpc.aio.Channel, plan) -> list[str]:
        stub = pb_grpc.TextEncoderStub(channel)
        problems = []
        for prompts, bypass in plan:
            request = pb.EncodeRequest(prompts=prompts, bypass_cache=bypass)
            responses = [r async for r in stub.Encode(request, timeout=120)]
            header, tensor = codec.assemble(responses)
            if tensor.shape != (len(prompts), 512, 192):
                problems.append(f"shape {tuple(tensor.shape)} for {len(prompts)} prompts")
            for row, prompt in zip(tensor, prompts, strict=True):
                if not torch.equal(row, alone[prompt]):
                    problems.append(f"row for {prompt!r} differs from encoding it alone")
            if bypass and any(header.cache_hit):
                problems.append("bypass_cache request was answered from the cache")
        return problems

    async def run_all() -> list[str]:
        async with grpc.aio.insecure_channel(thread.target) as channel:
            results = await asyncio.gather(*(client(channel, plan) for plan in plans))
        return [p for problems in results for p in problems]

    try:
        problems = asyncio.run(run_all())
        assert problems == []
        metrics = thread.server.metrics
        total_requests = CLIENTS * REQUESTS_PER_CLIENT
        total_prompts = sum(len(prompts) for plan in plans for prompts, _ in plan)
        assert metrics.value("flux2_encoder_requests_total", {"frontend": "grpc", "code": "OK"}) == total_requests
        from_model = metrics.value("flux2_encoder_prompts_total", {"source": "model"})
        from_cache = metrics.value("flux2_encoder_prompts_total", {"source": "cache"})
        assert from_model + from_cache == total_prompts
        assert from_model == len(wrapped.prompts_seen)
        # Batching happened: some model batches held several prompts from several requests.
        batches = metrics.value("flux2_encoder_batch_prompts_count")
        assert batches == len(wrapped.batches)
        assert metrics.value("flux2_encoder_batch_prompts_bucket", {"le": "1.0"}) < batches
        assert metrics.value("flux2_encoder_batch_requests_bucket", {"le": "1.0"}) < batches
        assert max(len(b) for b in wrapped.batches) > 1
        assert metrics.value("flux2_encoder_sent_bytes_total", {"frontend": "grpc"}) == total_prompts * 512 * 192 * 2
        # The same numbers are what Prometheus scrapes from the metrics port.
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{thread.server.metrics_port}/metrics", timeout=10) as page:
            scraped = {f.name: f for f in text_string_to_metric_families(page.read().decode())}
        for name in ("queue_depth", "batch_prompts", "model_tokens", "bytes_sent", "stage_seconds", "requests"):
            assert f"flux2_encoder_{name}" in scraped, name
        stages = {s.labels["stage"] for s in scraped["flux2_encoder_stage_seconds"].samples if "stage" in s.labels}
        assert stages == {"queue", "encode", "serialize", "send"}
    finally:
        thread.stop()
