"""diffusers' Flux2Pipeline with its text encoder behind a real gRPC server (`remote_pipeline`).

`pipe(prompt=...)` must give the images of diffusers' `Flux2Pipeline` with its LOCAL text encoder on the
same weights (the same pre-quantized NF4 DiT): text-to-image, two prompts x two images, two reference
images; `pipe.encode_prompt` must return what diffusers' own returns; options that need the local encoder
are refused by name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import Flux2Pipeline
from flux2_client.endpoints import EncoderPool, RetryPolicy
from flux2_client.generation import load_pipeline
from flux2_client.remote_pipeline import Flux2RemotePipeline, as_prompt_encoder, with_remote_text_encoder
from PIL import Image

CPU = torch.device("cpu")
CALL = dict(height=64, width=64, num_inference_steps=2, guidance_scale=4.0)
PROMPTS = ["a lighthouse at dusk", "two cats on a sofa"]


def reference_images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in ((64, 64), (64, 96))]


def generators(count: int, seed: int = 7) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + k) for k in range(count)]


def arrays(images) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.uint8) for im in images]


class CountingEncoder:
    """Wraps a real encoder and records the prompts each call sends."""

    def __init__(self, encoder):
        self.encoder, self.calls = encoder, []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return self.encoder.encode(prompts)


@pytest.fixture(scope="module")
def remote_pipe(tiny, server):
    """What a user gets from `load_pipeline(..., encoder="host:port")`: the NF4 DiT, the VAE, the server."""
    pipe = load_pipeline(str(tiny.pipeline), dit=str(tiny.nf4_repo), device="cpu", encoder=server.target)
    yield pipe
    pipe.encoder.close()


def test_load_pipeline_gives_a_flux2_pipeline_whose_encoder_is_a_pool(remote_pipe, server):
    assert isinstance(remote_pipe, Flux2RemotePipeline) and isinstance(remote_pipe, Flux2Pipeline)
    assert remote_pipe.text_encoder is None and remote_pipe.tokenizer is None
    assert isinstance(remote_pipe.encoder, EncoderPool) and remote_pipe.encoder.targets == [server.target]
    # diffusers' component bookkeeping still holds: the encoder is not a (saveable) component.
    assert set(remote_pipe.components) == {"scheduler", "vae", "text_encoder", "tokenizer", "transformer"}


@pytest.fixture(scope="module")
def reference_encoding(reference_pipe):
    """diffusers' own encode_prompt on the full, local tiny Mistral3: two prompts, two images each."""
    return reference_pipe.encode_prompt(PROMPTS, device=CPU, num_images_per_prompt=2)


def test_encode_prompt_equals_diffusers(remote_pipe, reference_encoding):
    want_embeds, want_ids = reference_encoding
    counting = CountingEncoder(remote_pipe.encoder)
    pipe = with_remote_text_encoder(remote_pipe, counting)
    embeds, text_ids = pipe.encode_prompt(PROMPTS, num_images_per_prompt=2)
    assert embeds.dtype == want_embeds.dtype == torch.bfloat16
    assert torch.equal(embeds, want_embeds)
    assert torch.equal(text_ids, want_ids)
    assert not torch.equal(embeds[0], embeds[2])  # the two prompts differ: not a comparison of constants
    # A repeated prompt crosses the wire once; rows keep the caller's order. (Rows of diffusers' batch are
    # its single-prompt answers: on the CPU a prompt's bytes do not depend on the batch, docs/design.md.)
    embeds, text_ids = pipe.encode_prompt([PROMPTS[1], PROMPTS[0], PROMPTS[1]])
    assert counting.calls[-1] == [PROMPTS[1], PROMPTS[0]]
    assert torch.equal(embeds, want_embeds[[2, 0, 2]]) and torch.equal(text_ids, want_ids[:3])
    embeds, _ = pipe.encode_prompt(PROMPTS[0])
    assert torch.equal(embeds, want_embeds[:1])


CASES = {
    "text-to-image": dict(prompt=PROMPTS[0]),
    "two prompts x two images": dict(prompt=PROMPTS, num_images_per_prompt=2),
    "two reference images": dict(prompt=PROMPTS[1], image=reference_images),
}


