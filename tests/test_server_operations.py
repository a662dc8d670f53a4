"""Operations: SIGTERM drain of a real server process, the embedding cache (memory and disk), settings."""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from flux2_client.demo import start_server, wait_serving
from flux2_client.remote import RemoteEncoderError, RemoteTextEncoder
from flux2_encoder_server.cache import EmbeddingCache, MemoryLRU
from flux2_encoder_server.settings import ENV_PREFIX, Settings
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings
from flux2split_proto import codec

# -- SIGTERM ---------------------------------------------------------------------------------------------


def test_sigterm_mid_load_drains_and_exits(tiny, engine, tmp_path):
    log_path = tmp_path / "server.log"
    proc, target = start_server(
        str(tiny.pipeline),
        ["--no-warmup", "--grace-period-s", "60", "--cache-bytes", "0", "--log-format", "json"],
        log_path,
    )
    outcomes: list[tuple[float, float, list[str], object]] = []  # (start, end, prompts, tensor or error)
    lock = threading.Lock()
    stop = threading.Event()

    def client(worker: int) -> None:
        with RemoteTextEncoder(target, timeout=60) as enc:
            for i in range(6):
                if stop.is_set():
                    return
                prompts = [f"worker {worker} request {i}"]
                started = time.monotonic()
                try:
                    result: object = enc.encode(prompts).prompt_embeds
                except Exception as exc:  # RemoteEncoderError, or a WireError for a refused stream
                    result = exc
                with lock:
                    outcomes.append((started, time.monotonic(), prompts, result))
                if isinstance(result, Exception):
                    return

    try:
        wait_serving(target, proc, timeout=120)
        workers = [threading.Thread(target=client, args=(w,)) for w in range(4)]
        for w in workers:
            w.start()
        while sum(not isinstance(o[3], Exception) for o in outcomes) < 2:
            assert proc.poll() is None
            time.sleep(0.01)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for w in workers:
            w.join(120)
        stop.set()
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    successes = [o for o in outcomes if not isinstance(o[3], Exception)]
    errors = [o[3] for o in outcomes if isinstance(o[3], Exception)]
    assert not any(isinstance(e, codec.WireError) for e in errors)  # no stream was cut short
    # Every accepted tensor is complete and exact; every refusal is a clean UNAVAILABLE.
    for _, _, prompts, tensor in successes:
        assert torch.equal(tensor, engine.encode(prompts))  # type: ignore[arg-type]
    assert errors, "requests sent after SIGTERM must be refused"
    for start, _, _, error in outcomes:
        if not isinstance(error, Exception):
            continue
        # Refused at admission while draining: UNAVAILABLE. A call racing the final close of the
        # transport may be CANCELLED by gRPC itself; either way no tensor was accepted.
        allowed = {grpc.StatusCode.UNAVAILABLE}
        if start > signalled:
            allowed.add(grpc.StatusCode.CANCELLED)
        assert isinstance(error, RemoteEncoderError) and error.code in allowed, error
    # Drain: requests that were in flight when the signal came still finished successfully.
    assert any(start < signalled < end for start, end, _, _ in successes)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert any("draining" in line["msg"] for line in lines)
    access = [line for line in lines if line["logger"] == "flux2_encoder_server.access"]
    assert sum(line["status"] == "OK" for line in access) == len(successes)


# -- cache -------------------------------------------------------------------------------------------------


@pytest.fixture
def counted(tiny, engine):
    servers = []

    def make(**overrides):
        wrapped = FakeEngine(engine)
        thread = ServerThread(local_settings(str(tiny.pipeline), **overrides), lambda _s: wrapped).start()
        servers.append(thread)
        return thread, wrapped

    yield make
    for thread in servers:
        thread.stop()


def test_memory_cache_hits_skip_the_model_and_stay_exact(counted, engine):
    thread, wrapped = counted()
    want = engine.encode(["cached a", "cached b"])
    with RemoteTextEncoder(thread.target) as enc:
        first = enc.encode(["cached a", "cached b"])
        assert list(first.header.cache_hit) == [False, False]
        second = enc.encode(["cached b", "new c", "cached a"])
        assert list(second.header.cache_hit) == [True, False, True]
        bypass = enc.encode(["cached a"], bypass_cache=True)
        assert list(bypass.header.cache_hit) == [False]
    assert torch.equal(first.prompt_embeds, want)
    assert torch.equal(second.prompt_embeds[0], want[1]) and torch.equal(second.prompt_embeds[2], want[0])
    assert torch.equal(bypass.prompt_embeds[0], want[0])
    assert wrapped.batches == [["cached a", "cached b"], ["new c"], ["cached a"]]
    metrics = thread.server.metrics
    assert metrics.value("flux2_encoder_cache_lookups_total", {"tier": "memory", "result": "hit"}) == 2
    assert metrics.value("flux2_encoder_prompts_total", {"source": "cache"}) == 2


