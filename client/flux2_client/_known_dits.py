"""The shapes of the DiTs the client knows by name, so `flux2-client generate --plan-only` plans them
with no network and no Hugging Face cache.

Only the `transformer/config.json` fields the planner reads (`planner.spec_from_config`). FLUX.2-dev's
are diffusers' `Flux2Transformer2DModel` defaults (tests/test_cli.py checks them against diffusers);
the FLUX.2 [klein] ones are those of docs/design.md#model-shapes-and-sizes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

FLUX2_DEV_DIT: Mapping[str, Any] = MappingProxyType(
    {
        "in_channels": 128,
        "num_layers": 8,
        "num_single_layers": 48,
        "attention_head_dim": 128,
        "num_attention_heads": 48,
        "joint_attention_dim": 15360,
        "timestep_guidance_channels": 256,
        "mlp_ratio": 3.0,
        "guidance_embeds": True,
    }
)
# Klein DiTs have no guidance embedder; their text width is 3 x the Qwen3 hidden size (2560 / 4096).
KLEIN_4B_DIT: Mapping[str, Any] = MappingProxyType(
    {
        **FLUX2_DEV_DIT,
        "num_layers": 5,
        "num_single_layers": 20,
        "num_attention_heads": 24,
        "joint_attention_dim": 7680,
        "guidance_embeds": False,
    }
)
KLEIN_9B_DIT: Mapping[str, Any] = MappingProxyType(
    {
        **FLUX2_DEV_DIT,
        "num_layers": 8,
        "num_single_layers": 24,
        "num_attention_heads": 32,
        "joint_attention_dim": 12288,
        "guidance_embeds": False,
    }
)


@dataclass(frozen=True)
class KnownDit:
    config: Mapping[str, Any]
    #: Its transformer/ is saved in NF4 already (else bf16, quantized to NF4 without double quantization on load).
    prequantized: bool
    double_quant: bool = False


KNOWN_DITS: Mapping[str, KnownDit] = MappingProxyType(
    {
        "black-forest-labs/FLUX.2-dev": KnownDit(FLUX2_DEV_DIT, prequantized=False),
        # Its quantization_config: nf4, bnb_4bit_use_double_quant false.
        "diffusers/FLUX.2-dev-bnb-4bit": KnownDit(FLUX2_DEV_DIT, prequantized=True),
        "black-forest-labs/FLUX.2-klein-4B": KnownDit(KLEIN_4B_DIT, prequantized=False),
        "black-forest-labs/FLUX.2-klein-base-4B": KnownDit(KLEIN_4B_DIT, prequantized=False),
        "black-forest-labs/FLUX.2-klein-9B": KnownDit(KLEIN_9B_DIT, prequantized=False),
        "black-forest-labs/FLUX.2-klein-base-9B": KnownDit(KLEIN_9B_DIT, prequantized=False),
    }
)


def known_dit(repo: str) -> KnownDit | None:
    """The built-in shapes of hub repo `repo`; None for other repos and for a local folder of that name
    (loading would read the folder, so the plan must too)."""
    if Path(repo).exists():
        return None
    return KNOWN_DITS.get(repo)
