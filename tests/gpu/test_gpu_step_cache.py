"""Step caches on the streamed path on a CUDA device (skipped without one): with MagCache or TaylorSeer on,
the tiny DiT streamed part by part from the page-locked host buffer on the side stream gives the latents of
the same DiT held whole on the card with the same cache, and the parts copied per step drop by exactly the
parts the cache skipped.

    python -m pytest -m gpu tests/gpu -q        # FLUX2_GPU_REPORT_DIR=dir keeps the figures as JSON
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _gpu_report import needs_cuda, write_gpu_report
from flux2_client.generation import generate, load_pipeline
from flux2_client.offload import apply_block_streaming, get_block_streamer
from test_offload import embeddings
from test_step_cache import PARAMS, RESIDENT_PARTS, part_plan, skipped_blocks

pytestmark = needs_cuda("side-stream copies into slots while a step cache skips blocks (run on an H200)")


@pytest.mark.parametrize("step_cache", ["mag", "taylorseer"])
def test_step_cache_on_cuda_streamed_equals_resident_and_skips_copies(tiny, step_cache, request):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from flux2_client._quantization import load_nf4_transformer

    params = dataclasses.replace(PARAMS, step_cache=step_cache)
    resident = load_pipeline(str(tiny.pipeline), dit=str(tiny.nf4_repo), device="cuda", offload="none")
    want = generate(resident, embeddings(1), params, progress=False, output_type="latent")[0].cpu()
    del resident
    torch.cuda.empty_cache()

    transformer = load_nf4_transformer(str(tiny.nf4_repo), device="cpu")
    vae = AutoencoderKLFlux2.from_pretrained(str(tiny.pipeline), subfolder="vae", dtype=torch.bfloat16).to("cuda")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tiny.pipeline), subfolder="scheduler")
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    streamer = apply_block_streaming(transformer, part_plan(transformer, RESIDENT_PARTS), "cuda")
    skipped: list[set[str]] = []

    def on_step(_pipe, _i, _t, kw):
        skipped.append(skipped_blocks(transformer))
        return kw

    got = generate(pipe, embeddings(1), params, progress=False, callback_on_step_end=on_step, output_type="latent")
    got_latents = got[0].cpu()
    skipped_units = [sum(1 for blocks in streamer.unit_blocks if blocks <= step) for step in skipped]
    figures = {
        "copies_per_step": streamer.stats.copies_per_forward(),
        "skipped_units_per_step": skipped_units,
        "streamed_units": streamer.num_units,
        "loads_on_demand": streamer.stats.loads_on_demand,
        "pinned": streamer.pinned,
    }
    write_gpu_report(request, figures)
    assert get_block_streamer(pipe) is streamer and streamer.pinned
    assert torch.equal(got_latents, want)
    assert sum(skipped_units) > 0
    assert figures["copies_per_step"] == [streamer.num_units - k for k in skipped_units]
