"""Local generation: the NF4 DiT and the VAE only, embeddings from a remote encoder.

`load_pipeline` hands back a ready diffusers `Flux2Pipeline` (no text encoder, no tokenizer) with the
DiT group-offloaded; call it with `prompt_embeds=` as you would any diffusers pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._quantization import load_nf4_transformer


@dataclass(frozen=True)
class GenerationParams:
    height: int = 1024
    width: int = 1024
    num_inference_steps: int = 50
    guidance_scale: float = 4.0
    seed: int = 0


def _move_quant_state(model: torch.nn.Module, device: torch.device) -> None:
    # bitsandbytes keeps NF4 scales in a QuantState beside each weight. Group offloading moves
    # parameters, not that state, so it must already be on the execution device or the first forward
    # reads host memory from a kernel (illegal memory access on CUDA).
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            state.to(device)


def load_pipeline(
    model: str = "black-forest-labs/FLUX.2-dev",
    *,
    dit: str | None = None,
    device: str | torch.device | None = None,
    offload: str = "leaf_level",
    revision: str | None = None,
):
    """A `Flux2Pipeline` with the NF4 DiT and the VAE, no text encoder.

    Args:
        model: repo id or folder with `vae/` and `scheduler/` (and `transformer/` if `dit` is unset).
        dit: repo id or folder whose `transformer/` holds the DiT, pre-quantized NF4 (like
            diffusers/FLUX.2-dev-bnb-4bit) or bf16 (then quantized to NF4 while loading).
        device: execution device; default cuda if available, else cpu.
        offload: "leaf_level" (diffusers group offloading, weights stream from host memory) or "none".
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    if offload not in ("leaf_level", "none"):
        raise ValueError(f"offload: expected 'leaf_level' or 'none', got {offload!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    transformer = load_nf4_transformer(dit or model, device=device, revision=None if dit else revision)
    vae = AutoencoderKLFlux2.from_pretrained(model, subfolder="vae", dtype=torch.bfloat16, revision=revision)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler", revision=revision)
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.vae.to(device)
    if offload == "leaf_level":
        _move_quant_state(transformer, device)
        transformer.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=device.type == "cuda",
        )
    return pipe


def generate(pipe: Any, prompt_embeds: torch.Tensor, params: GenerationParams, **kwargs: Any) -> list[Any]:
    """Run the pipeline on received embeddings; returns PIL images. The noise comes from a CPU generator
    seeded with `params.seed`, so an image does not depend on which GPU drew it."""
    generator = torch.Generator("cpu").manual_seed(params.seed)
    device = pipe._execution_device
    result = pipe(
        prompt_embeds=prompt_embeds.to(device),
        height=params.height,
        width=params.width,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        generator=generator,
        **kwargs,
    )
    return list(result.images)


def save_png(image: Any, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write `image` with its generation parameters as PNG text chunks (one per key, plus `flux2_split`
    holding all of them as JSON)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    info.add_text("flux2_split", json.dumps(metadata, sort_keys=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path
