"""Operations: SIGTERM drain of a real server process, the embedding cache (memory and disk), settings."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from flux2_client.demo import wait_serving
from flux2_client.remote import RemoteEncoderError, RemoteTextEncoder
from flux2_encoder_server.cache import EmbeddingCache, MemoryLRU
from flux2_encoder_server.settings import ENV_PREFIX, SecretStr, Settings
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings
from flux2split_proto import codec
from flux2split_proto.v1 import encoder_pb2 as pb
from flux2split_proto.v1 import encoder_pb2_grpc as pb_grpc

# -- SIGTERM ---------------------------------------------------------------------------------------------


#: `flux2-encoder-server serve` (settings from the same flags, the same logging, the same `serve` with its
#: signal handlers) over a `FakeEngine` whose batches take 50 ms a prompt, so requests are in flight when
#: the signal comes without the cost of the model (what SIGTERM does is the server's, not the model's).
_SERVE_FAKE = """
import asyncio, sys
from flux2_encoder_server.logs import configure_logging
from flux2_encoder_server.server import serve
from flux2_encoder_server.settings import Settings
from flux2_encoder_server.testing import FakeEngine
settings = Settings.from_cli(sys.argv[1:], {})
configure_logging(settings.log_level, settings.log_format)
asyncio.run(serve(settings, lambda _s: FakeEngine(device_ms_per_prompt=50)))
"""


def _queue_depth(metrics_url: str) -> float:
    """The server's `flux2_encoder_queue_depth` (every model's): admitted requests waiting for the model."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    return sum(sample.value for sample in families["flux2_encoder_queue_depth"].samples)


def test_sigterm_mid_load_drains_and_exits(tmp_path):
    import subprocess
    import sys

    log_path = tmp_path / "server.log"
    flags = ["--model", "fake", "--device", "cpu", "--host", "127.0.0.1", "--port", "0", "--no-warmup"]
    flags += ["--grace-period-s", "60", "--cache-bytes", "0", "--log-format", "json"]
    flags += ["--metrics-port", "0", "--metrics-host", "127.0.0.1"]
    with log_path.open("w") as log:
        cmd = [sys.executable, "-c", _SERVE_FAKE, *flags]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    listening = re.search(r"listening on 127\.0\.0\.1:(\d+)", proc.stdout.readline())
    assert listening, log_path.read_text()
    target = f"127.0.0.1:{listening.group(1)}"
    metrics_url = re.search(r"metrics on (http://\S+)", proc.stdout.readline())
    assert metrics_url, log_path.read_text()
    alone = FakeEngine()
    outcomes: list[tuple[float, float, list[str], object, str]] = []  # (start, end, prompts, tensor/error, id)
    lock = threading.Lock()
    stop = threading.Event()

    def client(worker: int) -> None:
        with RemoteTextEncoder(target, timeout=60) as enc:
            for i in range(6):
                if stop.is_set():
                    return
                prompts = [f"worker {worker} request {i}"]
                request_id = f"w{worker}-r{i}"
                started = time.monotonic()
                try:
                    result: object = enc.encode(prompts, request_id=request_id).prompt_embeds
                except Exception as exc:  # RemoteEncoderError, or a WireError for a refused stream
                    result = exc
                with lock:
                    outcomes.append((started, time.monotonic(), prompts, result, request_id))
                if isinstance(result, Exception):
                    return

    try:
        wait_serving(target, proc, timeout=120)
        workers = [threading.Thread(target=client, args=(w,)) for w in range(4)]
        for w in workers:
            w.start()
        # Signal while a request waits in the server's queue behind a running batch: it was admitted, so the
        # drain must finish it, and it is still at least one batch (>= 50 ms) from done when the signal lands.
        # (Signalling on the clients' own counts raced: all four could be between requests at that moment.)
        while sum(not isinstance(o[3], Exception) for o in outcomes) < 2 or _queue_depth(metrics_url[1]) < 1:
            assert proc.poll() is None
            time.sleep(0.005)
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
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "flux2_encoder_server.access"]
    seen_by_server = {line["request_id"] for line in access}
    assert not any(isinstance(e, codec.WireError) for e in errors)  # no stream was cut short
    # Every accepted tensor is complete and exact; every refusal is a clean UNAVAILABLE.
    for _, _, prompts, tensor, _ in successes:
        assert torch.equal(tensor, alone.encode(prompts))  # type: ignore[arg-type]
    assert errors, "requests sent after SIGTERM must be refused"
    for start, _, _, error, request_id in outcomes:
        if not isinstance(error, Exception):
            continue
        # Refused at admission while draining: UNAVAILABLE. A call racing the final close of the
        # transport may be CANCELLED by gRPC itself, if it was sent after the signal or never reached the
        # server (not in its access log: a call sent just before the signal can arrive after the close on a
        # loaded machine); either way no tensor was accepted and no request the server saw was lost.
        allowed = {grpc.StatusCode.UNAVAILABLE}
        if start > signalled or request_id not in seen_by_server:
            allowed.add(grpc.StatusCode.CANCELLED)
        assert isinstance(error, RemoteEncoderError) and error.code in allowed, error
    # Drain: requests that were in flight when the signal came still finished successfully.
    assert any(start < signalled < end for start, end, _, _, _ in successes)
    assert any("draining" in line["msg"] for line in lines)
    assert sum(line["status"] == "OK" for line in access) == len(successes)


