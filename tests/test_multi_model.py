"""One server hosting several models: FLUX.2-dev's Mistral and FLUX.2 [klein]'s Qwen3 side by side (issue 13).

Each model has its own queue and batches; a request names its model (no name: the default), an unknown
name is NOT_FOUND / 404 naming the hosted ones, Info lists every model, metrics carry a `model` label, and
the client picks the hosted model whose width fits its DiT. Embeddings are checked against diffusers'
`Flux2Pipeline.encode_prompt` and `Flux2KleinPipeline.encode_prompt` on the full, unpruned encoders.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator

import grpc
import httpx
import pytest
import torch
from flux2_client.encoder import FingerprintMismatchError, RemoteEncoderError
from flux2_client.endpoints import EncoderPool
from flux2_client.families import EmbeddingWidthError, choose_served_model, encoder_for_dit
from flux2_client.http_encoder import HttpTextEncoder, _predict_url
from flux2_client.remote import RemoteTextEncoder
from flux2_client.training import compute_remote_text_embeddings, open_encoder
from flux2_encoder_server.server import model_health_service
from flux2_encoder_server.settings import Settings, parse_model_specs
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings, wait_until
from flux2split_proto import shared
from flux2split_proto.v1 import encoder_pb2 as pb
from flux2split_proto.v1 import encoder_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_embeddings_exact import PROMPTS
from test_pool_transport import BusyThenServe, scripted_grpc, scripted_http  # noqa: F401 (fixtures)

CPU = torch.device("cpu")
DEV, KLEIN = "flux2-dev", "klein-4b"
#: Disjoint prompt sets, so each model's engine can be checked to have seen only its own prompts. Few, and
#: reused by every test: each costs a 512-token forward of diffusers' reference, and the server's cache
#: answers them after the first test.
DEV_PROMPTS = [PROMPTS["plain"], PROMPTS["empty"]]
KLEIN_PROMPTS = [PROMPTS["non_ascii"], "two cats on a sofa"]


@pytest.fixture(scope="module")
def two_models(tiny, engine, tiny_klein, klein_engine) -> Iterator[tuple[ServerThread, dict[str, FakeEngine]]]:
    """A real server hosting both families, the FLUX.2-dev encoder first (the default), HTTP on. Each engine
    is wrapped in a FakeEngine that records the batches it is given."""
    fakes = {DEV: FakeEngine(engine), KLEIN: FakeEngine(klein_engine)}
    by_source = {str(tiny.pipeline): fakes[DEV], str(tiny_klein.distilled): fakes[KLEIN]}
    settings = local_settings(f"{DEV}={tiny.pipeline},{KLEIN}={tiny_klein.distilled}", http_port=0, max_wait_ms=20)
    thread = ServerThread(settings, lambda s: by_source[s.model]).start()
    yield thread, fakes
    thread.stop()


@pytest.fixture(scope="module")
def references(reference_pipe, klein_reference):
    """diffusers' own encode_prompt rows of each model's prompts: one call per model (512-token forwards of
    the full encoders are the expensive part here; on the CPU a row does not depend on its batch)."""
    rows = {
        model: dict(zip(prompts, pipe.encode_prompt(prompt=prompts, device=CPU)[0], strict=True))
        for model, pipe, prompts in ((DEV, reference_pipe, DEV_PROMPTS), (KLEIN, klein_reference, KLEIN_PROMPTS))
    }
    return lambda model, prompt: rows[model][prompt]


def test_both_families_answer_bit_identically_under_mixed_load_and_no_batch_mixes_models(two_models, references):
    """8 clients x 3 requests alternating between the models. The first wave skips the cache, so 8 requests
    (4 per model, both prompts of each) reach the two models at once; the later waves, some of two prompts,
    are answered from the cache (model forwards are what cost time on 2 CPU cores)."""
    thread, fakes = two_models
    for fake in fakes.values():
        fake.reset_counts()
    sets = {DEV: DEV_PROMPTS, KLEIN: KLEIN_PROMPTS}
    expected = {model: [references(model, p) for p in prompts] for model, prompts in sets.items()}  # before the load
    clients = {DEV: RemoteTextEncoder(thread.target, model=DEV), KLEIN: RemoteTextEncoder(thread.target, model=KLEIN)}
    metrics = thread.core.metrics
    ok = {m: {"model": m, "code": "OK", "frontend": "grpc"} for m in (DEV, KLEIN)}
    before = {m: metrics.value("flux2_encoder_requests_total", ok[m]) for m in (DEV, KLEIN)}
    batches_before = {m: metrics.value("flux2_encoder_batch_prompts_count", {"model": m}) for m in (DEV, KLEIN)}
    problems: list[str] = []
    start, first_wave_done = threading.Barrier(8), threading.Barrier(8)

    def client(k: int) -> None:
        try:
            start.wait(60)
            for j in range(3):
                if j == 1:
                    first_wave_done.wait(60)
                model = (DEV, KLEIN)[(k + j) % 2]
                i = (k // 2 + j) % 2
                prompts = [sets[model][i], sets[model][1 - i]][: 1 + k % 2 * (j > 0)]  # the first wave: 1 each
                result = clients[model].encode(prompts, bypass_cache=j == 0)
                if result.header is None or result.header.model != model:
                    problems.append(f"{model}: header names {result.header and result.header.model!r}")
                for row, prompt in zip(result.prompt_embeds, prompts, strict=True):
                    if not torch.equal(row, expected[model][sets[model].index(prompt)]):
                        problems.append(f"{model}: {prompt[:20]!r} differs from diffusers' encode_prompt")
        except Exception as exc:  # a failed request (or a broken barrier after one) is a problem, not a hang
            problems.append(f"client {k}: {exc!r}")

    workers = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    for enc in clients.values():
        enc.close()
    assert problems == []
    for model, fake in fakes.items():  # each engine got only its own model's prompts, in batches of its own
        assert fake.batches and all(p in sets[model] for batch in fake.batches for p in batch), model
    for model in (DEV, KLEIN):
        assert metrics.value("flux2_encoder_requests_total", ok[model]) == before[model] + 12
        batches = metrics.value("flux2_encoder_batch_prompts_count", {"model": model}) - batches_before[model]
        assert batches == len(fakes[model].batches)
        assert metrics.value("flux2_encoder_prompts_total", {"model": model, "source": "model"}) > 0


def test_requests_without_a_model_get_the_default_and_info_lists_every_model(two_models, references):
    thread, _ = two_models
    with grpc.insecure_channel(thread.target) as channel:  # an old client: no model field anywhere
        stub = pb_grpc.TextEncoderStub(channel)
        responses = list(stub.Encode(pb.EncodeRequest(prompts=["a red fox sleeping in fresh snow"]), timeout=30))
        header = responses[0].header
        info = stub.Info(pb.InfoRequest(), timeout=30)
        klein_info = stub.Info(pb.InfoRequest(model=KLEIN), timeout=30)
    assert header.model == DEV and header.fingerprint.family == "mistral3" and list(header.shape) == [1, 512, 192]
    assert (info.default_model, info.fingerprint.family, info.embedding_dim) == (DEV, "mistral3", 192)
    assert [(m.name, m.fingerprint.family, m.embedding_dim, m.is_default) for m in info.models] == [
        (DEV, "mistral3", 192, True),
        (KLEIN, "qwen3", 384, False),
    ]
    assert info.models[1].fingerprint.digest == thread.server.engines[KLEIN].fingerprint.digest
    assert info.models[1].limits.max_prompts_per_request == info.limits.max_prompts_per_request > 0
    assert (klein_info.fingerprint.family, klein_info.embedding_dim) == ("qwen3", 384)
    # The client's view of the same.
    with RemoteTextEncoder(thread.target, model=KLEIN) as enc:
        described = enc.info()
    assert (described.model, described.default_model, described.embedding_dim) == (KLEIN, DEV, 384)
    assert [m.name for m in described.models] == [DEV, KLEIN]


def test_an_unknown_model_is_not_found_naming_the_hosted_ones(two_models):
    thread, _ = two_models
    with grpc.insecure_channel(thread.target) as channel:
        stub = pb_grpc.TextEncoderStub(channel)
        for call in (
            lambda: list(stub.Encode(pb.EncodeRequest(prompts=["a"], model="klein-9b"), timeout=30)),
            lambda: stub.Info(pb.InfoRequest(model="klein-9b"), timeout=30),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert err.value.details() == (
                f"model: 'klein-9b' is not served here; this server serves {DEV}, {KLEIN} (default {DEV})"
            )
    answer = httpx.post(thread.http_url + "/models/klein-9b/predict", json={"prompt": "a"}, timeout=30)
    assert answer.status_code == 404
    assert answer.json()["error"] == {
        "code": "NOT_FOUND",
        "message": f"model: 'klein-9b' is not served here; this server serves {DEV}, {KLEIN} (default {DEV})",
    }
    assert httpx.get(thread.http_url + "/models/klein-9b/info", timeout=30).status_code == 404
    # Counted without the client's string as a label value.
    metrics = thread.core.metrics
    assert metrics.value("flux2_encoder_requests_total", {"model": "", "code": "NOT_FOUND"}) >= 2
    assert "klein-9b" not in metrics.exposition().decode()


def test_http_serves_each_model_on_its_path_and_the_default_on_predict(two_models, references):
    thread, _ = two_models
    url = thread.http_url
    klein = httpx.post(url + f"/models/{KLEIN}/predict", json={"prompt": KLEIN_PROMPTS[1]}, timeout=30)
    default = httpx.post(url + "/predict", json={"prompt": DEV_PROMPTS[0]}, timeout=30)
    assert klein.headers[shared.MODEL_NAME_HEADER] == KLEIN and default.headers[shared.MODEL_NAME_HEADER] == DEV
    with HttpTextEncoder(url, model=KLEIN) as enc:
        assert torch.equal(enc.encode(KLEIN_PROMPTS[1]).prompt_embeds[0], references(KLEIN, KLEIN_PROMPTS[1]))
    assert klein.headers[shared.FINGERPRINT_HEADER] == thread.server.engines[KLEIN].fingerprint.digest
    listing = httpx.get(url + "/models", timeout=30).json()
    assert listing["default_model"] == DEV
    assert [(m["name"], m["embedding_dim"], m["is_default"]) for m in listing["models"]] == [
        (DEV, 192, True),
        (KLEIN, 384, False),
    ]
    info = httpx.get(url + "/info", timeout=30).json()  # the old layout describes the default
    assert (info["name"], info["embedding_dim"], info["fingerprint"]["family"]) == (DEV, 192, "mistral3")
    assert len(info["models"]) == 2
    assert httpx.get(url + f"/models/{KLEIN}/health", timeout=30).json() == {"status": "SERVING"}
    with HttpTextEncoder(url + f"/models/{KLEIN}/predict") as enc:  # the URL names the model
        assert (enc.model, enc.info().embedding_dim, enc.info().model) == (KLEIN, 384, KLEIN)


def test_health_has_one_service_per_model(two_models):
    thread, _ = two_models
    with grpc.insecure_channel(thread.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", model_health_service(DEV), model_health_service(KLEIN)):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service


def test_a_broken_model_turns_health_not_serving_while_the_other_keeps_encoding():
    fakes = {"a": FakeEngine(width=64), "b": FakeEngine(width=96)}
    settings = local_settings("a=/models/a,b=/models/b", unhealthy_after_failed_batches=1, cache_bytes=0)
    with ServerThread(settings, lambda s: fakes[s.model.rsplit("/", 1)[1]]) as thread:
        fakes["b"].fail_every_batch = True
        with RemoteTextEncoder(thread.target, model="b") as b, pytest.raises(RemoteEncoderError):
            b.encode("x")
        wait_until(lambda: not thread.core.ready, 10, "readiness to turn NOT_SERVING")
        assert "model b:" in (thread.core.engine_problem or "") and thread.core.model_ready("a")
        with RemoteTextEncoder(thread.target, model="a") as a:
            assert a.encode("y").prompt_embeds.shape == (1, 512, 64)
        fakes["b"].fail_every_batch = False
        wait_until(lambda: thread.core.ready, 10, "a passing self-test to turn it SERVING again")


def test_client_picks_the_hosted_model_that_fits_the_dit(two_models, tiny, tiny_klein):
    thread, _ = two_models
    with EncoderPool([thread.target]) as pool:
        picked, owned = encoder_for_dit(pool, str(tiny_klein.distilled))
        assert owned and picked.model == KLEIN and picked.info().embedding_dim == 384
        picked.close()
        same, owned = encoder_for_dit(pool, str(tiny.pipeline))  # the default fits FLUX.2-dev's DiT
        assert same is pool and not owned
        with pytest.raises(EmbeddingWidthError, match=r"hosts flux2-dev \(192\), klein-4b \(384\) but .* 12288"):
            choose_served_model(pool.info(), 12288, "some/dit")
    with EncoderPool([thread.target], model=DEV) as pinned:  # a named model is never switched
        assert encoder_for_dit(pinned, str(tiny_klein.distilled)) == (pinned, False)


def test_training_helper_and_cli_name_the_model(two_models, references, tmp_path, capsys):
    from flux2_client.cli import main
    from flux2_client.shards import EmbeddingShards

    thread, _ = two_models
    with open_encoder(thread.target, model=KLEIN) as enc:
        embeds, text_ids = compute_remote_text_embeddings(KLEIN_PROMPTS, enc)
    assert torch.equal(embeds, torch.stack([references(KLEIN, p) for p in KLEIN_PROMPTS]))
    assert text_ids.shape == (2, 512, 4)

    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(KLEIN_PROMPTS) + "\n")
    out = tmp_path / "shards"
    args = ["encode", str(captions), "--server", thread.target, "--out", str(out), "--no-progress"]
    assert main([*args, "--encoder-model", KLEIN]) == 0
    assert EmbeddingShards(out).fingerprint.family == "qwen3"
    assert main([*args, "--encoder-model", "nope"]) == 6  # ExitCode.MODEL_MISMATCH
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"this server serves {DEV}, {KLEIN}" in err[0] and "--encoder-model" in err[0]


def test_a_named_model_is_refused_by_a_server_that_ignores_the_name(scripted_grpc, scripted_http):  # noqa: F811
    with RemoteTextEncoder(scripted_grpc(BusyThenServe(busy=0, delay=0.0)), model=KLEIN) as enc:
        with pytest.raises(FingerprintMismatchError, match="predates hosting several models"):
            enc.encode("a")
        with pytest.raises(FingerprintMismatchError, match="predates"):
            enc.info()
    with HttpTextEncoder(scripted_http(BusyThenServe(busy=0, delay=0.0)), model=KLEIN) as http_enc:
        assert http_enc.url.endswith(f"/models/{KLEIN}/predict")
        with pytest.raises(FingerprintMismatchError, match="predates"):
            http_enc.encode("a")


def test_predict_urls_and_model_settings():
    assert _predict_url("http://h:8080", None) == ("http://h:8080/predict", None)
    assert _predict_url("http://h/predict", "k") == ("http://h/models/k/predict", "k")
    assert _predict_url("https://h/enc/predict", "k") == ("https://h/enc/models/k/predict", "k")
    assert _predict_url("http://h/models/k/predict", None) == ("http://h/models/k/predict", "k")
    with pytest.raises(ValueError, match="names model 'k'"):
        _predict_url("http://h/models/k/predict", "other")

    assert [(m.name, m.source) for m in parse_model_specs("org/repo")] == [("default", "org/repo")]
    s = Settings.from_cli(["--model", "a=/x", "--model", "b=org/y", "--default-model", "b"], {})
    assert (s.model, s.default_model_name, [m.name for m in s.models]) == ("a=/x,b=org/y", "b", ["b", "a"])
    assert s.for_model(s.models[1]).model == "/x"
    env = Settings.from_cli([], {"FLUX2_ENCODER_MODEL": "a=/x, b=/y"})
    assert [(m.name, m.source) for m in env.models] == [("a", "/x"), ("b", "/y")]
    assert Settings.from_cli(["--model", "c=/z"], {"FLUX2_ENCODER_MODEL": "a=/x"}).model == "c=/z"  # flag wins
    for bad, needle in (
        ("a=/x,/y", "name every model"),
        ("a=/x,a=/y", "given twice"),
        ("a b=/x,c=/y", "model name 'a b'"),
        ("a=", "a hub repo id or a folder"),
    ):
        assert any(needle in p for p in Settings(model=bad).problems()), bad
    assert "--default-model 'c'" in " ".join(Settings(model="a=/x", default_model="c").problems())
    assert "--revision" in " ".join(Settings(model="a=/x,b=/y", revision="main").problems())
    assert json.dumps([m.name for m in Settings().models]) == '["default"]'  # the old single --model


class _StubUpsampler:
    """Stands in for `Upsampler` (generation is tested against diffusers in test_upsample.py): routing,
    per-model availability and metrics are under test here."""

    supports_images = False

    def generate(self, job, should_stop):
        from flux2_encoder_server.upsample import Upsampled

        return Upsampled([f"{p} upsampled" for p in job.prompts], job.seed, [1] * len(job.prompts))


def test_upsampling_is_a_property_of_the_model_that_has_it():
    """Only model "a" has an upsampler: Upsample / Encode(upsample=) / POST /upsample route by model name
    like Encode (empty: the default; unknown: NOT_FOUND), model "b" is FAILED_PRECONDITION / 409, Info
    gives the limits per model, and the upsampling metrics carry the model."""
    from flux2_client.encoder import UpsampleOptions

    fakes = {"a": FakeEngine(width=64), "b": FakeEngine(width=96)}
    fakes["a"].upsampler = _StubUpsampler()
    settings = local_settings("a=/models/a,b=/models/b", http_port=0, cache_bytes=0)
    with ServerThread(settings, lambda s: fakes[s.model.rsplit("/", 1)[1]]) as thread:
        with RemoteTextEncoder(thread.target) as default, RemoteTextEncoder(thread.target, model="a") as a:
            assert default.upsample("x", UpsampleOptions(seed=3)).prompts == ("x upsampled",)
            assert a.upsample(["y"]).prompts == ("y upsampled",)
            result = a.encode("z", upsample=UpsampleOptions(seed=5))
            assert result.upsampled_prompts == ("z upsampled",) and fakes["a"].prompts_seen[-1] == "z upsampled"
            info = a.info()
            served = {m.name: m for m in info.models}
            assert served["a"].HasField("upsampling") and not served["b"].HasField("upsampling")
        with RemoteTextEncoder(thread.target, model="b") as b, pytest.raises(RemoteEncoderError) as refused:
            b.upsample("x")
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "model b does not upsample prompts" in refused.value.message
        with RemoteTextEncoder(thread.target, model="zzz") as unknown, pytest.raises(RemoteEncoderError) as missing:
            unknown.upsample("x")
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        with httpx.Client(base_url=thread.http_url, timeout=10) as http:
            ok = http.post("/models/a/upsample", json={"prompt": "w"})
            assert ok.status_code == 200 and ok.json()["prompts"] == ["w upsampled"]
            assert ok.headers[shared.MODEL_NAME_HEADER] == "a"
            assert http.post("/models/b/upsample", json={"prompt": "w"}).status_code == 409
            assert http.post("/models/zzz/upsample", json={"prompt": "w"}).status_code == 404
            assert "upsampling" in http.get("/models/a/info").json()
            assert "upsampling" not in http.get("/models/b/info").json()
        m = thread.core.metrics
        assert m.value("flux2_encoder_upsample_requests_total", {"model": "a", "code": "OK"}) == 3
        assert m.value("flux2_encoder_upsample_requests_total", {"model": "b", "code": "FAILED_PRECONDITION"}) == 2
        assert m.value("flux2_encoder_upsample_requests_total", {"model": "", "code": "NOT_FOUND"}) == 2
        assert m.value("flux2_encoder_upsample_prompts_total", {"model": "a"}) == 4
        assert m.value("flux2_encoder_upsample_prompts_total", {"model": "b"}) == 0


def test_upsampling_flag_beside_a_klein_model_turns_upsampling_on_where_it_can(tiny, tiny_klein):
    """`--upsampling` on a server hosting FLUX.2-dev's encoder and a Klein one: the FLUX.2-dev engine loads the
    whole model and upsamples, the Klein engine loads for encoding only (it used to refuse the whole start);
    alone, a Klein model with --upsampling is still one clear error; and a server where no hosted model can
    upsample refuses to start with --upsampling."""
    from flux2_encoder_server.server import load_engine

    settings = Settings(model=f"dev={tiny.pipeline},klein={tiny_klein.distilled}", upsampling=True, device="cpu")
    engines = {spec.name: load_engine(settings.for_model(spec)) for spec in settings.models}
    assert engines["dev"].upsampler is not None and engines["klein"].upsampler is None
    assert engines["klein"].encode(["a fox"]).shape[-1] == engines["klein"].embedding_dim
    with pytest.raises(ValueError, match=r"--upsampling needs a FLUX\.2-dev"):
        load_engine(Settings(model=str(tiny_klein.distilled), upsampling=True, device="cpu"))
    fakes = local_settings("a=/models/a,b=/models/b", upsampling=True)
    thread = ServerThread(fakes, lambda _s: FakeEngine())
    try:
        with pytest.raises(ValueError, match="none of the hosted models can upsample"):
            thread.start()
    finally:
        thread.stop()


def test_each_model_loads_and_batches_with_its_own_model_settings(tiny, tiny_klein):
    """`--model-setting NAME.SETTING=VALUE`: the Klein engine loads in dynamic batching mode beside a
    reproducible FLUX.2-dev engine (real tiny models; the mode is in each fingerprint), and a model's own
    batch and queue limits hold for its batches and show in Info, the other model keeping the server's."""
    from flux2_encoder_server.server import load_engine

    settings = Settings(
        model=f"dev={tiny.pipeline},klein={tiny_klein.distilled}",
        model_setting="klein.batching-mode=dynamic",
        device="cpu",
    )
    engines = {spec.name: load_engine(settings.for_model(spec)) for spec in settings.models}
    assert engines["dev"].fingerprint.batching_mode == "reproducible"
    assert engines["klein"].fingerprint.batching_mode == "dynamic"

    fakes = {"a": FakeEngine(width=64), "b": FakeEngine(width=96)}
    own = "b.max_batch_prompts=2,b.max_queued_requests=7"
    served = local_settings("a=/models/a,b=/models/b", cache_bytes=0, max_wait_ms=200, model_setting=own)
    with (
        ServerThread(served, lambda s: fakes[s.model.rsplit("/", 1)[1]]) as thread,
        RemoteTextEncoder(thread.target, model="a") as a,
        RemoteTextEncoder(thread.target, model="b") as b,
    ):
        limits = {m.name: m.limits for m in a.info().models}
        a.encode([f"a{i}" for i in range(5)])
        b.encode([f"b{i}" for i in range(5)])
    assert (limits["a"].max_batch_prompts, limits["a"].max_queued_requests) == (16, served.max_queued_requests)
    assert (limits["b"].max_batch_prompts, limits["b"].max_queued_requests) == (2, 7)
    assert [len(batch) for batch in fakes["a"].batches] == [5]
    assert [len(batch) for batch in fakes["b"].batches] == [2, 2, 1]


def test_a_bad_model_setting_is_one_line_naming_the_entry():
    base = ["--model", "dev=/a,klein=/b"]
    cases = {
        "klein.port=1": "'port' is not a per-model setting",
        "other.precision=fp8": "no model is named 'other' (served: dev, klein)",
        "dev.precision=fp4": "dev.precision='fp4': must be one of bf16, fp8, int8, nf4",
        "dev.max-batch-prompts=0": "--max-batch-prompts must be at least 1 (model dev)",
        "precision=fp8": "expected NAME.SETTING=VALUE",
    }
    for entry, message in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            settings = Settings(model="dev=/a,klein=/b", model_setting=entry)
            problems = settings.problems()
            if problems:
                raise ValueError("; ".join(problems))
    own = ["--model-setting", "dev.precision=fp8", "--model-setting", "klein.device=cuda:1"]
    parsed = Settings.from_cli([*base, *own], {})
    dev, klein = (parsed.for_model(spec) for spec in parsed.models)
    assert (dev.precision, dev.device, klein.precision, klein.device) == ("fp8", None, "bf16", "cuda:1")
