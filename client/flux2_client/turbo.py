"""The FLUX.2-dev Turbo recipe: fal's distilled LoRA, 8 steps on the sigmas its model card publishes.

From the model card of `fal/FLUX.2-dev-Turbo` (huggingface.co/fal/FLUX.2-dev-Turbo, README "Usage"): load
`flux.2-turbo-lora.safetensors` into `Flux2Pipeline` with `load_lora_weights` and call the pipeline with
`sigmas=TURBO_SIGMAS` ("pre-shifted custom sigmas for 8-step turbo inference"), `num_inference_steps=8` and
`guidance_scale=2.5`. The sigmas go to the scheduler exactly as the card's call passes them, so the client's
schedule is the card's. FLUX.2-dev only: the LoRA is trained on its DiT.

    params = turbo_params(GenerationParams(seed=3))
    pipe = load_pipeline(loras=[TURBO_LORA], vram="8GB")
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .lora import LoraSpec

if TYPE_CHECKING:  # generation imports torch; the CLI reads the constants without it
    from .generation import GenerationParams

TURBO_REPO = "fal/FLUX.2-dev-Turbo"
TURBO_WEIGHT_NAME = "flux.2-turbo-lora.safetensors"
TURBO_LORA = LoraSpec(TURBO_REPO, 1.0, weight_name=TURBO_WEIGHT_NAME)
# The model card's TURBO_SIGMAS, verbatim.
TURBO_SIGMAS = (1.0, 0.6509, 0.4374, 0.2932, 0.1893, 0.1108, 0.0495, 0.00031)
TURBO_STEPS = len(TURBO_SIGMAS)
TURBO_GUIDANCE = 2.5

__all__ = ["TURBO_GUIDANCE", "TURBO_LORA", "TURBO_SIGMAS", "TURBO_STEPS", "turbo_params"]


def turbo_params(params: GenerationParams, guidance_scale: float = TURBO_GUIDANCE) -> GenerationParams:
    """`params` on the Turbo schedule: its 8 steps and sigmas, the card's guidance unless another is given."""
    return dataclasses.replace(
        params, num_inference_steps=TURBO_STEPS, sigmas=TURBO_SIGMAS, guidance_scale=guidance_scale
    )
