"""The HTTP /predict compatibility front-end: the hosted endpoint's contract on the same core as gRPC.

The request code of the FLUX.2 docs snippet, of diffusers' train_dreambooth_lora_flux2.py and of the
ComfyUI node "Remote FLUX.2 Text Encoder (HF)" (`requests` + JSON + bearer + `torch.load`), pointed at our
URL, must get tensors bit-identical to our gRPC answer and to diffusers' own encode; every client mistake
must get a JSON 4xx, never a 500.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time

import httpx
import pytest
import requests
import torch
from diffusers import Flux2Pipeline
from flux2_client.http_encoder import HttpEncoderError, HttpTextEncoder
from flux2_client.remote import RemoteTextEncoder
from flux2_client.training import compute_remote_text_embeddings
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings
from flux2split_proto import shared
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TOKEN = "test-token-for-issue-5"
MAX_BODY = 64 << 10
PROMPTS = ["a red fox sleeping in fresh snow", "[IMG]a cat next to a dog", "un café à Paris — 東京の夜景 🦊"]


def http_settings(model: str = "fake"):
    return local_settings(
        model,
        http_port=0,
        http_max_body_bytes=MAX_BODY,
        max_prompts_per_request=8,
        max_prompt_chars=2000,
        auth_tokens=f"tester:{TOKEN}",
    )


@pytest.fixture(scope="module")
def http_server(tiny, engine):
    thread = ServerThread(http_settings(str(tiny.pipeline)), lambda _s: engine).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def fuzz_http_server(engine):
    """`http_server`'s settings over fixed rows (no decoder time); every batch still goes through the real
    engine's tokenizer and chat template, where the text is read."""
    thread = ServerThread(http_settings(), lambda _s: FakeEngine(tokenize=engine.tokenize)).start()
    yield thread
    thread.stop()


def predict_url(server: ServerThread) -> str:
    return server.http_url + "/predict"


