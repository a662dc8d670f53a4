"""The planner's offloading path on the CPU: an NF4 DiT loaded from disk, some blocks resident, the rest
streamed through rotating slots, gives images bit-identical to diffusers' resident NF4 pipeline
(text-to-image and multi-reference editing), and computes with the bytes it streams."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from flux2_client._quantization import load_nf4_transformer
from flux2_client.generation import GenerationParams, generate
from flux2_client.offload import (
    MEMORY_PLAN_HOOK,
    STREAM_HOOK,
    apply_block_streaming,
    get_block_streamer,
    get_memory_plan,
    remove_memory_plan,
    spec_from_module,
)
from flux2_client.planner import Budget, Unit, Workload, _group_units, plan_memory
from PIL import Image

PARAMS = GenerationParams(height=64, width=64, num_inference_steps=2, guidance_scale=4.0, seed=11)
REF_SIZES = ((64, 64), (64, 96))  # within the workload `streamed_pipe` was planned for


def reference_images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in REF_SIZES]


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


def streamed_tensors(pipe) -> list[tuple[str, torch.Tensor]]:
    """Every tensor a streamed part computes with: NF4 weights with their quant_state, norm scales."""
    plan = get_memory_plan(pipe)
    out = []
    for unit in plan.streamed_units:
        for atom in unit.atoms:
            for name, module in pipe.transformer.get_submodule(atom).named_modules(prefix=atom):
                for pname, p in module.named_parameters(recurse=False):
                    out.append((f"{name}.{pname}", p))
                    state = getattr(p, "quant_state", None)
                    if state is not None:
                        out += [(f"{name}.{pname}.absmax", state.absmax), (f"{name}.{pname}.code", state.code)]
    return out


def assert_streamed_tensors_view_slots(pipe) -> None:
    streamer = get_block_streamer(pipe)
    slot_ranges = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in streamer.slots]
    tensors = streamed_tensors(pipe)
    assert tensors
    for name, t in tensors:
        assert any(lo <= t.data_ptr() < hi for lo, hi in slot_ranges), f"{name} does not view a slot"


def test_plan_streams_parts_and_keeps_others_resident(streamed_pipe):
    plan = get_memory_plan(streamed_pipe)
    assert plan.mode == "stream"
    assert any(u.resident for u in plan.units) and plan.streamed_units
    # Every tensor of a streamed part (NF4 weight and its quant_state) views a slot; nothing else holds it.
    assert_streamed_tensors_view_slots(streamed_pipe)


def test_text_to_image_identical_to_diffusers_resident(streamed_pipe, resident_nf4_pipe):
    embeds = embeddings(2)
    streamer = get_block_streamer(streamed_pipe)
    before = streamer.stats.copies
    ours = generate(streamed_pipe, embeds, PARAMS, progress=False)
    theirs = diffusers_images(resident_nf4_pipe, embeds)
    assert len(ours) == 2
    for a, b in zip(arrays(ours), arrays(theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    # Weights really streamed: every streamed unit was copied in every step, in execution order.
    n = len(get_memory_plan(streamed_pipe).streamed_units)
    assert streamer.stats.copies - before >= n * PARAMS.num_inference_steps
    assert streamer.stats.log[-n:] == list(range(n))
    # A forward re-points nothing: on CPUs where bitsandbytes repacks NF4 weights in the forward
    # (avx512_bf16), a repack after the slabs were laid out would leave the weights off their slots.
    assert_streamed_tensors_view_slots(streamed_pipe)


def test_the_forward_computes_with_the_streamed_bytes(streamed_pipe):
    """Zeroing the host copy of one streamed unit changes the image; restoring it gives it back. So the
    slots' contents come from the host buffer's copies, and the forward reads them."""
    embeds, one_step = embeddings(1), dataclasses.replace(PARAMS, num_inference_steps=1)
    streamer = get_block_streamer(streamed_pipe)
    want = arrays(generate(streamed_pipe, embeds, one_step, progress=False))[0]
    host = streamer.host_units[0]
    saved = host.clone()
    try:
        host.zero_()
        streamer.invalidate()  # slot 0 was prefetched at the end of the last forward
        broken = arrays(generate(streamed_pipe, embeds, one_step, progress=False))[0]
    finally:
        host.copy_(saved)
        streamer.invalidate()
    assert not np.array_equal(broken, want)
    np.testing.assert_array_equal(arrays(generate(streamed_pipe, embeds, one_step, progress=False))[0], want)


def test_streamer_holds_exactly_what_the_plan_counts(streamed_pipe):
    """What the streamer allocated (resident buffer, slots, host buffer) is what the plan says, and every
    tensor of the DiT lives inside those buffers: nothing was left behind or copied twice."""
    plan, streamer = get_memory_plan(streamed_pipe), get_block_streamer(streamed_pipe)
    assert streamer.resident_buffer.numel() == plan.resident_bytes
    assert [s.numel() for s in streamer.slots] == [plan.slot_bytes] * plan.num_slots
    assert streamer.host_buffer.numel() == plan.host_pinned_bytes
    buffers = [streamer.resident_buffer, *streamer.slots]
    ranges = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in buffers]
    tensors = [*streamed_pipe.transformer.parameters(), *streamed_pipe.transformer.buffers()]
    tensors += [p.quant_state.absmax for p in streamed_pipe.transformer.parameters() if hasattr(p, "quant_state")]
    for t in tensors:
        assert any(lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi for lo, hi in ranges)


def test_multi_reference_identical_to_diffusers(streamed_pipe, resident_nf4_pipe):
    embeds = embeddings(1)
    refs = reference_images()
    ours = generate(streamed_pipe, embeds, PARAMS, images=refs, num_images_per_prompt=2, progress=False)
    theirs = diffusers_images(resident_nf4_pipe, embeds, refs, num_images_per_prompt=2)
    assert len(ours) == 2
    for a, b in zip(arrays(ours), arrays(theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    # The references matter: without them the same seed draws another image.
    plain = generate(streamed_pipe, embeds, PARAMS, progress=False)[0]
    assert not np.array_equal(arrays([plain])[0], arrays(ours)[:1][0])


def test_generate_refuses_a_call_bigger_than_planned(streamed_pipe):
    with pytest.raises(ValueError, match="larger than the workload the memory plan was made for"):
        generate(streamed_pipe, embeddings(1), GenerationParams(height=128, width=128), progress=False)
    with pytest.raises(ValueError, match="at most 10 reference images"):
        generate(streamed_pipe, embeddings(1), PARAMS, images=reference_images() * 6, progress=False)


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
        streamer = apply_block_streaming(model, plan, "cpu")
        got = [model(**inputs).sample for _ in range(2)]
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    assert streamer.stats.loads_on_demand == 1  # only the very first unit; the rest were prefetched
    assert streamer.stats.log == [0, 1, 0, 1]
    assert get_memory_plan(model) is plan and get_block_streamer(model) is streamer
    with pytest.raises(ValueError, match="already applied"):
        apply_block_streaming(model, plan, "cpu")
    # Removing the named hook removes the per-block hooks with it.
    remove_memory_plan(model)
    assert get_memory_plan(model) is None
    assert not any(
        m._diffusers_hook.get_hook(name)
        for m in model.modules()
        if hasattr(m, "_diffusers_hook")
        for name in (STREAM_HOOK, MEMORY_PLAN_HOOK)
    )


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
