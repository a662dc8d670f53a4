"""Prompt upsampling on the encoder host (issue 16): the server's Upsample rpc, POST /upsample and Encode's
upsample option against diffusers' own `Flux2Pipeline.upsample_prompt` on the same tiny model, the limits,
and the encode path's bytes with upsampling on.

Every real generation here pads its conversation to 2048 tokens (diffusers' recipe), which dominates the
cost on a CPU, so the real model generates in only four places; plumbing and limits run against a stand-in
upsampler (`_EchoUpsampler`) on the real encoder engine.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import re
import threading
import time

import grpc
import httpx
import pytest
import torch
from flux2_client.encoder import RemoteEncoderError, UpsampleOptions
from flux2_client.remote import RemoteTextEncoder
from flux2_encoder_server import EncoderEngine
from flux2_encoder_server import upsample as server_upsample
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings
from flux2_encoder_server.upsample import Upsampled, UpsampleJob
from PIL import Image

PROMPTS = ["a red fox in snow", "a lighthouse at dusk"]
NEW_TOKENS = 3  # the tiny model's text is noise: a few tokens prove the recipe
SEED = 1234


def _png(width: int = 24, height: int = 16, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


# -- the reference: diffusers' upsample_prompt on the same tiny model ---------------------------------------


def _capped_generation_class():
    from transformers import Mistral3ForConditionalGeneration

    class CappedGeneration(Mistral3ForConditionalGeneration):
        """diffusers' upsample_prompt always asks `generate` for 512 new tokens; the reference model caps
        that at NEW_TOKENS so a test stays short. Everything diffusers does around `generate` (messages,
        padding to 2048, sampling arguments, decoding) is its own code."""

        def generate(self, *args, **kwargs):
            kwargs["max_new_tokens"] = min(kwargs.get("max_new_tokens", NEW_TOKENS), NEW_TOKENS)
            return super().generate(*args, **kwargs)

    return CappedGeneration


class _TokenizerAsProcessor:
    """What diffusers' upsample_prompt calls on its `tokenizer` (a PixtralProcessor for FLUX.2-dev) in
    text-to-image mode: `apply_chat_template`, and `.tokenizer.batch_decode`. transformers'
    PixtralProcessor needs torchvision, which cannot be installed beside this CPU torch, so text mode
    runs on the tokenizer it would wrap (the server does the same without a processor)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)


@pytest.fixture(scope="module")
def reference(tiny):
    from diffusers import Flux2Pipeline
    from transformers import AutoTokenizer

    text_encoder = _capped_generation_class().from_pretrained(str(tiny.pipeline / "text_encoder"), dtype=torch.bfloat16)
    tokenizer = _TokenizerAsProcessor(AutoTokenizer.from_pretrained(str(tiny.pipeline / "tokenizer")))
    return Flux2Pipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer, transformer=None)


_REFERENCE_CACHE: dict[tuple, list[str]] = {}


def diffusers_upsample(reference, prompts: list[str], temperature: float, seed: int) -> list[str]:
    key = (tuple(prompts), temperature, seed)
    if key not in _REFERENCE_CACHE:
        torch.manual_seed(seed)  # diffusers samples from torch's global generator
        _REFERENCE_CACHE[key] = reference.upsample_prompt(prompts, temperature=temperature)
    return _REFERENCE_CACHE[key]


# -- servers ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upsampling_engine(tiny) -> EncoderEngine:
    return EncoderEngine.from_pretrained(str(tiny.pipeline), device="cpu", upsampling=True)


@pytest.fixture(scope="module")
def upsampling_server(tiny, upsampling_engine):
    settings = local_settings(str(tiny.pipeline), upsampling=True, upsample_max_new_tokens=8)
    with ServerThread(settings, lambda _s: upsampling_engine) as server:
        yield server