# -- the request code users already have, pointed at our URL -------------------------------------------
def docs_snippet_remote_text_encoder(url: str, token: str, prompts):
    """The request code of `remote_text_encoder(prompts)` in the FLUX.2 docs (docs/flux2_dev_hf.md)."""
    response = requests.post(
        url,
        json={"prompt": prompts},
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert response.status_code == 200, f"{response.status_code=}"
    return torch.load(io.BytesIO(response.content))


def training_script_remote_text_embeddings(url: str, token: str, prompts):
    """The request code of `compute_remote_text_embeddings` in diffusers'
    examples/dreambooth/train_dreambooth_lora_flux2.py: one request per prompt, rows concatenated,
    text ids from the pipeline's static helper."""

    def encode_single(prompt: str):
        response = requests.post(
            url,
            json={"prompt": prompt},
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        assert response.status_code == 200, f"{response.status_code=}"
        return torch.load(io.BytesIO(response.content))

    if isinstance(prompts, (list, tuple)):
        prompt_embeds = torch.cat([encode_single(p) for p in prompts], dim=0)
    else:
        prompt_embeds = encode_single(prompts)
    return prompt_embeds, Flux2Pipeline._prepare_text_ids(prompt_embeds)


def comfyui_node_remote_encoder(prompts, endpoint_url=None, api_token=None, timeout=60):
    """The request code of `call_flux2_remote_encoder` in the ComfyUI node "Remote FLUX.2 Text Encoder (HF)"
    (vimal-v-2006/ComfyUI-Remote-FLUX2-Text-Encoder-HuggingFace, remote_flux2_text_encoder_hf.py): the URL
    from the node's `hf_endpoint_url` field or `HF_FLUX2_REMOTE_ENCODER_URL`, the JSON body sent as `data=`,
    the bearer token, a timeout, `raise_for_status`, `torch.load` onto the CPU. The node calls it once for
    the positive prompt and once for a non-empty negative prompt, each a single string."""
    url = endpoint_url or os.environ.get(
        "HF_FLUX2_REMOTE_ENCODER_URL", "https://remote-text-encoder-flux-2.huggingface.co/predict"
    )
    headers = {"Content-Type": "application/json"}
    if api_token:
        headers["Authorization"] = f"Bearer {api_token}"
    resp = requests.post(url, headers=headers, data=json.dumps({"prompt": prompts}), timeout=timeout)
    resp.raise_for_status()
    return torch.load(io.BytesIO(resp.content), map_location="cpu")


def test_comfyui_node_request_gets_the_grpc_tensor(http_server, monkeypatch):
    monkeypatch.setenv("HF_FLUX2_REMOTE_ENCODER_URL", predict_url(http_server))
    with RemoteTextEncoder(http_server.target, token=TOKEN) as enc:
        for prompt in (PROMPTS[0], PROMPTS[2]):  # a positive and a negative prompt, as the node sends them
            got = comfyui_node_remote_encoder(prompt, api_token=TOKEN)
            assert got.dtype == torch.bfloat16 and got.shape == (1, 512, 192)
            assert torch.equal(got, enc.encode(prompt).prompt_embeds)
    monkeypatch.delenv("HF_FLUX2_REMOTE_ENCODER_URL")
    # The node's field instead of the environment; a wrong token fails raise_for_status with the 401.
    assert torch.equal(comfyui_node_remote_encoder(PROMPTS[2], predict_url(http_server), TOKEN), got)
    with pytest.raises(requests.HTTPError) as err:
        comfyui_node_remote_encoder(PROMPTS[0], predict_url(http_server), "not-the-token")
    assert err.value.response.status_code == 401


def test_docs_snippet_request_is_bit_identical_to_grpc_and_diffusers(http_server, reference_pipe):
    url = predict_url(http_server)
    with RemoteTextEncoder(http_server.target, token=TOKEN) as enc:
        for prompts in (PROMPTS[0], PROMPTS):
            got = docs_snippet_remote_text_encoder(url, TOKEN, prompts)
            want, _ = reference_pipe.encode_prompt(prompt=prompts, device=torch.device("cpu"))
            over_grpc = enc.encode(prompts).prompt_embeds
            assert got.dtype == torch.bfloat16
            assert got.shape == (1 if isinstance(prompts, str) else len(prompts), 512, 192)
            assert torch.equal(got, want)
            assert torch.equal(got, over_grpc)
    assert not torch.equal(got[0], got[1])  # rows differ: equality above is not of a constant


def test_training_script_request_is_bit_identical_to_grpc_and_diffusers(http_server, reference_pipe):
    url = predict_url(http_server)
    for prompts in (PROMPTS[1], PROMPTS):
        embeds, text_ids = training_script_remote_text_embeddings(url, TOKEN, prompts)
        want_embeds, want_ids = reference_pipe.encode_prompt(prompt=prompts, device=torch.device("cpu"))
        assert torch.equal(embeds, want_embeds)
        assert torch.equal(text_ids, want_ids)
        with RemoteTextEncoder(http_server.target, token=TOKEN) as enc:
            assert torch.equal(embeds, enc.encode(prompts).prompt_embeds)


def test_response_is_a_plain_tensor_that_loads_with_weights_only(http_server, engine):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    response = requests.post(predict_url(http_server), json={"prompt": "x"}, headers=headers)
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["x-flux2-fingerprint"] == engine.fingerprint.digest
    tensor = torch.load(io.BytesIO(response.content), weights_only=True)
    # torch.save of a view would carry its whole base storage: the body holds exactly one prompt.
    assert tensor.untyped_storage().nbytes() == 512 * 192 * 2


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_training_helper_matches_the_training_script(http_server, reference_pipe, transport):
    if transport == "http":
        encoder = HttpTextEncoder(predict_url(http_server), token=TOKEN)
    else:
        encoder = RemoteTextEncoder(http_server.target, token=TOKEN)
    with encoder:
        for prompts in (PROMPTS[2], PROMPTS):
            embeds, text_ids = compute_remote_text_embeddings(prompts, encoder, device="cpu", request_prompts=2)
            want_embeds, want_ids = reference_pipe.encode_prompt(prompt=prompts, device=torch.device("cpu"))
            assert torch.equal(embeds, want_embeds)
            assert torch.equal(text_ids, want_ids)


def test_training_helper_reports_http_errors(http_server):
    with HttpTextEncoder(http_server.http_url, token="wrong") as encoder, pytest.raises(HttpEncoderError) as err:
        encoder.encode("a prompt")
    assert err.value.http_status == 401
    assert err.value.code.name == "UNAUTHENTICATED"


# -- client mistakes: a JSON 4xx naming the field or limit, and the server keeps serving ----------------
def post(server: ServerThread, content, headers: dict[str, str] | None = None, token: str | None = TOKEN):
    headers = dict(headers or {})
    if token is not None:
        headers.setdefault("Authorization", f"Bearer {token}")
    return httpx.post(predict_url(server), content=content, headers=headers, timeout=60)


def error_of(response) -> dict:
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"code", "message"}
    return error


@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        (b'{"prompt": "unterminated', "INVALID_ARGUMENT", "not valid JSON"),
        (b"\xff\xfe\xfa not utf-8", "INVALID_ARGUMENT", "not valid JSON"),
        (b"[" * 50_000, "INVALID_ARGUMENT", "not valid JSON"),
        (b'["a prompt"]', "INVALID_ARGUMENT", '{"prompt"'),
        (b'{"prompts": ["a"]}', "INVALID_ARGUMENT", '{"prompt"'),
        (b'{"prompt": 3}', "INVALID_ARGUMENT", "prompt: expected a string or a list of strings, got number"),
        (b'{"prompt": null}', "INVALID_ARGUMENT", "got null"),
        (b'{"prompt": {"text": "a"}}', "INVALID_ARGUMENT", "got object"),
        (b'{"prompt": ["ok", 7]}', "INVALID_ARGUMENT", "prompt[1]: expected a string"),
        (b'{"prompt": []}', "INVALID_ARGUMENT", "at least one prompt"),
        (b'{"prompt": "\\ud800"}', "INVALID_ARGUMENT", "prompt[0]: not valid UTF-8"),
        (json.dumps({"prompt": ["p"] * 9}).encode(), "INVALID_ARGUMENT", "max_prompts_per_request=8"),
        (json.dumps({"prompt": "a" * 2001}).encode(), "INVALID_ARGUMENT", "max_prompt_chars=2000"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None,
)
def test_bad_requests_get_400_with_a_json_message(http_server, body, code, fragment):
    response = post(http_server, body, {"Content-Type": "application/json"})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == code
    assert fragment in error["message"]


def test_oversize_bodies_get_413_before_being_read(http_server):
    declared = post(http_server, b"x" * (4 * MAX_BODY))
    assert declared.status_code == 413
    assert f"http_max_body_bytes={MAX_BODY}" in error_of(declared)["message"]
    # Without Content-Length (chunked), the limit is enforced while streaming.
    chunked = post(http_server, iter([b" " * (16 << 10)] * 8))
    assert chunked.status_code == 413
    valid_json_too_big = json.dumps({"prompt": "a" * (2 * MAX_BODY)}).encode()
    assert post(http_server, valid_json_too_big).status_code == 413
    assert post(http_server, json.dumps({"prompt": "still serving"}).encode()).status_code == 200


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer"])
def test_wrong_or_missing_token_gets_401(http_server, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = post(http_server, b'{"prompt": "a"}', headers, token=None)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert error_of(response)["code"] == "UNAUTHENTICATED"


def test_unknown_paths_and_methods_get_json_errors(http_server):
    assert httpx.get(http_server.http_url + "/nope").status_code == 404
    wrong_method = httpx.get(predict_url(http_server))
    assert wrong_method.status_code == 405
    assert error_of(wrong_method)["code"] == "METHOD_NOT_ALLOWED"


def test_info_and_health(http_server, engine):
    assert httpx.get(http_server.http_url + "/health").json() == {"status": "SERVING"}
    assert httpx.get(http_server.http_url + "/healthz").status_code == 200
    assert httpx.get(http_server.http_url + "/info").status_code == 401  # a token, as for gRPC Info
    info = httpx.get(http_server.http_url + "/info", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert info["fingerprint"]["digest"] == engine.fingerprint.digest
    assert info["embedding_dim"] == 192
    assert info["limits"]["http_max_body_bytes"] == MAX_BODY


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
bodies = st.one_of(
    st.binary(max_size=64),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.one_of(st.text(max_size=40), st.lists(st.text(max_size=40), max_size=3), json_values).map(
        lambda p: json.dumps({"prompt": p}).encode()
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, token=st.sampled_from([TOKEN, TOKEN, "other", None]))
def test_fuzzed_requests_never_get_a_500(fuzz_http_server, body, token):
    response = post(fuzz_http_server, body, {"Content-Type": "application/json"}, token=token)
    assert response.status_code in (200, 400, 401, 413), response.text
    if response.status_code == 200:
        assert torch.load(io.BytesIO(response.content), weights_only=True).shape[1:] == (512, 192)
    else:
        error_of(response)


# -- readiness, overload and drain ------------------------------------------------------------------------
def in_background(fn, *args, **kwargs):
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, result


def test_health_mirrors_readiness_before_load():
    thread = ServerThread(local_settings(http_port=0), lambda _s: FakeEngine()).start(load=False)
    try:
        health = httpx.get(thread.http_url + "/health")
        assert health.status_code == 503
        assert health.json() == {"status": "NOT_SERVING"}
        early = httpx.post(thread.http_url + "/predict", json={"prompt": "too early"})
        assert early.status_code == 503
        assert error_of(early)["code"] == "UNAVAILABLE"
        assert httpx.get(thread.http_url + "/info").status_code == 503
        thread.run(thread.server.load())
        assert httpx.get(thread.http_url + "/health").status_code == 200
    finally:
        thread.stop()


def test_overload_gets_503_and_the_server_recovers():
    gated = FakeEngine()
    gated.hold()
    settings = local_settings(http_port=0, max_batch_prompts=1, max_queued_requests=1, max_wait_ms=0)
    thread = ServerThread(settings, lambda _s: gated).start()
    url = thread.http_url + "/predict"
    try:
        first, first_result = in_background(httpx.post, url, json={"prompt": "first"}, timeout=60)
        assert gated.entered.wait(30)  # the worker holds "first" inside the model
        second, second_result = in_background(httpx.post, url, json={"prompt": "second"}, timeout=60)
        deadline = time.monotonic() + 30
        while thread.core.queued_requests < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = httpx.post(url, json={"prompt": "third"}, timeout=60)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        error = error_of(refused)
        assert error["code"] == "RESOURCE_EXHAUSTED"
        assert "max_queued_requests=1" in error["message"]
        gated.release()
        first.join(30)
        second.join(30)
        assert first_result["value"].status_code == 200
        assert second_result["value"].status_code == 200
        assert httpx.post(url, json={"prompt": "after"}, timeout=60).status_code == 200
    finally:
        gated.release()
        thread.stop()


def test_drain_finishes_in_flight_http_requests_then_stops_listening():
    gated = FakeEngine()
    gated.hold()
    thread = ServerThread(local_settings(http_port=0), lambda _s: gated).start()
    url = thread.http_url + "/predict"
    try:
        request, result = in_background(httpx.post, url, json={"prompt": "in flight"}, timeout=60)
        assert gated.entered.wait(30)
        stopping = asyncio.run_coroutine_threadsafe(thread.server.stop(10.0), thread.loop)
        deadline = time.monotonic() + 10
        while thread.server.serving() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not thread.server.serving()
        gated.release()
        request.join(30)
        assert result["value"].status_code == 200
        assert torch.equal(torch.load(io.BytesIO(result["value"].content)), FakeEngine().encode(["in flight"]))
        stopping.result(30)
        with pytest.raises(httpx.ConnectError):
            httpx.post(url, json={"prompt": "after the drain"}, timeout=5)
    finally:
        gated.release()
        thread.stop()  # stopping twice is harmless; this also ends the loop thread


def test_per_token_rate_limit_gets_429():
    settings = local_settings(
        http_port=0,
        auth_tokens=f"tester:{TOKEN}",
        rate_limit_prompts_per_s=0.001,
        rate_limit_burst_prompts=64,
    )
    thread = ServerThread(settings, lambda _s: FakeEngine()).start()
    try:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        url = predict_url(thread)
        assert requests.post(url, json={"prompt": ["a"] * 64}, headers=headers, timeout=60).status_code == 200
        limited = requests.post(url, json={"prompt": "one more"}, headers=headers, timeout=60)
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
        # The time one prompt needs to refill at 0.001 prompts/s, in whole seconds.
        assert 900 < shared.retry_delay_from_header(limited.headers["retry-after"]) <= 1000
        assert "rate" in limited.json()["error"]["message"]
    finally:
        thread.stop()
