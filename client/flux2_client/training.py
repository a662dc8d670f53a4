"""Prompt embeddings for training loops, from encoder servers.

`compute_remote_text_embeddings(prompts, encoder)` returns `(prompt_embeds, text_ids)` the way the
function of that name in diffusers' `examples/dreambooth/train_dreambooth_lora_flux2.py` does: the bf16
embeddings (B, 512, D) of a prompt or a list of prompts, and `Flux2Pipeline._prepare_text_ids` of them,
both on `device`.

`open_encoder(targets)` gives an `EncoderPool` over any mix of gRPC targets (`host:port`,
`dns:///name:port`) and HTTP `/predict` URLs, so a training run gets failover, TLS and retries; any other
`Encoder` (one `RemoteTextEncoder` or `HttpTextEncoder`) works too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .encoder import Encoder, prompt_list
from .endpoints import EncoderPool, RetryPolicy, using_encoder

if TYPE_CHECKING:
    import torch

    from .cache import EmbeddingCache

__all__ = ["compute_remote_text_embeddings", "open_encoder", "text_ids_for"]


def open_encoder(
    targets: str | Sequence[str],
    *,
    model: str | None = None,
    token: str | None = None,
    timeout: float = 120.0,
    expected_fingerprint: str | None = None,
    retry: RetryPolicy | None = None,
    cache: EmbeddingCache | None = None,
    **client_options: Any,
) -> EncoderPool:
    """An `EncoderPool` over `targets` (one or several; `http(s)://…/predict` or gRPC targets), encoding with
    the served model `model` on servers hosting several (e.g. "klein-4b"; None: the servers' default)."""
    return EncoderPool(
        targets,
        model=model,
        token=token,
        timeout=timeout,
        expected_fingerprint=expected_fingerprint,
        retry=retry,
        cache=cache,
        **client_options,
    )


def text_ids_for(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """FLUX.2's text position ids, which depend only on the embedding shape (diffusers' own function)."""
    from diffusers import Flux2Pipeline

    return Flux2Pipeline._prepare_text_ids(prompt_embeds)


def compute_remote_text_embeddings(
    prompts: str | Sequence[str],
    encoder: Encoder | str | Sequence[str],
    *,
    device: str | torch.device | None = None,
    request_prompts: int = 16,
    timeout: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(prompt_embeds, text_ids)` for a prompt or a list of prompts, as the diffusers FLUX.2 training
    script's `compute_remote_text_embeddings` returns them. Lists go out `request_prompts` per request
    (the script sends one prompt per request; the server batches either way).

    `encoder`: an `Encoder` (an `EncoderPool` from `open_encoder`, kept open across calls), or target(s)
    to open a pool over for this call only. `timeout`: seconds per request, retries included."""
    import torch

    prompts = prompt_list(prompts)
    if not prompts:
        raise ValueError("prompts: at least one prompt is required")
    if request_prompts < 1:
        raise ValueError(f"request_prompts must be at least 1, got {request_prompts}")
    with using_encoder(encoder) as enc:
        parts = [
            enc.encode(prompts[i : i + request_prompts], timeout=timeout).prompt_embeds
            for i in range(0, len(prompts), request_prompts)
        ]
    prompt_embeds = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    text_ids = text_ids_for(prompt_embeds)
    if device is not None:
        prompt_embeds, text_ids = prompt_embeds.to(device), text_ids.to(device)
    return prompt_embeds, text_ids