def test_repeated_prompts_in_one_request_run_once(counted, engine):
    thread, wrapped = counted(cache_bytes=0)
    with RemoteTextEncoder(thread.target) as enc:
        got = enc.encode(["same", "other", "same"]).prompt_embeds
    assert wrapped.batches == [["same", "other"]]
    assert torch.equal(got, engine.encode(["same", "other", "same"]))


def test_disk_cache_survives_a_restart(counted, engine, tmp_path):
    folder = tmp_path / "cache"
    first, _ = counted(cache_dir=str(folder))
    with RemoteTextEncoder(first.target) as enc:
        enc.encode(["on disk", "also on disk"])
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 2
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as fh:  # plain safetensors, the prompt in its metadata
        assert fh.metadata()["prompt"] in ("on disk", "also on disk")
    files[0].write_bytes(b"not a safetensors file")  # a damaged entry is a miss, never an error
    second, wrapped = counted(cache_dir=str(folder), cache_bytes=0)
    with RemoteTextEncoder(second.target) as enc:
        got = enc.encode(["on disk", "also on disk"])
    assert torch.equal(got.prompt_embeds, engine.encode(["on disk", "also on disk"]))
    assert sum(got.header.cache_hit) == 1 and len(wrapped.prompts_seen) == 1


def test_cache_is_keyed_by_model_and_bounded_in_bytes():
    row = torch.ones(4, 8, dtype=torch.bfloat16)  # 64 bytes
    cache = EmbeddingCache(memory_bytes=3 * 64)
    cache.put("digest-a", "p", row)
    assert cache.get("digest-b", "p") is None  # another model's entry is never served
    assert torch.equal(cache.get("digest-a", "p"), row)
    lru = MemoryLRU(3 * 64)
    for i in range(5):
        lru.put(("d", str(i)), row.clone())
        assert lru.bytes <= 3 * 64
    assert lru.get(("d", "0")) is None and lru.get(("d", "4")) is not None


# -- settings -------------------------------------------------------------------------------------------


def test_help_explains_every_setting():
    text = Settings.parser().format_help()
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert f.metadata["help"], f.name
    assert ENV_PREFIX in text


def test_settings_from_flags_and_environment(tmp_path: Path):
    env = {f"{ENV_PREFIX}MAX_INFLIGHT_BYTES": "12345", f"{ENV_PREFIX}METRICS_PORT": "0"}
    s = Settings.from_cli(["--rate-limit-prompts-per-s", "2.5", "--no-reflection"], env)
    assert (s.max_inflight_bytes, s.metrics_port, s.rate_limit_prompts_per_s, s.reflection) == (12345, 0, 2.5, False)
    for bad in (["--tls-cert", "x.pem"], ["--rate-limit-prompts-per-s", "1", "--rate-limit-burst-prompts", "2"]):
        with pytest.raises(SystemExit):
            Settings.from_cli(bad, {})


def test_operations_doc_covers_every_setting_and_metric():
    from flux2_encoder_server.errors import ServiceError
    from flux2_encoder_server.metrics import Metrics

    doc = (Path(__file__).parents[1] / "docs" / "operations.md").read_text()
    for f in dataclasses.fields(Settings):
        assert f"`--{f.name.replace('_', '-')}`" in doc, f.name
    for family in Metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in doc, name

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    for error in subclasses(ServiceError):
        assert f"`{error.grpc_code.name}` | {error.http_status} |" in doc, error.__name__


@pytest.mark.parametrize("interval_ms, expected_s", [(0.5, 0.0005), (0.0, None)])
def test_serve_sets_the_gil_switch_interval_of_its_process(tiny, interval_ms, expected_s):
    import asyncio
    import sys

    from flux2_encoder_server.server import serve

    before = sys.getswitchinterval()
    settings = local_settings(str(tiny.pipeline), gil_switch_interval_ms=interval_ms)

    def failing_load(_settings: Settings):
        raise RuntimeError("no model in this test")

    try:
        with pytest.raises(RuntimeError, match="no model in this test"):
            asyncio.run(serve(settings, failing_load))
        assert sys.getswitchinterval() == pytest.approx(expected_s if expected_s is not None else before)
    finally:
        sys.setswitchinterval(before)
    assert any("--gil-switch-interval-ms" in p for p in Settings(gil_switch_interval_ms=-1).problems())
