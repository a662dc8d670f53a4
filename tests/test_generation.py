"""Images from the client's streamed pipeline equal diffusers' resident NF4 Flux2Pipeline given the same
embeddings, seed and steps, and equal diffusers encoding the prompts itself."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from flux2_client.generation import (
    GenerationParams,
    generate,
    generate_to_files,
    load_pipeline,
    output_paths,
    save_png,
)
from flux2_client.offload import MEMORY_PLAN_HOOK, get_block_streamer, get_memory_plan
from flux2_client.remote import RemoteTextEncoder
from PIL import Image

PARAMS = GenerationParams(height=64, width=64, num_inference_steps=3, guidance_scale=4.0, seed=7)
PROMPTS = ["a lighthouse at dusk", "two cats on a sofa"]


def as_array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


def resident_images(pipe, **inputs) -> list:
    """diffusers' pipeline called directly, image k seeded with seed + k (as `generate` does)."""
    return pipe(
        height=PARAMS.height,
        width=PARAMS.width,
        num_inference_steps=PARAMS.num_inference_steps,
        guidance_scale=PARAMS.guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(PARAMS.seed + k) for k in range(len(PROMPTS))],
        **inputs,
    ).images


def test_client_pipeline_streams_an_nf4_dit(streamed_pipe):
    import bitsandbytes as bnb

    transformer = streamed_pipe.transformer
    assert streamed_pipe.text_encoder is None and streamed_pipe.tokenizer is None
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in transformer.modules())
    assert transformer.config.quantization_config.bnb_4bit_quant_type == "nf4"
    # The plan lives in a named hook on the transformer, not on the pipeline object.
    assert transformer._diffusers_hook.get_hook(MEMORY_PLAN_HOOK) is not None
    assert get_memory_plan(streamed_pipe) is get_memory_plan(transformer)
    assert get_memory_plan(streamed_pipe).mode == "stream"
    assert not hasattr(streamed_pipe, "memory_plan")


def test_leaf_level_pipeline_uses_diffusers_group_offloading(tiny):
    pipe = load_pipeline(str(tiny.pipeline), dit=str(tiny.nf4_repo), device="cpu", offload="leaf_level")
    hooks = [
        m._diffusers_hook.get_hook("group_offloading")
        for m in pipe.transformer.modules()
        if hasattr(m, "_diffusers_hook")
    ]
    assert any(h is not None for h in hooks)
    assert get_memory_plan(pipe) is None and get_block_streamer(pipe) is None


def test_image_equals_diffusers_resident_nf4_pipeline(server, streamed_pipe, resident_nf4_pipe):
    with RemoteTextEncoder(server.target) as enc:
        embeds = enc.encode(PROMPTS).prompt_embeds
    streamer = get_block_streamer(streamed_pipe)
    copies, log_start = streamer.stats.copies, len(streamer.stats.log)
    ours = generate(streamed_pipe, embeds, PARAMS, progress=False)
    # The DiT really streamed: every streamed unit ran from its slot in every step, in execution order,
    # and was copied there from the host buffer.
    n = len(get_memory_plan(streamed_pipe).streamed_units)
    assert n > 0 and streamer.stats.copies - copies >= n * PARAMS.num_inference_steps
    assert streamer.stats.log[log_start:] == list(range(n)) * PARAMS.num_inference_steps

    # Same embeddings handed to diffusers' resident NF4 pipeline...
    theirs = resident_images(resident_nf4_pipe, prompt_embeds=embeds)
    # ...and diffusers encoding the prompts itself with the full text encoder.
    end_to_end = resident_images(resident_nf4_pipe, prompt=PROMPTS)
    assert len(ours) == len(theirs) == len(end_to_end) == 2
    for a, b, c in zip(ours, theirs, end_to_end, strict=True):
        assert a.size == (64, 64)
        np.testing.assert_array_equal(as_array(a), as_array(b))
        np.testing.assert_array_equal(as_array(a), as_array(c))
    # Not a constant image, and the two prompts draw different images.
    assert as_array(ours[0]).std() > 1
    assert not np.array_equal(as_array(ours[0]), as_array(ours[1]))


def test_seed_changes_the_image(server, streamed_pipe):
    with RemoteTextEncoder(server.target) as enc:
        embeds = enc.encode(PROMPTS[0]).prompt_embeds
    a = generate(streamed_pipe, embeds, PARAMS, progress=False)[0]
    b = generate(streamed_pipe, embeds, GenerationParams(64, 64, 3, 4.0, seed=8), progress=False)[0]
    assert not np.array_equal(as_array(a), as_array(b))


def test_output_paths_are_prompt_major(tmp_path):
    out = tmp_path / "fox.png"
    assert output_paths(out, 1, 1) == [out]
    assert output_paths(out, 2, 1) == [tmp_path / "fox_0.png", tmp_path / "fox_1.png"]
    assert output_paths(out, 2, 2)[1:3] == [tmp_path / "fox_0_1.png", tmp_path / "fox_1_0.png"]


# The parameter-line pattern of AUTOMATIC1111's web UI (modules/infotext_utils.py, `re_param_code`), which
# its "PNG Info" tab and Forge use to read the `parameters` chunk back.
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def read_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Prompt, negative prompt and fields, split the way A1111's `parse_generation_parameters` splits them."""
    *lines, last = text.strip().split("\n")
    fields = {k: (json.loads(v) if v.startswith('"') else v) for k, v in A1111_PARAM.findall(last)}
    prompt = "\n".join(line for line in lines if not line.startswith("Negative prompt:"))
    negative = next((line[len("Negative prompt:") :].strip() for line in lines if line.startswith("Negative")), "")
    return prompt, negative, fields


