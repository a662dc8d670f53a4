"""diffusers' FLUX.2 pipelines with the text encoder on another machine: `pipe(prompt=...)` just works.

`Flux2RemotePipeline` and `Flux2KleinRemotePipeline` are `Flux2Pipeline` and `Flux2KleinPipeline` with one
method replaced: `encode_prompt` sends the prompts to a remote encoder (an `EncoderPool`, so failover,
cache, deadlines, token and TLS apply) and hands the embeddings to diffusers' own `encode_prompt`, which
repeats them per image and builds `text_ids` exactly as for a local encoder. Everything else (`__call__`,
reference images, classifier-free guidance of Klein base models, LoRA, callbacks) is diffusers' code,
unchanged. Why a subclass and not a fake `text_encoder` component: docs/design.md, "Remote text encoder in
diffusers".

    pipe = Flux2RemotePipeline.from_pretrained("black-forest-labs/FLUX.2-dev", transformer=dit, encoder=pool)
    pipe = with_remote_text_encoder(Flux2Pipeline.from_pretrained(..., text_encoder=None, tokenizer=None), pool)
    image = pipe(prompt="a red fox in fresh snow").images[0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)

from .generation import PromptEncoder

if TYPE_CHECKING:
    _Pipeline = Any  # diffusers is untyped for mypy; the mixin's super() calls reach its pipelines
else:
    _Pipeline = object


class RemoteTextEncoderMixin(_Pipeline):
    """Replaces a FLUX.2 pipeline's `encode_prompt`: prompts are encoded by `self.encoder` (anything with
    `encode(prompts)` returning `.prompt_embeds` and `.fingerprint`, e.g. an `EncoderPool`), the rest is
    the pipeline's own `encode_prompt`. Put it before the diffusers pipeline class in the bases."""

    encoder: PromptEncoder | None

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        text_encoder_out_layers: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What diffusers' `encode_prompt` returns, `(prompt_embeds, text_ids)`, with the embeddings computed
        by the remote encoder. `max_sequence_length` and `text_encoder_out_layers` (None: the server's)
        must be what the server computes; its model fingerprint says which."""
        device = device or self._execution_device
        if prompt_embeds is None:
            remote = self._remote_prompt_embeds(
                "" if prompt is None else prompt, max_sequence_length, text_encoder_out_layers
            )
            prompt_embeds = remote.to(device)
        return super().encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            prompt_embeds=prompt_embeds,
            max_sequence_length=max_sequence_length,
        )

    def _remote_prompt_embeds(
        self, prompt: str | list[str], max_sequence_length: int, out_layers: Sequence[int] | None
    ) -> torch.Tensor:
        if self.encoder is None:
            raise ValueError(
                "encoder: this pipeline has no text encoder; pass encoder= (a 'host:port' or an EncoderPool) "
                "to load_pipeline / from_pretrained, or call it with prompt_embeds="
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt: at least one prompt is needed")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompt[{i}]: expected a string, got {type(p).__name__}")
        # Each prompt is sent once (Klein's negative pass asks for "" once per prompt): the server's bytes
        # for a prompt do not depend on the rest of the batch (docs/design.md, invariant 4).
        unique = list(dict.fromkeys(prompts))
        encoded = self.encoder.encode(unique)
        _check_recipe(getattr(encoded, "fingerprint", None), max_sequence_length, out_layers)
        embeds = encoded.prompt_embeds
        if len(unique) < len(prompts):
            row = {p: i for i, p in enumerate(unique)}
            embeds = embeds[torch.tensor([row[p] for p in prompts])]
        return embeds


def _images_per_prompt(images: Any, num_prompts: int) -> tuple[list[Any], list[int]]:
    """diffusers' `upsample_prompt` images (None, one image per prompt, or per prompt a list) as the flat
    list and per-prompt counts the server takes."""
    if images is None or len(images) == 0 or images[0] is None:
        return [], []
    if hasattr(images[0], "size") and not isinstance(images[0], (list, tuple)):  # one PIL image per prompt
        groups = [[image] for image in images]
    else:
        groups = [list(group) for group in images]
    if len(groups) != num_prompts:
        raise ValueError(f"image: {len(groups)} image entries for {num_prompts} prompts (one per prompt)")
    return [image for group in groups for image in group], [len(group) for group in groups]


def _check_recipe(fingerprint: Any, max_sequence_length: int, out_layers: Sequence[int] | None) -> None:
    """The remote encoder computes one recipe; options asking for another are refused by name."""
    served_length = int(getattr(fingerprint, "max_length", 0) or 0)
    if served_length and max_sequence_length != served_length:
        raise ValueError(
            f"max_sequence_length: the remote encoder pads and truncates every prompt to {served_length} "
            f"tokens, got {max_sequence_length}; leave it at its default"
        )
    served_layers = tuple(getattr(fingerprint, "hidden_layers", ()) or ())
    if out_layers is not None and served_layers and tuple(out_layers) != served_layers:
        raise ValueError(
            f"text_encoder_out_layers: the remote encoder stacks hidden states {served_layers}, "
            f"got {tuple(out_layers)}; leave it at its default"
        )


def _text_components_are_remote(kwargs: dict[str, Any]) -> dict[str, Any]:
    # A remote pipeline never loads the local text encoder or tokenizer (diffusers neither downloads nor
    # loads a component passed as None).
    kwargs.setdefault("text_encoder", None)
    kwargs.setdefault("tokenizer", None)
    return kwargs


class Flux2RemotePipeline(RemoteTextEncoderMixin, Flux2Pipeline):
    """diffusers' `Flux2Pipeline` (FLUX.2-dev) whose prompts are encoded by a remote encoder.

    Args:
        encoder: an `EncoderPool` or `RemoteTextEncoder` (see `with_remote_text_encoder` and
            `flux2_client.load_pipeline(encoder=...)` for "host:port" strings). None: only
            `prompt_embeds=` calls work, and a prompt gets a ValueError saying so.
        text_encoder, tokenizer: unused; declared so diffusers' `components` and `from_pipe` work.

    `from_pretrained(repo, transformer=..., encoder=...)` loads the pipeline without the local text
    encoder and tokenizer. Caption upsampling (`caption_upsample_temperature`) runs on the encoder's server
    (its `Upsample` rpc; the server must run with upsampling on): `upsample_prompt` is diffusers' method
    with the model on the server, and `last_upsample` keeps what the last call rewrote (prompts, seed).
    """

    #: The server's answer to the last `upsample_prompt` (rewritten prompts, seed); None before any.
    last_upsample: Any = None

    _optional_components: ClassVar[list[str]] = ["text_encoder", "tokenizer"]

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLFlux2,
        transformer: Flux2Transformer2DModel,
        text_encoder: Any = None,
        tokenizer: Any = None,
        encoder: PromptEncoder | None = None,
    ):
        super().__init__(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
        self.encoder = encoder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        return super().from_pretrained(pretrained_model_name_or_path, **_text_components_are_remote(kwargs))

    def upsample_prompt(
        self,
        prompt: str | list[str],
        images: Any = None,
        temperature: float = 0.15,
        device: Any = None,
        *,
        seed: int | None = None,
        max_new_tokens: int = 0,
    ) -> list[str]:
        """diffusers' `upsample_prompt`, run by the remote encoder's server: the same arguments (`images`: one
        PIL image per prompt, or per prompt a list of them), the rewritten prompts back. `seed`: the
        sampling seed (None: the server draws one, kept in `last_upsample`); `max_new_tokens` 0: 512."""
        from .encoder import UpsampleOptions

        upsample = getattr(self.encoder, "upsample", None)
        if upsample is None:
            raise ValueError(
                "caption_upsample_temperature: this pipeline's encoder cannot upsample prompts; pass encoder= "
                "(a 'host:port' or an EncoderPool) of a server started with --upsampling"
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        files, counts = _images_per_prompt(images, len(prompts))
        options = UpsampleOptions(
            temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, images=files, images_per_prompt=counts
        )
        result = upsample(prompts, options)
        self.last_upsample = result
        return list(result.prompts)


class Flux2KleinRemotePipeline(RemoteTextEncoderMixin, Flux2KleinPipeline):
    """diffusers' `Flux2KleinPipeline` (FLUX.2 [klein]) whose prompts, and the "" negative prompt of base
    models with classifier-free guidance, are encoded by a remote encoder. Arguments as
    `Flux2RemotePipeline`, plus diffusers' `is_distilled`."""

    _optional_components: ClassVar[list[str]] = ["text_encoder", "tokenizer"]

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLFlux2,
        transformer: Flux2Transformer2DModel,
        text_encoder: Any = None,
        tokenizer: Any = None,
        is_distilled: bool = False,
        encoder: PromptEncoder | None = None,
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            is_distilled=is_distilled,
        )
        self.encoder = encoder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        return super().from_pretrained(pretrained_model_name_or_path, **_text_components_are_remote(kwargs))