# -- cache -------------------------------------------------------------------------------------------------


@pytest.fixture
def counted():
    """Servers over `FakeEngine`s (a fixed row per prompt, no model time) that count what reaches them."""
    servers = []

    def make(**overrides):
        wrapped = FakeEngine()
        thread = ServerThread(local_settings(**overrides), lambda _s: wrapped).start()
        servers.append(thread)
        return thread, wrapped

    yield make
    for thread in servers:
        thread.stop()


def test_memory_cache_hits_skip_the_model_and_stay_exact(counted):
    engine = FakeEngine()  # the rows each prompt has alone
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


def test_repeated_prompts_in_one_request_run_once(counted):
    engine = FakeEngine()  # the rows each prompt has alone
    thread, wrapped = counted(cache_bytes=0)
    with RemoteTextEncoder(thread.target) as enc:
        got = enc.encode(["same", "other", "same"]).prompt_embeds
    assert wrapped.batches == [["same", "other"]]
    assert torch.equal(got, engine.encode(["same", "other", "same"]))


def test_disk_cache_survives_a_restart(counted, tmp_path):
    engine = FakeEngine()  # the rows each prompt has alone
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


#: A value other than the default for every setting (a setting added without one here fails the tests
#: below). Only `dtype` has a single choice, so its value is its default.
NON_DEFAULT: dict[str, object] = {
    "model": "some-org/some-model",
    "default_model": "default",
    "model_setting": "default.max_batch_prompts=3",
    "revision": "0123abc",
    "text_encoder_subfolder": "te",
    "tokenizer_subfolder": "tok",
    "device": "cuda:1",
    "dtype": "bfloat16",
    "precision": "nf4",
    "batching_mode": "dynamic",
    "compile": True,
    "cuda_graphs": True,
    "host": "127.0.0.2",
    "port": 50111,
    "http_port": 8088,
    "http_max_body_bytes": 5000,
    "max_batch_prompts": 7,
    "max_wait_ms": 2.5,
    "launch_lead_ms": 20.0,
    "balance_batches": False,
    "pipeline_depth": 1,
    "max_prompts_per_request": 9,
    "max_prompt_chars": 99,
    "max_queued_requests": 5,
    "max_inflight_bytes": 123456789,
    "default_timeout_s": 7.5,
    "send_timeout_s": 9.5,
    "http_read_timeout_s": 4.5,
    "http_max_concurrent_requests": 17,
    "chunk_bytes": 4096,
    "gil_switch_interval_ms": 0.5,
    "auth_tokens_file": "/etc/flux2/tokens",
    "auth_tokens": "ops:ops-token-0123456789abcdef",
    "rate_limit_prompts_per_s": 2.0,
    "rate_limit_burst_prompts": 200,
    "max_concurrent_requests_per_token": 3,
    "tls_cert": "/etc/flux2/tls.crt",
    "tls_key": "/etc/flux2/tls.key",
    "tls_client_ca": "/etc/flux2/ca.crt",
    "reflection": False,
    "cache_bytes": 1000,
    "cache_dir": "/var/cache/flux2",
    "cache_dir_bytes": 5000,
    "metrics_port": 9100,
    "metrics_host": "127.0.0.3",
    "grace_period_s": 3.0,
    "warmup": False,
    "unhealthy_after_failed_batches": 5,
    "self_test_interval_s": 12.5,
    "log_level": "DEBUG",
    "log_format": "text",
    "upsampling": True,
    "upsample_share": 0.5,
    "upsample_max_queued_requests": 7,
    "upsample_max_prompts": 3,
    "upsample_max_new_tokens": 100,
    "upsample_max_temperature": 1.5,
    "upsample_max_images": 4,
    "upsample_max_image_bytes": 1000000,
    "upsample_max_image_pixels": 1000000,
    "frontends": 3,
}