class _EchoUpsampler:
    """Stands in for `Upsampler` where the text does not matter: answers "<prompt> +N images", holds each
    call for `hold_s`, and records the jobs (the real generate is covered against diffusers above)."""

    supports_images = True

    def __init__(self, hold_s: float = 0.0):
        self.hold_s = hold_s
        self.jobs: list[UpsampleJob] = []
        self.threads: set[str] = set()

    def generate(self, job: UpsampleJob, should_stop=lambda: False) -> Upsampled:
        self.jobs.append(job)
        self.threads.add(threading.current_thread().name)
        time.sleep(self.hold_s)
        counts = [len(group) for group in job.images] if job.images else [0] * len(job.prompts)
        texts = [f"{p} +{n} images" for p, n in zip(job.prompts, counts, strict=True)]
        return Upsampled(texts, job.seed, [NEW_TOKENS] * len(texts))


@pytest.fixture(scope="module")
def echo_server(tiny, engine):
    fake = FakeEngine(engine)
    fake.upsampler = _EchoUpsampler()  # type: ignore[attr-defined]
    settings = local_settings(
        str(tiny.pipeline),
        upsampling=True,
        http_port=0,
        upsample_max_image_bytes=4096,
        upsample_max_image_pixels=64 * 64,
        upsample_max_new_tokens=64,
        upsample_max_images=3,
    )
    with ServerThread(settings, lambda _s: fake) as server:
        server.upsampler = fake.upsampler  # type: ignore[attr-defined]
        yield server


# -- exactness against diffusers ----------------------------------------------------------------------------


def test_recipe_pieces_are_diffusers_own(reference):
    """The server's copies of diffusers' system messages, image steps and messages (it cannot import
    diffusers) equal diffusers' on the same inputs."""
    from diffusers.pipelines.flux2 import pipeline_flux2, system_messages

    assert server_upsample.SYSTEM_MESSAGE_UPSAMPLING_T2I == system_messages.SYSTEM_MESSAGE_UPSAMPLING_T2I
    assert server_upsample.SYSTEM_MESSAGE_UPSAMPLING_I2I == system_messages.SYSTEM_MESSAGE_UPSAMPLING_I2I
    assert server_upsample.MAX_IMAGE_AREA == pipeline_flux2.UPSAMPLING_MAX_IMAGE_SIZE
    big = Image.open(io.BytesIO(_png(1000, 700))).convert("RGB")
    small = Image.new("RGBA", (40, 90), (0, 255, 0, 128))
    groups = [[big, small], [small], []]
    ours = server_upsample.prepare_images(groups)
    theirs = pipeline_flux2._validate_and_process_images(groups, reference.image_processor, 768**2)
    assert [[im.size for im in g] for g in ours] == [[im.size for im in g] for g in theirs]
    for a, b in zip(itertools.chain(*ours), itertools.chain(*theirs), strict=True):
        assert a.tobytes() == b.tobytes() and a.mode == b.mode
    prompts = ["with [IMG] marker", "b", "c"]
    for images in (None, theirs):
        assert server_upsample.format_messages(prompts, "sys", images) == pipeline_flux2.format_input(
            prompts, "sys", images
        )


def test_seeded_upsampling_through_the_pipeline_equals_diffusers(upsampling_server, reference):
    """The remote pipeline's `upsample_prompt` (the Upsample rpc through a pool) returns diffusers' text for
    the same prompt, temperature and seed."""
    from flux2_client.endpoints import EncoderPool
    from flux2_client.remote_pipeline import Flux2RemotePipeline

    with EncoderPool([upsampling_server.target]) as pool:
        pipe = Flux2RemotePipeline(scheduler=None, vae=None, transformer=None, encoder=pool)
        ours = pipe.upsample_prompt(PROMPTS[:1], temperature=0.7, seed=SEED, max_new_tokens=NEW_TOKENS)
    assert ours == diffusers_upsample(reference, PROMPTS[:1], 0.7, SEED)
    assert pipe.last_upsample.seed == SEED and pipe.last_upsample.new_tokens == (NEW_TOKENS,)
    assert all(ours) and ours != PROMPTS[:1]