@pytest.mark.parametrize("case", CASES)
def test_images_equal_diffusers_with_its_local_text_encoder(remote_pipe, resident_nf4_pipe, case):
    def call(pipe):
        kwargs = {k: (v() if callable(v) else v) for k, v in CASES[case].items()}
        count = (len(kwargs["prompt"]) if isinstance(kwargs["prompt"], list) else 1) * kwargs.get(
            "num_images_per_prompt", 1
        )
        return arrays(pipe(**kwargs, **CALL, generator=generators(count)).images), count

    ours, count = call(remote_pipe)
    theirs, _ = call(resident_nf4_pipe)  # diffusers encoding with the full, local tiny Mistral3
    assert len(ours) == len(theirs) == count
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == (64, 64, 3)
        np.testing.assert_array_equal(a, b)
    assert ours[0].std() > 1
    if count == 4:  # prompt-major: images 0, 1 are the first prompt's (seeds 7, 8), 2, 3 the second's
        assert not np.array_equal(ours[0], ours[1]) and not np.array_equal(ours[0], ours[2])


def test_options_that_need_the_local_text_encoder_are_refused_by_name(remote_pipe):
    from flux2_client.encoder import RemoteEncoderError

    # Caption upsampling runs on the server (tests/test_upsample.py); this one was started without it.
    with pytest.raises(RemoteEncoderError, match=r"FAILED_PRECONDITION: upsampling: .*start it with --upsampling"):
        remote_pipe(prompt=PROMPTS[0], caption_upsample_temperature=0.15, **CALL)
    with pytest.raises(ValueError, match=r"^max_sequence_length: .* to 512 tokens, got 256"):
        remote_pipe(prompt=PROMPTS[0], max_sequence_length=256, **CALL)
    with pytest.raises(ValueError, match=r"^text_encoder_out_layers: .*\(10, 20, 30\), got \(1, 2, 3\)"):
        remote_pipe.encode_prompt(PROMPTS[0], text_encoder_out_layers=(1, 2, 3))
    with pytest.raises(ValueError, match=r"^prompt\[1\]: expected a string, got int"):
        remote_pipe.encode_prompt([PROMPTS[0], 3])


def test_without_an_encoder_a_prompt_is_refused(remote_pipe):
    pipe = Flux2RemotePipeline(
        scheduler=remote_pipe.scheduler, vae=remote_pipe.vae, transformer=remote_pipe.transformer
    )
    with pytest.raises(ValueError, match=r"^encoder: this pipeline has no text encoder"):
        pipe(prompt=PROMPTS[0], **CALL)
    with pytest.raises(ValueError, match=r"^encoder: expected 'host:port'"):
        as_prompt_encoder(42)  # type: ignore[arg-type]


def test_from_pretrained_and_an_existing_pipeline_get_the_remote_encoder(
    tiny, server, remote_pipe, reference_pipe, reference_encoding
):
    want = reference_encoding[0][[0, 2]]
    dit = remote_pipe.transformer
    # A dead server first: the pool fails over to the live one.
    with EncoderPool(["127.0.0.1:1", server.target], timeout=10, retry=RetryPolicy(backoff=0.01)) as pool:
        loaded = Flux2RemotePipeline.from_pretrained(str(tiny.pipeline), transformer=dit, encoder=pool)
        assert loaded.text_encoder is None and loaded.tokenizer is None and loaded.encoder is pool
        # The issue's form: diffusers' own pipeline without its text encoder, then the remote one attached.
        local = Flux2Pipeline.from_pretrained(str(tiny.pipeline), text_encoder=None, tokenizer=None, transformer=dit)
        attached = with_remote_text_encoder(local, pool)
        assert attached.transformer is dit and attached.vae is local.vae and attached.scheduler is local.scheduler
        # A pipeline that has a local encoder hands over everything but it.
        from_local = with_remote_text_encoder(reference_pipe, pool)
        assert from_local.text_encoder is None and from_local.transformer is reference_pipe.transformer
        for pipe in (loaded, attached, from_local):
            assert torch.equal(pipe.encode_prompt(PROMPTS)[0], want)
    with pytest.raises(ValueError, match=r"^pipe: expected a Flux2Pipeline"):
        with_remote_text_encoder(object(), server.target)
