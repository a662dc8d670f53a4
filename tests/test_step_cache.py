"""Step caches on the streamed client, on the CPU: with diffusers' MagCache or TaylorSeer on, the planner's
streamed DiT gives latents bit-identical to diffusers' resident NF4 pipeline with the same cache, and the parts
copied per step drop by exactly the parts the cache skipped, counted from the cache's own state. The
first-block cache is refused up front (diffusers 0.42.1 cannot run it on FLUX.2), and the streamer's rule for
it (prefetch past the first block only once the cache has decided) is checked on the streamer itself."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from flux2_client._quantization import load_nf4_transformer
from flux2_client.generation import GenerationParams, generate, load_pipeline
from flux2_client.offload import apply_block_streaming, get_block_streamer, spec_from_module
from flux2_client.planner import Budget, Unit, Workload, plan_memory
from flux2_client.step_cache import SkipSchedule, StepCacheUnsupported, enable_step_cache, step_cache_config
from test_offload import embeddings

# 4 steps: MagCache (FLUX ratios, 20% retention) skips step 1; TaylorSeer lite (3 warm-up steps) predicts step 3.
PARAMS = GenerationParams(height=64, width=64, num_inference_steps=4, guidance_scale=4.0, seed=11)
# The tiny DiT's parts: a part-granular plan keeps the first block and the last single block resident and
# streams the other four parts through two slots, so every slot is refilled twice per step.
RESIDENT_PARTS = {
    "transformer_blocks.0.attn",
    "transformer_blocks.0.ff",
    "transformer_blocks.0.ff_context",
    "single_transformer_blocks.1.attn",
}


def part_plan(transformer, resident: set[str]):
    spec = spec_from_module(transformer)
    units = tuple(Unit((a.name,), a.nbytes, a.name in resident) for a in spec.atoms)
    base = plan_memory(spec, Workload(64, 64), Budget(vram=1 << 40, device_type="cpu"))
    return dataclasses.replace(base, mode="stream", units=units, num_slots=2, granularity="part")


@pytest.fixture(scope="module")
def parts_pipe(tiny):
    """The client's pipeline with the NF4 DiT streamed part by part (`part_plan`) from the host buffer."""
    pipe = load_pipeline(str(tiny.pipeline), dit=str(tiny.nf4_repo), device="cpu", offload="none")
    apply_block_streaming(pipe.transformer, part_plan(pipe.transformer, RESIDENT_PARTS), "cpu")
    return pipe


def _blocks(transformer) -> list[tuple[str, Any]]:
    return [
        (f"{name}.{i}", b)
        for name in ("transformer_blocks", "single_transformer_blocks")
        for i, b in enumerate(getattr(transformer, name))
    ]


def skipped_blocks(transformer) -> set[str]:
    """The blocks the enabled cache skipped in the step that just ended, read from the cache hooks' state."""
    from diffusers.hooks.mag_cache import MagCacheBlockHook, MagCacheHeadHook
    from diffusers.hooks.taylorseer_cache import TaylorSeerCacheHook

    skipped = set()
    for name, block in _blocks(transformer):
        registry = getattr(block, "_diffusers_hook", None)
        for hook in registry.hooks.values() if registry is not None else ():
            if isinstance(hook, (MagCacheHeadHook, MagCacheBlockHook)):
                if not hook.state_manager.get_state().should_compute:
                    skipped.add(name)
            elif isinstance(hook, TaylorSeerCacheHook):
                state = hook.state_manager.get_state()
                if state.last_update_step != state.current_step:  # predicted, not computed, this step
                    skipped.add(name)
    return skipped


def run_streamed(pipe, step_cache: str | None) -> tuple[np.ndarray, list[set[str]], Any]:
    """One generation on the streamed pipe (slots emptied first): its final latents, the blocks the cache
    skipped per step, the streamer's counts."""
    streamer = get_block_streamer(pipe)
    streamer.invalidate()
    streamer.stats = type(streamer.stats)()
    per_step: list[set[str]] = []

    def on_step(_pipe, _i, _t, kw):
        per_step.append(skipped_blocks(pipe.transformer))
        return kw

    params = dataclasses.replace(PARAMS, step_cache=step_cache)
    latents = generate(pipe, embeddings(1), params, progress=False, callback_on_step_end=on_step, output_type="latent")
    assert not pipe.transformer.is_cache_enabled  # on for the call only
    return latents[0].float().numpy(), per_step, streamer.stats