def test_greedy_encode_with_upsample_gives_diffusers_text_and_exact_embeddings(
    upsampling_server, upsampling_engine, engine, reference
):
    """Encode with the upsample option at temperature 0 (greedy) rewrites the prompt as diffusers does at a
    vanishing temperature (its call refuses 0; at 1e-6 sampling keeps only the most likely token), and the
    rows are the exact embeddings of the rewritten prompt from a server without upsampling."""
    client = RemoteTextEncoder(upsampling_server.target)
    options = UpsampleOptions(temperature=0.0, max_new_tokens=NEW_TOKENS, seed=7)
    result = client.encode(PROMPTS[:1], upsample=options)
    assert list(result.upsampled_prompts) == diffusers_upsample(reference, PROMPTS[:1], 1e-6, 7)
    assert result.upsample_seed == 7
    assert torch.equal(result.prompt_embeds, engine.encode(list(result.upsampled_prompts)))
    assert result.fingerprint.upsampling and result.fingerprint.digest == engine.fingerprint.digest


def test_encode_bytes_and_digest_do_not_change_with_upsampling_on(upsampling_engine, engine):
    prompts = ["a red fox", "ein Fuchs im Schnee [IMG]", ""]
    assert torch.equal(upsampling_engine.encode(prompts), engine.encode(prompts))
    assert upsampling_engine.fingerprint.digest == engine.fingerprint.digest
    assert upsampling_engine.fingerprint.upsampling and not engine.fingerprint.upsampling
    # One copy of the weights: the engine runs the first 30 layers of the generating model itself.
    full = upsampling_engine.upsampler.model.model.language_model
    assert all(a is b for a, b in zip(upsampling_engine.decoder.layers, full.layers, strict=False))
    assert len(full.layers) == 40 and len(upsampling_engine.decoder.layers) == 30


@pytest.mark.skipif(
    not __import__("importlib").util.find_spec("torchvision"),
    reason="image mode needs transformers' PixtralProcessor, which needs torchvision (not installable beside "
    "this CPU torch build); run where torchvision is installed",
)
def test_image_mode_equals_diffusers(tiny, upsampling_server, reference):  # pragma: no cover - needs torchvision
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny.pipeline / "tokenizer"))
    reference.tokenizer = processor
    images = [Image.new("RGB", (48, 40), (10, 200, 90)), Image.new("RGB", (20, 60), (250, 250, 0))]
    torch.manual_seed(SEED)
    theirs = reference.upsample_prompt(PROMPTS, images=[[images[0]], [images[1]]], temperature=0.7)
    client = RemoteTextEncoder(upsampling_server.target)
    ours = client.upsample(
        PROMPTS,
        UpsampleOptions(temperature=0.7, seed=SEED, max_new_tokens=NEW_TOKENS, images=images, images_per_prompt=[1, 1]),
    )
    assert list(ours.prompts) == theirs


# -- plumbing, limits and bad input (stand-in upsampler) -------------------------------------------------------


