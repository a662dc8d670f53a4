"""Bearer-token auth, per-token limits, reflection behind auth, TLS and mutual TLS with certificates made
here, and the access log naming the caller. The engine is `FakeEngine` (a fixed row per prompt, no model
time): what is tested is who gets in, not the model's bytes."""

from __future__ import annotations

import io
import logging
import ssl
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from flux2_client.remote import RemoteEncoderError, RemoteTextEncoder
from flux2_encoder_server.security import TokenAuthenticator, bearer_token, parse_token_lines
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings, wait_until
from flux2split_proto import SERVICE_NAME, shared
from flux2split_proto.v1 import encoder_pb2 as pb
from flux2split_proto.v1 import encoder_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-fedcba9876543210"


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# label:token\nalice:{ALICE}\n\n")
    return path


def alone(prompts: list[str]) -> torch.Tensor:
    """The rows of `prompts` encoded by themselves, on an engine of their own."""
    return FakeEngine().encode(prompts)


@pytest.fixture(scope="module")
def authed(token_file):
    # One token from the file, one from the inline/env setting.
    engine = FakeEngine()
    thread = ServerThread(
        local_settings(auth_tokens_file=str(token_file), auth_tokens=f"bob:{BOB}"), lambda _s: engine
    ).start()
    yield thread
    thread.stop()


def _health(target: str, credentials: grpc.ChannelCredentials | None = None) -> int:
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status


@pytest.mark.parametrize("token", [None, "", "wrong-token-0000000000000", ALICE[:-1], ALICE + "x"])
def test_missing_or_wrong_token_is_unauthenticated(authed, token):
    with RemoteTextEncoder(authed.target, token=token) as enc:
        for call in (lambda: enc.encode("hello"), enc.info):
            with pytest.raises(RemoteEncoderError) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_token(authed):
    assert _health(authed.target) == health_pb2.HealthCheckResponse.SERVING


def test_each_token_works_and_is_named_in_the_access_log(authed, caplog):
    caplog.set_level(logging.INFO, logger="flux2_encoder_server.access")
    for token, label in ((ALICE, "alice"), (BOB, "bob")):
        with RemoteTextEncoder(authed.target, token=token) as enc:
            got = enc.encode("authorized prompt", request_id=f"req-{label}").prompt_embeds
            assert enc.info().api_version == "v1"
        assert torch.equal(got, alone(["authorized prompt"]))
    with RemoteTextEncoder(authed.target, token="not-a-valid-token-000000") as enc, pytest.raises(RemoteEncoderError):
        enc.encode("refused")
    lines = [r.fields for r in caplog.records if r.name == "flux2_encoder_server.access"]
    by_id = {line["request_id"]: line for line in lines}
    assert by_id["req-alice"]["principal"] == "alice" and by_id["req-alice"]["status"] == "OK"
    assert by_id["req-bob"]["principal"] == "bob"
    assert by_id["req-bob"]["bytes_sent"] == 512 * 192 * 2
    assert {"queue_s", "encode_s", "serialize_s", "send_s", "total_s"} <= set(by_id["req-alice"])
    assert any(line["status"] == "UNAUTHENTICATED" for line in lines)
    assert all(ALICE not in str(line) and BOB not in str(line) for line in lines)  # tokens never logged