def test_png_metadata_has_a1111_parameters_and_json_and_no_comfyui_key(tmp_path):
    from flux2_client.families import FLUX2_DEV, PipelineFamily
    from flux2_client.png_metadata import guidance_fields, infotext

    image = Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))
    meta = {"prompt": "a fox, at dusk: 東京", "seed": 3, "steps": 4, "encoder_fingerprint": "abc"}
    fields = {"Steps": 4, "Sampler": "Euler", **guidance_fields(FLUX2_DEV, 4.0), "Seed": 3, "Size": "16x16"}
    parameters = infotext(meta["prompt"], {**fields, "Model": "a, b", "Skipped": None}, negative_prompt="blurry")
    assert parameters == (
        "a fox, at dusk: 東京\nNegative prompt: blurry\nSteps: 4, Sampler: Euler, CFG scale: 1.0, "
        'Distilled CFG Scale: 4.0, Seed: 3, Size: 16x16, Model: "a, b"'
    )
    path = save_png(image, tmp_path / "x.png", meta, parameters)
    with Image.open(path) as loaded:
        assert set(loaded.text) == {"parameters", "flux2_split"}  # no "prompt": ComfyUI's workflow key
        assert json.loads(loaded.text["flux2_split"]) == meta
        prompt, negative, read = read_infotext(loaded.text["parameters"])
    assert (prompt, negative) == (meta["prompt"], "blurry")
    assert read == {**{k: str(v) for k, v in fields.items()}, "Model": "a, b"}
    # FLUX.2 [klein]: base models run real CFG, step-distilled ones ignore the guidance.
    assert guidance_fields(PipelineFamily("klein", "Flux2KleinPipeline"), 4.0) == {"CFG scale": 4.0}
    assert guidance_fields(PipelineFamily("klein", "Flux2KleinPipeline", is_distilled=True), 4.0) == {"CFG scale": 1.0}
    assert infotext("a fox", {"Steps": 4}) == "a fox\nSteps: 4"


def test_generate_cli_rejects_bad_size(capsys):
    from flux2_client.cli import main

    assert main(["generate", "--server", "127.0.0.1:1", "--prompt", "x", "--height", "100"]) == 2
    assert "--height must be a positive multiple of 16" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_command_runs(tmp_path):
    """The README's demo: tiny models -> real server process -> image -> server stopped; here with the
    single-machine mode's 4-bit encoder (`--encoder-precision nf4`, bitsandbytes' CPU kernels)."""
    proc = subprocess.run(
        [sys.executable, "-m", "flux2_client", "demo", "--workdir", str(tmp_path), "--encoder-precision", "nf4"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "server stopped (exit code 0)" in proc.stdout
    assert "starting the encoder server on" in proc.stdout and "(nf4)" in proc.stdout
    assert "nf4) on cpu" in (tmp_path / "server.log").read_text()  # the server loaded the 4-bit tier
    assert "random weights, so the image is noise" in proc.stdout
    with Image.open(tmp_path / "demo.png") as image:
        assert image.size == (128, 128)
        assert json.loads(image.text["flux2_split"])["encoder_fingerprint"]


class _FixedEncoder:
    """An encoder double for `generate_to_files`: fixed embeddings, a fingerprint, and the calls it got."""

    def __init__(self, embeds: torch.Tensor):
        self.embeds, self.calls = embeds, []

    def encode(self, prompts):
        from types import SimpleNamespace

        self.calls.append(list(prompts))
        fingerprint = SimpleNamespace(weights_id="tiny/encoder", digest="ab" * 32)
        return SimpleNamespace(prompt_embeds=self.embeds[: len(prompts)], fingerprint=fingerprint)


def test_generate_to_files_writes_one_png_per_image_with_its_parameters(tiny, tmp_path):
    embeds = torch.randn(2, 512, 192, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    encoder = _FixedEncoder(embeds)
    params = GenerationParams(height=32, width=32, num_inference_steps=1, guidance_scale=4.0, seed=5)
    paths = generate_to_files(
        encoder,
        PROMPTS,
        tmp_path / "out.png",
        params,
        model=str(tiny.pipeline),
        dit=str(tiny.nf4_repo),
        device="cpu",
        progress=False,
    )
    assert encoder.calls == [PROMPTS]
    assert paths == [tmp_path / "out_0.png", tmp_path / "out_1.png"]
    for k, path in enumerate(paths):
        with Image.open(path) as image:
            assert image.size == (32, 32)
            meta = json.loads(image.text["flux2_split"])
            parameters = image.text["parameters"]
        assert meta["prompt"] == PROMPTS[k] and meta["seed"] == 5 + k and meta["steps"] == 1
        assert parameters == (
            f"{PROMPTS[k]}\nSteps: 1, Sampler: Euler, CFG scale: 1.0, Distilled CFG Scale: 4.0, Seed: {5 + k}, "
            "Size: 32x32, Model: FLUX.2-dev-tiny"
        )
        assert meta["encoder_fingerprint"] == "ab" * 32 and meta["dit"] == str(tiny.nf4_repo)
    with pytest.raises(ValueError, match="prompts: one or more non-empty prompts"):
        generate_to_files(encoder, ["ok", "  "], tmp_path / "x.png", model=str(tiny.pipeline))


def test_demo_does_not_import_the_cli():
    """The demo calls the library (`generate_to_files`), not the CLI's argument parser."""
    code = "import sys, flux2_client.demo; print('flux2_client.cli' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "False"
