"""LoRAs on the planner's streamed path on a CUDA device (skipped without one): the adapters sit in the
streamer's resident device buffer, the images are those of the same NF4 DiT held whole on the card with the
same LoRA, and an adapter added after streaming is set up still runs on the card.

    python -m pytest -m gpu tests/gpu -q        # FLUX2_GPU_REPORT_DIR=dir keeps the figures as JSON
"""

from __future__ import annotations

import numpy as np
import torch
from _gpu_report import needs_cuda, write_gpu_report
from flux2_client.generation import GenerationParams, generate, load_pipeline
from flux2_client.lora import load_loras
from flux2_client.offload import apply_block_streaming, remove_memory_plan, spec_from_module
from flux2_client.planner import (
    DEFAULT_CUDA_OVERHEAD,
    Budget,
    Workload,
    _group_units,
    activation_bytes,
    plan_memory,
    vae_decode_bytes,
)
from test_lora import TRAINER_TARGETS, random_lora, train_lora_like_the_trainer

pytestmark = needs_cuda("adapters on the card beside streamed NF4 blocks (run on an H100/H200)")


def same(want: list[np.ndarray], got: list[np.ndarray]) -> bool:
    return len(want) == len(got) and all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))


def test_streamed_loras_on_cuda_identical_to_resident(tiny, tmp_path, request):
    """Two LoRAs (the trainer's format, and a rank-8 one on the single blocks and feed-forwards), scales
    0.8 and 0.5: resident NF4 on the card vs a plan that streams parts through two slots; then switching
    to one adapter, then adding one with `add_adapter` after streaming is set up."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from flux2_client._quantization import load_nf4_transformer
    from peft import LoraConfig

    trainer = train_lora_like_the_trainer(tiny, tmp_path / "trainer")
    wide = random_lora(tiny, tmp_path / "wide", ["to_qkv_mlp_proj", "linear_in", "linear_out"], 8, 16, seed=1)
    loras = [(trainer, 0.8), (wide, 0.5)]
    embeds = torch.randn(2, 512, 192, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    params = GenerationParams(64, 64, 3, 4.0, seed=1)
    workload = Workload(64, 64, batch=2)

    def images(pipe, adapters: dict[str, float]) -> list[np.ndarray]:
        pipe.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
        return [np.asarray(im) for im in generate(pipe, embeds, params, progress=False)]

    resident = load_pipeline(str(tiny.pipeline), dit=str(tiny.nf4_repo), device="cuda", offload="none", loras=loras)
    expected_both = images(resident, {"lora_0": 0.8, "lora_1": 0.5})
    expected_wide = images(resident, {"lora_1": 1.0})
    del resident
    torch.cuda.empty_cache()

    transformer = load_nf4_transformer(str(tiny.nf4_repo), device="cpu")
    vae = AutoencoderKLFlux2.from_pretrained(str(tiny.pipeline), subfolder="vae", dtype=torch.bfloat16).to("cuda")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tiny.pipeline), subfolder="scheduler")
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    load_loras(pipe, loras)
    spec = spec_from_module(transformer, vae)
    work = max(activation_bytes(spec, workload), vae_decode_bytes(spec, workload, tiled=False))
    block = max(n for _, n in _group_units(spec, "block"))
    fixed = spec.other_bytes + spec.adapter_bytes + spec.vae_bytes
    plan = plan_memory(spec, workload, Budget(vram=DEFAULT_CUDA_OVERHEAD + int((fixed + work + 2.5 * block) / 0.94)))
    streamer = apply_block_streaming(transformer, plan, torch.device("cuda", 0))
    lora_params = [p for n, p in transformer.named_parameters() if ".lora_" in n]
    lo = streamer.resident_buffer.data_ptr()
    in_resident = all(lo <= p.data_ptr() < lo + streamer.resident_buffer.numel() for p in lora_params)
    same_both = same(expected_both, images(pipe, {"lora_0": 0.8, "lora_1": 0.5}))
    same_wide = same(expected_wide, images(pipe, {"lora_1": 1.0}))
    # An adapter added the peft way after streaming is set up: peft puts it on its base layer's device (the
    # card, where the slots are), so the forward runs; the plan did not count it.
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TRAINER_TARGETS), adapter_name="late")
    late_on_card = all(p.is_cuda for n, p in transformer.named_parameters() if ".late." in n)
    late_ran = len(images(pipe, {"late": 1.0})) == 2
    figures = {
        "plan_mode": plan.mode,
        "adapter_bytes": plan.spec_adapter_bytes,
        "lora_params_in_resident_buffer": in_resident,
        "two_loras_identical_to_resident": same_both,
        "switched_lora_identical_to_resident": same_wide,
        "late_adapter_on_card": late_on_card,
        "late_adapter_ran": late_ran,
        "copies": streamer.stats.copies,
    }
    write_gpu_report(request, figures)
    remove_memory_plan(pipe)
    assert plan.mode == "stream" and streamer.num_units > 0 and plan.spec_adapter_bytes > 0
    assert in_resident and lora_params
    assert same_both and same_wide
    assert late_on_card and late_ran


def test_leaf_level_with_loras_runs_on_cuda(tiny, tmp_path):
    """diffusers' trap: `add_adapter` after group offloading leaves the adapter on the CPU (the first forward
    fails, mat2 on cpu). `load_pipeline(offload="leaf_level", loras=...)` loads the LoRA before offloading."""
    trainer = train_lora_like_the_trainer(tiny, tmp_path / "trainer")
    embeds = torch.randn(1, 512, 192, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    params = GenerationParams(64, 64, 2, 4.0, seed=1)
    resident = load_pipeline(
        str(tiny.pipeline), dit=str(tiny.nf4_repo), device="cuda", offload="none", loras=[(trainer, 1.0)]
    )
    want = np.asarray(generate(resident, embeds, params, progress=False)[0])
    del resident
    pipe = load_pipeline(
        str(tiny.pipeline), dit=str(tiny.nf4_repo), device="cuda", offload="leaf_level", loras=[(trainer, 1.0)]
    )
    np.testing.assert_array_equal(np.asarray(generate(pipe, embeds, params, progress=False)[0]), want)