def resident_latents(pipe, step_cache: str) -> np.ndarray:
    """diffusers' resident NF4 pipeline with the same cache, enabled the diffusers way, in a cache context (the
    final latents: the VAE decode is the same code on both sides, and the slowest part on the CPU)."""
    pipe.transformer.enable_cache(step_cache_config(step_cache, PARAMS.num_inference_steps))
    try:
        with pipe.transformer.cache_context("cond"):
            latents = pipe(
                prompt_embeds=embeddings(1),
                height=PARAMS.height,
                width=PARAMS.width,
                num_inference_steps=PARAMS.num_inference_steps,
                guidance_scale=PARAMS.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(PARAMS.seed),
                output_type="latent",
            ).images[0]
    finally:
        pipe.transformer.disable_cache()
    return latents.float().numpy()


@pytest.fixture(scope="module")
def no_cache(parts_pipe):
    return run_streamed(parts_pipe, None)


@pytest.mark.parametrize("step_cache", ["mag", "taylorseer"])
def test_a_step_cache_skips_copies_and_keeps_streamed_equal_to_resident(
    parts_pipe, resident_nf4_pipe, no_cache, step_cache
):
    plain, none_skipped, baseline = no_cache
    latents, skipped, stats = run_streamed(parts_pipe, step_cache)
    np.testing.assert_array_equal(latents, resident_latents(resident_nf4_pipe, step_cache))
    assert not np.array_equal(latents, plain)  # the cache changed the computation

    streamer = get_block_streamer(parts_pipe)
    skipped_units = [sum(1 for blocks in streamer.unit_blocks if blocks <= step) for step in skipped]
    assert none_skipped == [set()] * PARAMS.num_inference_steps
    assert baseline.copies_per_forward() == [streamer.num_units] * PARAMS.num_inference_steps
    assert sum(skipped_units) > 0
    # Per step, the copies drop by exactly the streamed parts the cache skipped.
    assert stats.copies_per_forward() == [
        n - k for n, k in zip(baseline.copies_per_forward(), skipped_units, strict=True)
    ]
    for forward in range(PARAMS.num_inference_steps):
        copied = {u for f, u in stats.copied if f == forward}
        ran = {u for f, u in stats.ran if f == forward}
        assert copied <= ran  # nothing copied for a step that did not run it


def test_prefetch_past_the_first_block_waits_for_its_cache_decision(tiny):
    """A first-block cache runs block 0 every step and decides after it whether the others run: the streamer
    copies no later part before that decision. Driven by hand with the cache's `SkipSchedule` (diffusers 0.42.1
    cannot run the cache itself on FLUX.2), every part streamed through two slots."""
    model = load_nf4_transformer(str(tiny.nf4_repo), device="cpu")
    streamer = apply_block_streaming(model, part_plan(model, set()), "cpu")
    head = SkipSchedule(frozenset({"transformer_blocks.0"}))
    assert [u for u, blocks in enumerate(streamer.unit_blocks) if blocks <= head.always_run] == [0, 1, 2]

    def forward(schedule, units):
        streamer.begin_forward(schedule)
        for u in units:
            streamer.before(u)
            streamer.after(u)

    forward(head, range(8))  # computed step
    forward(head, range(3))  # skipped step: block 0's three parts only
    forward(head, range(8))
    # Skipped step: only block 0's parts were copied (the five others were not); the step after it finds
    # one of them (ff, unit 1) still in its slot.
    assert streamer.stats.copies_per_forward() == [8, 3, 7]
    assert {u for f, u in streamer.stats.copied if f == 1} == {0, 1, 2}
    # Without the schedule the streamer would have prefetched a part of block 1 for the skipped step.
    streamer.invalidate()
    streamer.stats = type(streamer.stats)()
    forward(None, range(8))
    forward(None, range(3))
    assert {u for f, u in streamer.stats.copied if f == 1} == {0, 1, 2, 3}


def test_first_block_cache_is_refused_with_the_reason(tiny):
    model = load_nf4_transformer(str(tiny.nf4_repo), device="cpu")
    with pytest.raises(StepCacheUnsupported, match=r"first-block: .*Flux2SingleTransformerBlock.*diffusers#14280"):
        enable_step_cache(model, "first-block", 4)
    assert not model.is_cache_enabled
