"""The planner's offloading path on the CPU: an NF4 DiT loaded from disk, some blocks resident, the rest
streamed through rotating slots, gives images bit-identical to diffusers' pipeline without offloading
(text-to-image and multi-reference editing)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from flux2_client._quantization import load_nf4_transformer
from flux2_client.generation import GenerationParams, generate, load_pipeline
from flux2_client.offload import BlockStreamer, spec_from_module
from flux2_client.planner import (
    Budget,
    MemoryPlan,
    Unit,
    Workload,
    _group_units,
    activation_bytes,
    plan_memory,
    vae_decode_bytes,
)
from PIL import Image

PARAMS = GenerationParams(height=64, width=64, num_inference_steps=2, guidance_scale=4.0, seed=11)
REF_SIZES = ((64, 64), (64, 96))
WORKLOAD = Workload(64, 64, reference_sizes=REF_SIZES, batch=2)


def reference_images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in REF_SIZES]


@pytest.fixture(scope="module")
def tight_vram(tiny) -> int:
    """A budget (CPU: no CUDA overhead) that holds the fixed costs plus 2.5 blocks' worth: the plan
    must stream some parts and keep others resident."""
    from diffusers import AutoencoderKLFlux2

    spec = spec_from_module(
        load_nf4_transformer(str(tiny.nf4_repo), device="cpu"),
        AutoencoderKLFlux2.from_pretrained(str(tiny.pipeline), subfolder="vae", dtype=torch.bfloat16),
    )
    work = max(activation_bytes(spec, WORKLOAD), vae_decode_bytes(spec, WORKLOAD, tiled=False))
    block = max(n for _, n in _group_units(spec, "block"))
    return int((spec.other_bytes + spec.vae_bytes + work + 2.5 * block) / 0.94)


@pytest.fixture(scope="module")
def planned_pipe(tiny, tight_vram):
    return load_pipeline(
        str(tiny.pipeline), dit=str(tiny.nf4_repo), device="cpu", offload="plan", vram=tight_vram, workload=WORKLOAD
    )


@pytest.fixture(scope="module")
def plain_pipe(tiny):
    """diffusers' Flux2Pipeline with the same NF4 DiT from disk, no offloading of any kind."""
    from diffusers import Flux2Pipeline

    transformer = load_nf4_transformer(str(tiny.nf4_repo), device="cpu")
    return Flux2Pipeline.from_pretrained(
        str(tiny.pipeline), transformer=transformer, text_encoder=None, tokenizer=None, dtype=torch.bfloat16
    )


def embeddings(batch: int) -> torch.Tensor:
    return torch.randn(batch, 512, 192, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)


def diffusers_images(pipe, embeds, images=None, num_images_per_prompt=1):
    count = embeds.shape[0] * num_images_per_prompt
    return pipe(
        prompt_embeds=embeds,
        image=images,
        height=PARAMS.height,
        width=PARAMS.width,
        num_inference_steps=PARAMS.num_inference_steps,
        guidance_scale=PARAMS.guidance_scale,
        num_images_per_prompt=num_images_per_prompt,
        generator=[torch.Generator("cpu").manual_seed(PARAMS.seed + k) for k in range(count)],
    ).images


def arrays(images) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.uint8) for im in images]


def test_plan_streams_parts_and_keeps_others_resident(planned_pipe):
    plan: MemoryPlan = planned_pipe.memory_plan
    assert plan.mode == "stream"
    assert any(u.resident for u in plan.units) and plan.streamed_units
    streamer: BlockStreamer = planned_pipe.block_streamer
    # Every tensor of a streamed part (NF4 weight and its quant_state) views a slot; nothing else holds it.
    slot_ranges = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in streamer.slots]
    part = planned_pipe.transformer.get_submodule(plan.streamed_units[0].atoms[0])
    for module in part.modules():
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        tensors = [weight]
        if getattr(weight, "quant_state", None) is not None:
            tensors += [weight.quant_state.absmax, weight.quant_state.code]
        for t in tensors:
            assert any(lo <= t.data_ptr() < hi for lo, hi in slot_ranges), module