def _plain(value: object) -> object:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def _flag_args(values: dict[str, object]) -> list[str]:
    args: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


@pytest.mark.parametrize("source", ["flags", "environment"])
def test_every_setting_reaches_serve_from_its_flag_and_its_environment_variable(source, monkeypatch):
    """`flux2-encoder-server serve` hands `serve()` exactly what each flag / variable says, and applies the
    logging settings itself."""
    import logging

    from flux2_encoder_server import cli, server
    from flux2_encoder_server.logs import TextFormatter

    fields = {f.name: f for f in dataclasses.fields(Settings)}
    assert set(NON_DEFAULT) == set(fields), "every setting needs a non-default value in NON_DEFAULT"
    for name, value in NON_DEFAULT.items():
        assert value != fields[name].default or len(fields[name].metadata.get("choices", ())) == 1, name
    for name in fields:
        monkeypatch.delenv(ENV_PREFIX + name.upper(), raising=False)
    argv = ["serve"]
    if source == "flags":
        argv += _flag_args(NON_DEFAULT)
    else:
        for name, value in NON_DEFAULT.items():
            monkeypatch.setenv(ENV_PREFIX + name.upper(), str(value).lower() if isinstance(value, bool) else str(value))
    received: list[Settings] = []

    async def fake_serve(settings: Settings) -> None:
        received.append(settings)

    monkeypatch.setattr(server, "serve", fake_serve)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        assert cli.main(argv) == 0
        assert root.level == logging.DEBUG and isinstance(root.handlers[0].formatter, TextFormatter)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    (settings,) = received
    for name, value in NON_DEFAULT.items():
        assert _plain(getattr(settings, name)) == value, name