def test_http_upsample_and_info(echo_server):
    url = echo_server.http_url
    body = {"prompt": ["a", "b"], "images": [base64.b64encode(_png()).decode()] * 3, "images_per_prompt": [1, 2]}
    answer = httpx.post(f"{url}/upsample", json={**body, "seed": 5, "temperature": 0}, timeout=30)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["prompts"] == ["a +1 images", "b +2 images"] and data["seed"] == 5
    job = echo_server.upsampler.jobs[-1]
    assert job.temperature == 0.0 and job.max_new_tokens == 64 and [len(g) for g in job.images] == [1, 2]
    shared = httpx.post(f"{url}/upsample", json={"prompt": ["a", "b"], "images": body["images"][:2]}, timeout=30)
    assert shared.json()["prompts"] == ["a +2 images", "b +2 images"]  # no counts: every prompt gets all
    assert echo_server.upsampler.jobs[-1].temperature == 0.15  # diffusers' default
    info = httpx.get(f"{url}/info", timeout=30).json()
    assert info["upsampling"]["max_images"] == 3 and info["upsampling"]["max_new_tokens"] == 64


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"images": [_png()] * 4}, r"images: 4 images exceed upsample_max_images=3"),
        ({"images": [b"\x89PNG not really"]}, r"images\[0\]: not a PNG, JPEG or WebP image"),
        ({"images": [_png(), b"x" * 5000]}, r"images\[1\]: 5000 bytes exceed upsample_max_image_bytes=4096"),
        ({"images": [_png(80, 80)]}, r"images\[0\]: 80x80 pixels exceed upsample_max_image_pixels=4096"),
        ({"temperature": 2.5}, r"temperature: 2.5 is outside 0 to upsample_max_temperature=2"),
        ({"temperature": -0.1}, r"temperature: -0.1 is outside 0 to upsample_max_temperature=2"),
        ({"max_new_tokens": 65}, r"max_new_tokens: 65 is outside 1 to upsample_max_new_tokens=64"),
        ({"images": [_png()], "images_per_prompt": [2]}, r"images_per_prompt: counts \[2\] must be"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field_and_limit(echo_server, options, message):
    client = RemoteTextEncoder(echo_server.target)
    with pytest.raises(RemoteEncoderError) as caught:
        client.upsample(["a fox"], UpsampleOptions(**options))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert re.match(message, caught.value.message), caught.value.message
    with pytest.raises(RemoteEncoderError, match="INVALID_ARGUMENT: upsample." + message):  # Encode's option
        client.encode(["a fox"], upsample=UpsampleOptions(**options))
    http = httpx.post(
        f"{echo_server.http_url}/upsample",
        json={
            "prompt": "a fox",
            **{k: ([base64.b64encode(i).decode() for i in v] if k == "images" else v) for k, v in options.items()},
        },
        timeout=30,
    )
    assert http.status_code == 400 and re.match(message, http.json()["error"]["message"])


def test_http_bad_bodies_are_400(echo_server):
    url = f"{echo_server.http_url}/upsample"
    for body, message in [
        ({"prompt": "a", "images": ["not base64!"]}, "images[0]: not valid base64"),
        ({"prompt": "a", "colour": 1}, "body: unknown key 'colour'"),
        ({"prompt": "a", "seed": "x"}, "seed: expected an integer, got string"),
        ({"prompt": "a", "temperature": "hot"}, "temperature: expected a number, got string"),
    ]:
        answer = httpx.post(url, json=body, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["message"].startswith(message), answer.text


def test_a_server_without_upsampling_refuses_in_one_line(server, tiny, engine):
    client = RemoteTextEncoder(server.target)
    with pytest.raises(RemoteEncoderError) as caught:
        client.upsample(["a fox"])
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.message == "upsampling: this server does not upsample prompts (start it with --upsampling)"
    assert not client.info().fingerprint.upsampling
    with ServerThread(local_settings(str(tiny.pipeline), http_port=0), lambda _s: engine) as plain_http:
        answer = httpx.post(f"{plain_http.http_url}/upsample", json={"prompt": "a"}, timeout=30)
    assert answer.status_code == 409 and answer.json()["error"]["code"] == "FAILED_PRECONDITION"


def test_mixed_load_keeps_every_encode_exact_and_shares_the_model_thread(tiny, engine):
    """Upsampling requests and encodes queued together: every encode is the engine's bytes for its prompt
    alone, upsampling runs on the batcher's worker thread, and with upsample_share=0.5 encode batches
    keep running between the generations."""
    fake = FakeEngine(engine)
    upsampler = _EchoUpsampler(hold_s=0.05)
    fake.upsampler = upsampler  # type: ignore[attr-defined]
    settings = local_settings(str(tiny.pipeline), upsampling=True, upsample_share=0.5, max_batch_prompts=2)
    prompts = [f"prompt {i}" for i in range(4)]
    # Reproducible mode: a prompt's bytes do not depend on its batch (docs/design.md, invariant 4).
    expected = dict(zip(prompts, engine.encode(prompts), strict=True))
    with ServerThread(settings, lambda _s: fake) as server:
        fake.hold()  # let everything queue up behind one held batch

        async def load():
            client = server.core

            async def encode(p):
                async with client.request("grpc") as req:
                    return p, (await req.encode([p], bypass_cache=True)).embeds[0]

            async def upsample(i):
                async with client.request("grpc") as req:
                    return await req.upsample([f"up {i}"], server_upsample.UpsampleSpec(seed=i))

            tasks = [asyncio.ensure_future(encode(p)) for p in prompts]
            tasks += [asyncio.ensure_future(upsample(i)) for i in range(2)]
            await asyncio.sleep(0.2)
            fake.release()
            return await asyncio.gather(*tasks)

        results = server.run(load())
    encodes, upsampled = results[:4], results[4:]
    for prompt, row in encodes:
        assert torch.equal(row, expected[prompt])
    assert [u.prompts for u in upsampled] == [[f"up {i} +0 images"] for i in range(2)]
    assert upsampler.threads == {"encoder-worker"}
    assert server.core.metrics.value("flux2_encoder_upsample_prompts_total") == 2
    assert server.core.metrics.value("flux2_encoder_upsample_requests_total", {"frontend": "grpc", "code": "OK"}) == 2


def test_generate_upsample_prints_and_saves_the_rewritten_prompt(tiny, echo_server, tmp_path, capsys):
    from flux2_client.cli import main

    out = tmp_path / "fox.png"
    args = ["generate", "--server", echo_server.target, "--model", str(tiny.pipeline), "--dit", str(tiny.nf4_repo)]
    args += ["--prompt", "a fox", "--upsample", "--width", "32", "--height", "32", "--steps", "1", "--seed", "9"]
    args += ["--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "upsampled prompt 0: a fox +0 images" in capsys.readouterr().err
    with Image.open(out) as image:
        meta = json.loads(image.text["flux2_split"])
        parameters = image.text["parameters"]
    assert meta["prompt"] == "a fox +0 images" and meta["original_prompt"] == "a fox"
    assert meta["upsample_temperature"] == 0.15 and meta["upsample_seed"] == 9
    assert parameters.startswith("a fox +0 images\n")
    job = echo_server.upsampler.jobs[-1]
    assert job.temperature == 0.15 and job.seed == 9


def test_a_long_generation_gives_way_to_queued_encodes_between_its_steps():
    """A task of 100 steps of 10 ms (a 1 s generation) that calls should_stop() between steps, as the
    upsampler's stopping criterion does after each token: an encode queued 50 ms in is answered long before
    the task ends (it used to wait for the whole generation: encoding fell to a tenth of its rate on the
    H200), the task still runs to its end, and its reported model time leaves out the batch it let run."""
    from flux2_encoder_server.batcher import Batcher

    fake = FakeEngine(device_ms_per_prompt=200)
    batcher = Batcher(fake.launch, max_batch_prompts=4, max_wait_s=0.0, task_share=0.25, task_slice_s=0.05)

    def generation(should_stop) -> int:
        steps = 0
        while steps < 100 and not should_stop():
            time.sleep(0.01)
            steps += 1
        return steps

    async def scenario():
        task = asyncio.ensure_future(batcher.run_task(generation, timeout=30))
        await asyncio.sleep(0.05)
        queued = time.monotonic()
        encoded = await batcher.submit(["a prompt"], timeout=30)
        waited = time.monotonic() - queued
        return encoded, waited, await task, time.monotonic() - queued

    try:
        encoded, waited, result, total = asyncio.run(scenario())
    finally:
        batcher.close()
    assert result.value == 100
    assert waited < 0.6, f"the encode waited {waited:.2f}s for a 1 s generation"
    assert torch.equal(encoded.embeds, FakeEngine().encode(["a prompt"]))
    assert result.run_seconds < total - 0.15  # the 200 ms batch is not the task's time