def test_text_to_image_identical_to_diffusers_without_offloading(planned_pipe, plain_pipe):
    embeds = embeddings(2)
    streamer = planned_pipe.block_streamer
    before = streamer.stats.copies
    ours = generate(planned_pipe, embeds, PARAMS, progress=False)
    theirs = diffusers_images(plain_pipe, embeds)
    assert len(ours) == 2
    for a, b in zip(arrays(ours), arrays(theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    # Weights really streamed: every streamed unit was copied in every step, in execution order.
    n = len(planned_pipe.memory_plan.streamed_units)
    assert streamer.stats.copies - before >= n * PARAMS.num_inference_steps
    assert streamer.stats.log[-n:] == list(range(n))


def test_multi_reference_identical_to_diffusers(planned_pipe, plain_pipe):
    embeds = embeddings(1)
    refs = reference_images()
    ours = generate(planned_pipe, embeds, PARAMS, images=refs, num_images_per_prompt=2, progress=False)
    theirs = diffusers_images(plain_pipe, embeds, refs, num_images_per_prompt=2)
    assert len(ours) == 2
    for a, b in zip(arrays(ours), arrays(theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    # The references matter: without them the same seed draws another image.
    plain = generate(planned_pipe, embeds, PARAMS, progress=False)[0]
    assert not np.array_equal(arrays([plain])[0], arrays(ours)[:1][0])


def test_generate_refuses_a_call_bigger_than_planned(planned_pipe):
    with pytest.raises(ValueError, match="larger than the workload the memory plan was made for"):
        generate(planned_pipe, embeddings(1), GenerationParams(height=128, width=128), progress=False)
    with pytest.raises(ValueError, match="at most 10 reference images"):
        generate(planned_pipe, embeddings(1), PARAMS, images=reference_images() * 6, progress=False)


def test_whole_block_streaming_is_exact(tiny):
    """Block-granular units (one copy per whole block) on the DiT alone, against the same DiT unhooked."""
    model = load_nf4_transformer(str(tiny.nf4_repo), device="cpu")
    spec = spec_from_module(model)
    # The tiny DiT has three block units (two double blocks, one pair of single blocks): keep the middle
    # one resident and stream the other two, whole, through two slots.
    blocks = _group_units(spec, "block")
    units = tuple(Unit(names, n, resident=i == 1) for i, (names, n) in enumerate(blocks))
    base = plan_memory(spec, Workload(64, 64), Budget(vram=1 << 40, device_type="cpu"))
    plan = dataclasses.replace(base, mode="stream", units=units, num_slots=2, granularity="block")
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 128, generator=g).to(torch.bfloat16),
        encoder_hidden_states=torch.randn(1, 8, 192, generator=g).to(torch.bfloat16),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([4.0]),
        img_ids=torch.zeros(1, 16, 4),
        txt_ids=torch.zeros(1, 8, 4),
    )
    with torch.no_grad():
        expected = [model(**inputs).sample for _ in range(2)]
        streamer = BlockStreamer(model, plan, "cpu")
        got = [model(**inputs).sample for _ in range(2)]
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    assert streamer.stats.loads_on_demand == 1  # only the very first unit; the rest were prefetched
    assert streamer.stats.log == [0, 1, 0, 1]


def test_plan_only_cli_prints_the_plan_for_the_real_model(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "Flux2Transformer2DModel"}))
    proc = subprocess.run(
        [sys.executable, "-m", "flux2_client", "generate", "--plan-only", "--vram", "8GB", "--dit", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "memory plan" in proc.stdout
    assert "block granularity" in proc.stdout and "512 px tiles" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "flux2_client", "generate", "--plan-only", "--vram", "2GB", "--dit", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "--vram: vram budget 2.00 GiB is too small" in proc.stderr