def test_the_running_server_reads_every_setting_and_obeys_flags_and_environment(tiny):
    """One server built from a mix of flags and variables: every setting is read by the running server
    (start, load, a request over each front-end, stop) and a few observable ones change its behaviour."""
    import httpx
    from flux2_encoder_server.server import load_engine
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    token = "ops-token-0123456789abcdef"
    flags = ["--model", str(tiny.pipeline), "--device", "cpu", "--host", "127.0.0.1", "--port", "0", "--http-port", "0"]
    flags += ["--max-prompts-per-request", "5", "--max-batch-prompts", "2", "--no-reflection"]
    env = {
        f"{ENV_PREFIX}AUTH_TOKENS": f"ops:{token}",
        f"{ENV_PREFIX}MAX_PROMPT_CHARS": "50",
        f"{ENV_PREFIX}CHUNK_BYTES": "4096",
        f"{ENV_PREFIX}CACHE_BYTES": "0",
        f"{ENV_PREFIX}METRICS_PORT": "0",
        f"{ENV_PREFIX}METRICS_HOST": "127.0.0.1",
    }
    parsed = Settings.from_cli(flags, env)
    read: set[str] = set()
    names = {f.name for f in dataclasses.fields(Settings)}

    class RecordingSettings(Settings):
        def __getattribute__(self, name: str):
            if name in names:
                read.add(name)
            return super().__getattribute__(name)

    settings = RecordingSettings(**{name: getattr(parsed, name) for name in names})
    read.clear()  # construction reads every field once
    loaded: list[FakeEngine] = []

    def load_and_count(s: Settings) -> FakeEngine:
        load_engine(s)  # the real loader, so the model settings are read too
        loaded.append(FakeEngine())  # answers without the model's time: what is tested is the settings
        return loaded[0]

    auth = (("authorization", f"Bearer {token}"),)
    with ServerThread(settings, load_and_count) as server:
        (fake,) = loaded
        fake.reset_counts()  # the warm-up batch
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.TextEncoderStub(channel)
            with pytest.raises(grpc.RpcError) as err:  # FLUX2_ENCODER_AUTH_TOKENS: a token is required
                list(stub.Encode(pb.EncodeRequest(prompts=["a"]), timeout=30))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            info = stub.Info(pb.InfoRequest(), metadata=auth, timeout=30)
            assert (info.limits.max_prompts_per_request, info.limits.max_prompt_chars) == (5, 50)
            assert (info.limits.chunk_bytes, info.limits.max_batch_prompts) == (4096, 2)
            for prompts, needle in ((["p"] * 6, "max_prompts_per_request=5"), (["x" * 51], "max_prompt_chars=50")):
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.Encode(pb.EncodeRequest(prompts=prompts), metadata=auth, timeout=30))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
            five = [f"prompt {i}" for i in range(5)]
            for _ in range(2):  # --cache-bytes 0: the second time runs the model again
                responses = list(stub.Encode(pb.EncodeRequest(prompts=five), metadata=auth, timeout=60))
                assert max(len(r.chunk.data) for r in responses[1:]) == 4096
            with pytest.raises(grpc.RpcError) as err:  # --no-reflection
                list(
                    reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=auth, timeout=10
                    )
                )
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert max(len(batch) for batch in fake.batches) == 2 and fake.prompts_seen == five + five
        answer = httpx.post(
            server.http_url + "/predict", json={"prompt": "over http"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert answer.status_code == 200
        scraped = httpx.get(f"http://127.0.0.1:{server.server.metrics_port}/metrics").text
        assert 'flux2_encoder_requests_total{code="OK",frontend="http",model="default"} 1.0' in scraped
        server.stop(grace=None)  # the drain of SIGTERM: --grace-period-s
    # Read by `serve` and the CLI, not by the server object (the test above covers them); the key and the
    # client CA only with --tls-cert (test_server_security's TLS tests serve with them).
    unread = {"gil_switch_interval_ms", "log_level", "log_format", "tls_key", "tls_client_ca"}
    assert names - read == unread, names - read


def test_settings_from_flags_and_environment(tmp_path: Path):
    env = {f"{ENV_PREFIX}MAX_INFLIGHT_BYTES": "12345", f"{ENV_PREFIX}METRICS_PORT": "0"}
    s = Settings.from_cli(["--rate-limit-prompts-per-s", "2.5", "--no-reflection"], env)
    assert (s.max_inflight_bytes, s.metrics_port, s.rate_limit_prompts_per_s, s.reflection) == (12345, 0, 2.5, False)
    for bad in (["--tls-cert", "x.pem"], ["--rate-limit-prompts-per-s", "1", "--rate-limit-burst-prompts", "2"]):
        with pytest.raises(SystemExit):
            Settings.from_cli(bad, {})


def test_operations_doc_covers_every_setting_and_metric():
    from flux2_encoder_server.errors import service_errors
    from flux2_encoder_server.grpc_service import GRPC_STATUS
    from flux2_encoder_server.http_app import HTTP_STATUS
    from flux2_encoder_server.metrics import Metrics

    doc = (Path(__file__).parents[1] / "docs" / "operations.md").read_text()
    for f in dataclasses.fields(Settings):
        assert f"`--{f.name.replace('_', '-')}`" in doc, f.name
    for family in Metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in doc, name
    for error in service_errors():
        assert f"`{GRPC_STATUS[error].name}` | {HTTP_STATUS[error]} |" in doc, error.__name__


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