def test_reflection_needs_a_token(authed):
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(authed.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = list(
            stub.ServerReflectionInfo(iter([request]), timeout=10, metadata=(("authorization", f"Bearer {ALICE}"),))
        )
    names = {s.name for s in answers[0].list_services_response.service}
    assert SERVICE_NAME in names and "grpc.health.v1.Health" in names


def test_token_parsing():
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token(None) is None
    with pytest.raises(ValueError, match="label:token"):
        parse_token_lines(["no-separator-here-at-all"], "f")
    with pytest.raises(ValueError, match="at least 16"):
        parse_token_lines(["a:short"], "f")
    with pytest.raises(ValueError, match="used twice"):
        parse_token_lines([f"a:{ALICE}", f"a:{BOB}"], "f")
    auth = TokenAuthenticator({"alice": ALICE})
    assert auth.authenticate(ALICE).name == "alice"
    assert TokenAuthenticator({}).authenticate(None).name == "anonymous"  # auth off


# -- secrets are never printed -----------------------------------------------------------------------------
def test_tokens_never_appear_in_help_repr_or_settings_errors(capsys, monkeypatch):
    from flux2_encoder_server import cli
    from flux2_encoder_server.settings import SecretStr, Settings

    env = {"FLUX2_ENCODER_AUTH_TOKENS": f"alice:{ALICE}"}
    monkeypatch.setenv("FLUX2_ENCODER_AUTH_TOKENS", env["FLUX2_ENCODER_AUTH_TOKENS"])
    with pytest.raises(SystemExit) as stopped:
        cli.main(["serve", "--help"])
    assert stopped.value.code == 0
    shown = capsys.readouterr().out
    assert "--auth-tokens" in shown and "FLUX2_ENCODER_AUTH_TOKENS" in shown
    assert ALICE not in shown

    for settings in (
        Settings.from_cli([], env),
        Settings.from_cli(["--auth-tokens", f"bob:{BOB}"], {}),
        local_settings("m", auth_tokens=f"bob:{BOB}"),  # a plain str is wrapped too
    ):
        assert isinstance(settings.auth_tokens, SecretStr)
        for text in (repr(settings), str(settings), f"{settings.auth_tokens}", repr(settings.auth_tokens)):
            assert ALICE not in text and BOB not in text
    assert Settings.from_cli([], env).auth_tokens.get_secret_value() == f"alice:{ALICE}"

    # Unusable token settings are refused with a message naming the entry, never the token.
    short = "short-secret-15"
    for bad in (f"alice:{short}", f"alice:{ALICE},alice:{BOB}", ALICE, f"alice:{ALICE},,bob"):
        for argv, environ in ((["--auth-tokens", bad], {}), ([], {"FLUX2_ENCODER_AUTH_TOKENS": bad})):
            with pytest.raises(SystemExit):
                Settings.from_cli(argv, environ)
            refused = capsys.readouterr()
            assert "auth-tokens" in refused.err, refused.err
            for secret in (short, ALICE, BOB):
                assert secret not in refused.err + refused.out


def test_tokens_never_appear_in_logs_or_answers(token_file, caplog):
    """A server configured with tokens from the file and the environment: its start-up and access logs,
    and every error it sends over gRPC and HTTP (including for near-miss tokens), never hold a token."""
    import httpx
    from flux2_encoder_server.settings import Settings

    near_misses = [ALICE[:-1], ALICE + "x", BOB.upper()]
    caplog.set_level(logging.DEBUG)
    settings = Settings.from_cli(
        ["--model", "fake", "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--no-warmup"],
        {"FLUX2_ENCODER_AUTH_TOKENS_FILE": str(token_file), "FLUX2_ENCODER_AUTH_TOKENS": f"bob:{BOB}"},
    )
    answers: list[str] = []
    with ServerThread(settings, lambda _s: FakeEngine()) as server:
        for token in (None, *near_misses):
            with RemoteTextEncoder(server.target, token=token) as enc:
                for call in (lambda enc=enc: enc.encode("hello"), enc.info):
                    with pytest.raises(RemoteEncoderError) as err:
                        call()
                    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
                    answers.append(str(err.value))
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            refused = httpx.post(server.http_url + "/predict", json={"prompt": "hello"}, headers=headers)
            assert refused.status_code == 401
            answers.append(refused.text + str(refused.headers))
        with RemoteTextEncoder(server.target, token=ALICE) as enc:
            enc.encode("ok")
            with pytest.raises(RemoteEncoderError) as err:
                enc.encode(["x" * 30000])
            answers.append(str(err.value))
    logged = [record.getMessage() + str(getattr(record, "fields", "")) for record in caplog.records]
    assert any("alice" in line and "bob" in line for line in logged)  # the start-up line names the labels
    assert any('"principal": "alice"' in line or "'principal': 'alice'" in line for line in logged)
    for text in answers + logged:
        for secret in (ALICE, BOB, *near_misses):
            assert secret not in text, text


def test_per_token_rate_limit():
    settings = local_settings(
        auth_tokens=f"alice:{ALICE},bob:{BOB}",
        rate_limit_prompts_per_s=0.001,
        rate_limit_burst_prompts=4,
        max_prompts_per_request=4,
    )
    thread = ServerThread(settings, lambda _s: FakeEngine()).start()
    try:
        with RemoteTextEncoder(thread.target, token=ALICE) as alice, RemoteTextEncoder(thread.target, token=BOB) as bob:
            alice.encode(["one", "two", "three"])
            alice.encode("four")
            with pytest.raises(RemoteEncoderError) as err:
                alice.encode("five")
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "rate_limit_prompts_per_s=0.001" in err.value.message and "'alice'" in err.value.message
            bob.encode(["bob has his own bucket"])
        # The suggested delay travels as google.rpc.RetryInfo: the time the bucket needs to refill.
        with grpc.insecure_channel(thread.target) as channel:
            stub = pb_grpc.TextEncoderStub(channel)
            call = stub.Encode(pb.EncodeRequest(prompts=["six"]), metadata=(("authorization", f"Bearer {ALICE}"),))
            with pytest.raises(grpc.RpcError) as raw:
                list(call)
        assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "rate_limit_prompts_per_s" in raw.value.details()
        assert 900 < shared.retry_delay_from_call(raw.value) <= 1000  # one prompt at 0.001/s
        metrics = thread.server.metrics
        assert metrics.value("flux2_encoder_rejected_total", {"limit": "rate_limit_prompts_per_s"}) == 2
    finally:
        thread.stop()


def test_per_token_concurrency_limit():
    wrapped = FakeEngine()
    settings = local_settings(
        auth_tokens=f"alice:{ALICE},bob:{BOB}", max_concurrent_requests_per_token=1, cache_bytes=0
    )
    thread = ServerThread(settings, lambda _s: wrapped).start()
    try:
        with ThreadPoolExecutor(2) as pool:
            wrapped.hold()
            first = pool.submit(RemoteTextEncoder(thread.target, token=ALICE).encode, "alice first")
            assert wrapped.entered.wait(30)
            with RemoteTextEncoder(thread.target, token=ALICE) as alice, pytest.raises(RemoteEncoderError) as err:
                alice.encode("alice second")
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_concurrent_requests_per_token=1" in err.value.message
            other = pool.submit(RemoteTextEncoder(thread.target, token=BOB).encode, "bob meanwhile")
            wait_until(lambda: thread.core.queued_requests == 1, what="bob's request to be admitted")
            wrapped.release()
            first.result(30)
            other.result(30)
        with RemoteTextEncoder(thread.target, token=ALICE) as alice:
            alice.encode("alice again")
    finally:
        wrapped.release_all()
        thread.stop()


# -- TLS ------------------------------------------------------------------------------------------------


def test_tls(certs):
    settings = local_settings(
        tls_cert=str(certs["server_cert"]),
        tls_key=str(certs["server_key"]),
        auth_tokens=f"alice:{ALICE}",
        http_port=0,
    )
    thread = ServerThread(settings, lambda _s: FakeEngine()).start()
    ca = certs["ca"].read_bytes()
    try:
        with RemoteTextEncoder(thread.target, token=ALICE, root_certificates=ca) as enc:
            assert torch.equal(enc.encode("over TLS").prompt_embeds, alone(["over TLS"]))
        assert _health(thread.target, grpc.ssl_channel_credentials(ca)) == health_pb2.HealthCheckResponse.SERVING
        with RemoteTextEncoder(thread.target, token=ALICE, timeout=5) as plaintext, pytest.raises(RemoteEncoderError):
            plaintext.encode("plaintext to a TLS port")
        # /predict is HTTPS with the same certificate: the bearer token never crosses in the clear.
        assert thread.http_url.startswith("https://")
        verify = ssl.create_default_context(cafile=str(certs["ca"]))
        headers = {"authorization": f"Bearer {ALICE}"}
        url = thread.http_url + "/predict"
        answer = httpx.post(url, json={"prompt": ["over HTTPS"]}, headers=headers, verify=verify, timeout=30)
        assert answer.status_code == 200
        assert torch.equal(torch.load(io.BytesIO(answer.content)), alone(["over HTTPS"]))
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the HTTPS port: no answer in the clear
            httpx.post(url.replace("https://", "http://"), json={"prompt": ["x"]}, headers=headers, timeout=5)
    finally:
        thread.stop()


def test_mutual_tls(certs):
    settings = local_settings(
        tls_cert=str(certs["server_cert"]),
        tls_key=str(certs["server_key"]),
        tls_client_ca=str(certs["ca"]),
        http_port=0,
    )
    thread = ServerThread(settings, lambda _s: FakeEngine()).start()
    ca = certs["ca"].read_bytes()
    try:
        with RemoteTextEncoder(
            thread.target,
            root_certificates=ca,
            client_certificate=certs["client_cert"].read_bytes(),
            client_private_key=certs["client_key"].read_bytes(),
        ) as enc:
            assert torch.equal(enc.encode("over mTLS").prompt_embeds, alone(["over mTLS"]))
        with RemoteTextEncoder(thread.target, root_certificates=ca, timeout=5) as no_cert:
            with pytest.raises(RemoteEncoderError) as err:
                no_cert.encode("no client certificate")
            assert err.value.code == grpc.StatusCode.UNAVAILABLE  # the handshake is refused
        # HTTPS /predict asks for a client certificate too.
        url = thread.http_url + "/predict"
        with_cert = ssl.create_default_context(cafile=str(certs["ca"]))
        with_cert.load_cert_chain(certs["client_cert"], certs["client_key"])
        answer = httpx.post(url, json={"prompt": ["over mTLS"]}, verify=with_cert, timeout=30)
        assert answer.status_code == 200
        assert torch.equal(torch.load(io.BytesIO(answer.content)), alone(["over mTLS"]))
        with pytest.raises(httpx.HTTPError):
            no_cert_context = ssl.create_default_context(cafile=str(certs["ca"]))
            httpx.post(url, json={"prompt": ["x"]}, verify=no_cert_context, timeout=5)
    finally:
        thread.stop()