def as_prompt_encoder(encoder: str | Sequence[str] | PromptEncoder, **pool_options: Any) -> PromptEncoder:
    """`encoder` as something with `encode(prompts)`: a target ("host:port" for gRPC, "http(s)://…/predict")
    or a list of them (failover) becomes an `EncoderPool(targets, **pool_options)`; an `EncoderPool`,
    `RemoteTextEncoder` or `HttpTextEncoder` is used as it is."""
    if isinstance(encoder, str) or (
        isinstance(encoder, Sequence) and encoder and all(isinstance(t, str) for t in encoder)
    ):
        from .endpoints import EncoderPool

        return EncoderPool([encoder] if isinstance(encoder, str) else list(encoder), **pool_options)
    if isinstance(encoder, PromptEncoder):
        return encoder
    raise ValueError(f"encoder: expected 'host:port', a list of them, or an EncoderPool, got {type(encoder).__name__}")


def served_embedding_dim(encoder: PromptEncoder) -> int | None:
    """The embedding width `encoder` serves, from its `info()` when it has one (None when unknown)."""
    info = getattr(encoder, "info", None)
    dim = getattr(info(), "embedding_dim", None) if callable(info) else None
    return int(dim) if dim else None


def with_remote_text_encoder(pipe: Any, encoder: str | Sequence[str] | PromptEncoder) -> Any:
    """A `Flux2RemotePipeline` / `Flux2KleinRemotePipeline` sharing `pipe`'s scheduler, VAE and transformer
    (with any memory plan or offloading hooks on them), prompts encoded by `encoder`. `pipe`'s own text
    encoder and tokenizer, if any, are not carried over. This is diffusers' `Pipeline(**pipe.components)`
    idiom; unlike `from_pipe` it casts nothing (from_pipe moves every component to float32 by default)."""
    if not isinstance(pipe, (Flux2Pipeline, Flux2KleinPipeline)):
        raise ValueError(f"pipe: expected a Flux2Pipeline or a Flux2KleinPipeline, got {type(pipe).__name__}")
    components = {k: v for k, v in pipe.components.items() if k not in ("text_encoder", "tokenizer")}
    if isinstance(pipe, Flux2KleinPipeline):
        new: Any = Flux2KleinRemotePipeline(
            **components, is_distilled=pipe.config.is_distilled, encoder=as_prompt_encoder(encoder)
        )
    else:
        new = Flux2RemotePipeline(**components, encoder=as_prompt_encoder(encoder))
    name_or_path = pipe.config.get("_name_or_path")
    if name_or_path:
        new.register_to_config(_name_or_path=name_or_path)
    return new


__all__ = [
    "Flux2KleinRemotePipeline",
    "Flux2RemotePipeline",
    "RemoteTextEncoderMixin",
    "as_prompt_encoder",
    "served_embedding_dim",
    "with_remote_text_encoder",
]
