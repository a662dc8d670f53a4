"""Images from the client equal diffusers' Flux2Pipeline given the same embeddings, seed and steps."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from flux2_client._quantization import load_nf4_transformer
from flux2_client.generation import GenerationParams, generate, load_pipeline, save_png
from flux2_client.remote import RemoteTextEncoder
from PIL import Image

PARAMS = GenerationParams(height=64, width=64, num_inference_steps=3, guidance_scale=4.0, seed=7)
PROMPTS = ["a lighthouse at dusk", "two cats on a sofa"]


@pytest.fixture(scope="module")
def client_pipe(tiny):
    """The client's pipeline: pre-quantized NF4 DiT, group offloading (leaf_level), VAE, no encoder."""
    return load_pipeline(str(tiny.pipeline), dit=str(tiny.nf4_repo), device="cpu", offload="leaf_level")


@pytest.fixture(scope="module")
def diffusers_nf4_pipe(tiny):
    """diffusers' full Flux2Pipeline (its own text encoder) with the same NF4 DiT, no offloading."""
    from diffusers import Flux2Pipeline

    transformer = load_nf4_transformer(str(tiny.nf4_repo), device="cpu")
    return Flux2Pipeline.from_pretrained(str(tiny.pipeline), transformer=transformer, dtype=torch.bfloat16)


def as_array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


def test_client_pipeline_is_nf4_and_offloaded(client_pipe):
    import bitsandbytes as bnb

    transformer = client_pipe.transformer
    assert client_pipe.text_encoder is None and client_pipe.tokenizer is None
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in transformer.modules())
    assert transformer.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert any(
        hasattr(m, "_diffusers_hook") and m._diffusers_hook.get_hook("group_offloading") for m in transformer.modules()
    )


def test_image_equals_diffusers_pipeline(server, client_pipe, diffusers_nf4_pipe):
    with RemoteTextEncoder(server.target) as enc:
        embeds = enc.encode(PROMPTS).prompt_embeds
    ours = generate(client_pipe, embeds, PARAMS)

    # Same embeddings handed to diffusers' pipeline (image k seeded with seed + k, as `generate` does)...
    generators = [torch.Generator("cpu").manual_seed(PARAMS.seed + k) for k in range(len(PROMPTS))]
    theirs = diffusers_nf4_pipe(
        prompt_embeds=embeds,
        height=PARAMS.height,
        width=PARAMS.width,
        num_inference_steps=PARAMS.num_inference_steps,
        guidance_scale=PARAMS.guidance_scale,
        generator=generators,
    ).images
    # ...and diffusers encoding the prompts itself with the full text encoder.
    end_to_end = diffusers_nf4_pipe(
        prompt=PROMPTS,
        height=PARAMS.height,
        width=PARAMS.width,
        num_inference_steps=PARAMS.num_inference_steps,
        guidance_scale=PARAMS.guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(PARAMS.seed + k) for k in range(len(PROMPTS))],
    ).images
    assert len(ours) == len(theirs) == len(end_to_end) == 2
    for a, b, c in zip(ours, theirs, end_to_end, strict=True):
        assert a.size == (64, 64)
        np.testing.assert_array_equal(as_array(a), as_array(b))
        np.testing.assert_array_equal(as_array(a), as_array(c))
    # Not a constant image, and the two prompts draw different images.
    assert as_array(ours[0]).std() > 1
    assert not np.array_equal(as_array(ours[0]), as_array(ours[1]))


def test_seed_changes_the_image(server, client_pipe):
    with RemoteTextEncoder(server.target) as enc:
        embeds = enc.encode(PROMPTS[0]).prompt_embeds
    a = generate(client_pipe, embeds, PARAMS)[0]
    b = generate(client_pipe, embeds, GenerationParams(64, 64, 3, 4.0, seed=8))[0]
    assert not np.array_equal(as_array(a), as_array(b))


def test_png_metadata_round_trip(tmp_path):
    image = Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))
    meta = {"prompt": "a fox", "seed": 3, "steps": 4, "encoder_fingerprint": "abc"}
    path = save_png(image, tmp_path / "x.png", meta)
    with Image.open(path) as loaded:
        assert loaded.text["prompt"] == "a fox"
        assert loaded.text["seed"] == "3"
        assert json.loads(loaded.text["flux2_split"]) == meta


def test_generate_cli_rejects_bad_size():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flux2_client",
            "generate",
            "--server",
            "127.0.0.1:1",
            "--prompt",
            "x",
            "--height",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--height must be a positive multiple of 16" in proc.stderr


@pytest.mark.slow
def test_demo_command_runs(tmp_path):
    """The README's demo: tiny models -> real server process -> image -> server stopped."""
    proc = subprocess.run(
        [sys.executable, "-m", "flux2_client", "demo", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "server stopped (exit code 0)" in proc.stdout
    assert "random weights, so the image is noise" in proc.stdout
    with Image.open(tmp_path / "demo.png") as image:
        assert image.size == (128, 128)
        assert image.text["encoder_fingerprint"]
