"""The planner's streamed path on a CUDA device (skipped without one): the block streamer copying from a
page-locked host buffer on a side stream gives the same bytes as the DiT held whole on the card.

    python -m pytest -m gpu tests/gpu -q        # FLUX2_GPU_REPORT_DIR=dir keeps the figures as JSON
"""

from __future__ import annotations

import numpy as np
import torch
from _gpu_report import needs_cuda, write_gpu_report
from flux2_client.generation import GenerationParams, generate, load_pipeline
from flux2_client.offload import (
    apply_block_streaming,
    get_memory_plan,
    plan_for,
    remove_memory_plan,
    spec_from_module,
)
from flux2_client.planner import (
    DEFAULT_CUDA_OVERHEAD,
    Budget,
    GiB,
    Workload,
    _group_units,
    activation_bytes,
    plan_memory,
    vae_decode_bytes,
)

pytestmark = needs_cuda("the side-stream copies, cudaHostRegister and NF4 CUDA kernels (run on an H100/H200)")


def test_tiny_pipeline_streams_on_cuda_bit_identical_to_resident(tiny, request):
    """Tiny models from disk (the pre-quantized NF4 DiT, so bitsandbytes' quant_state trap applies),
    2 prompts x 2 reference images: everything resident, `load_pipeline(vram="8GB")`, and a plan that
    streams parts through two slots give the same images."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from flux2_client._quantization import load_nf4_transformer
    from PIL import Image

    embeds = torch.randn(2, 512, 192, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    rng = np.random.default_rng(0)
    refs = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    params = GenerationParams(64, 64, 3, 4.0, seed=1)
    workload = Workload(64, 64, reference_sizes=((64, 64),) * 2, batch=2)

    def images(pipe) -> list[np.ndarray]:
        return [np.asarray(im) for im in generate(pipe, embeds, params, images=refs, progress=False)]

    plain = load_pipeline(str(tiny.pipeline), dit=str(tiny.nf4_repo), device="cuda", offload="none")
    expected = images(plain)
    del plain
    # The API path on CUDA: the tiny DiT fits an 8 GB budget whole (a resident plan).
    api = load_pipeline(str(tiny.pipeline), dit=str(tiny.nf4_repo), device="cuda", vram="8GB", workload=workload)
    api_plan = get_memory_plan(api)
    assert api_plan is not None
    api_mode = api_plan.mode
    api_same = all(np.array_equal(a, b) for a, b in zip(expected, images(api), strict=True))
    remove_memory_plan(api)
    del api
    torch.cuda.set_per_process_memory_fraction(1.0, 0)

    # Streaming: the tiny DiT streams only under a budget of a few MiB, too small for cuBLAS' workspace,
    # so plan for 2.5 blocks of room and leave the allocator uncapped. Same loader, same streamer.
    transformer = load_nf4_transformer(str(tiny.nf4_repo), device="cpu")
    vae = AutoencoderKLFlux2.from_pretrained(str(tiny.pipeline), subfolder="vae", dtype=torch.bfloat16).to("cuda")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tiny.pipeline), subfolder="scheduler")
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    spec = spec_from_module(transformer, vae)
    work = max(activation_bytes(spec, workload), vae_decode_bytes(spec, workload, tiled=False))
    block = max(n for _, n in _group_units(spec, "block"))
    budget = Budget(vram=DEFAULT_CUDA_OVERHEAD + int((spec.other_bytes + spec.vae_bytes + work + 2.5 * block) / 0.94))
    plan = plan_memory(spec, workload, budget)
    streamer = apply_block_streaming(transformer, plan, torch.device("cuda", 0))
    got = images(pipe)
    streamed_same = all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))
    figures = {
        "api_plan_mode": api_mode,
        "api_identical_to_resident": api_same,
        "plan_mode": plan.mode,
        "streamed_units": streamer.num_units,
        "resident_units": sum(u.resident for u in plan.units),
        "copies": streamer.stats.copies,
        "loads_on_demand": streamer.stats.loads_on_demand,
        "pinned": streamer.pinned,
        "streamed_identical_to_resident": streamed_same,
    }
    write_gpu_report(request, figures)
    remove_memory_plan(pipe)
    assert api_mode == "resident" and api_same
    assert plan.mode == "stream" and streamer.num_units > 0 and any(u.resident for u in plan.units)
    assert figures["pinned"]  # read before remove_memory_plan, which unpins the host buffer
    assert streamer.stats.copies >= streamer.num_units * params.num_inference_steps
    assert streamed_same


def test_real_size_streamed_dit_is_bit_identical_to_resident(request):
    """The real-size FLUX.2-dev NF4 DiT (random seeded weights, built twice from the same seed), one forward
    at 1024 px (4096 image + 512 text tokens): resident on the card vs the planner's 8 GiB plan (whole-block
    units, some resident, the rest streamed through two slots on the side stream), each run twice."""
    from bench._models import build_nf4_dit

    device = torch.device("cuda", 0)
    g = torch.Generator(device).manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 4096, 128, device=device, generator=g).to(torch.bfloat16),
        encoder_hidden_states=torch.randn(1, 512, 15360, device=device, generator=g).to(torch.bfloat16),
        timestep=torch.tensor([0.5], device=device),
        guidance=torch.tensor([4.0], device=device),
        img_ids=torch.zeros(1, 4096, 4, device=device),
        txt_ids=torch.zeros(1, 512, 4, device=device),
    )

    def forward(model) -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs).sample.float().cpu()

    resident = build_nf4_dit(device).to(device)
    r1, r2 = forward(resident), forward(resident)
    del resident
    torch.cuda.empty_cache()

    streamed = build_nf4_dit(device)
    plan = plan_for(streamed, None, Workload(1024, 1024), device, vram=8 * GiB)
    streamer = apply_block_streaming(streamed, plan, device)
    s1, s2 = forward(streamed), forward(streamed)
    figures = {
        "plan": plan.as_dict(),
        "resident_deterministic": torch.equal(r1, r2),
        "finite_fraction": torch.isfinite(r1).float().mean().item(),
        "streamed_equal_resident": [torch.equal(r1, s) for s in (s1, s2)],
        "streamed_max_abs_diff": max((r1 - s).abs().nan_to_num(0).max().item() for s in (s1, s2)),
        "copies": streamer.stats.copies,
        "streamed_units": streamer.num_units,
        "pinned": streamer.pinned,
    }
    write_gpu_report(request, figures)
    remove_memory_plan(streamed)
    assert plan.mode == "stream" and plan.granularity == "block"
    assert 0 < streamer.num_units < len(plan.units)
    assert figures["pinned"]  # read before remove_memory_plan, which unpins the host buffer
    assert streamer.stats.copies >= 2 * streamer.num_units
    assert figures["finite_fraction"] == 1.0
    assert torch.equal(r1, r2)
    assert torch.equal(r1, s1) and torch.equal(r1, s2)
