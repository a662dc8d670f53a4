"""Which FLUX.2 model a folder or repo holds (FLUX.2-dev or FLUX.2 [klein]) and how to build its pipeline.

Everything here reads JSON only (`model_index.json`, `transformer/config.json`): the family and the
embedding width are known before a single weight is loaded, so a mismatched pair (Klein embeddings into
the FLUX.2-dev DiT, or the reverse) fails at once with both widths named instead of deep inside the first
denoising step after minutes of loading.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEV_PIPELINE = "Flux2Pipeline"
KLEIN_PIPELINE = "Flux2KleinPipeline"

#: The pre-quantized DiT the CLI pairs with FLUX.2-dev when no --dit is given.
DEV_REPO = "black-forest-labs/FLUX.2-dev"
DEV_NF4_REPO = "diffusers/FLUX.2-dev-bnb-4bit"

# Flux2Transformer2DModel's default joint_attention_dim (FLUX.2-dev's: 3 x Mistral Small 3.1's 5120).
_DEFAULT_JOINT_ATTENTION_DIM = 15360


class EmbeddingWidthError(ValueError):
    """The encoder's embeddings do not fit the DiT's context embedder; the message names both widths."""


@dataclass(frozen=True)
class PipelineFamily:
    """One FLUX.2 pipeline layout, as `model_index.json` declares it."""

    name: str  # "flux2" (FLUX.2-dev) or "klein"
    pipeline_class: str  # diffusers class: Flux2Pipeline or Flux2KleinPipeline
    #: Klein only: step-distilled (guidance ignored) or base (real classifier-free guidance).
    is_distilled: bool = False

    @property
    def is_klein(self) -> bool:
        return self.pipeline_class == KLEIN_PIPELINE

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether the pipeline runs a second, negative-prompt DiT pass per step (diffusers'
        `Flux2KleinPipeline.do_classifier_free_guidance`); FLUX.2-dev's guidance is embedded instead."""
        return self.is_klein and not self.is_distilled and guidance_scale > 1

    def negative_prompts(self, prompts: Sequence[str], guidance_scale: float, negative_prompt: str = "") -> list[str]:
        """The prompts whose embeddings the negative pass needs (one per prompt), or none. Klein's pipeline
        uses "" as its negative prompt."""
        return [negative_prompt] * len(prompts) if self.uses_cfg(guidance_scale) else []


FLUX2_DEV = PipelineFamily("flux2", DEV_PIPELINE)


def read_repo_json(repo: str, filename: str, revision: str | None = None) -> dict[str, Any] | None:
    """A JSON file of a local folder or hub repo, or None where it has none. Downloads that one file only."""
    local = Path(repo)
    if local.is_dir():
        path = local / filename
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(repo, filename, revision=revision)).read_text())
    except LocalEntryNotFoundError:
        raise  # offline and not cached: says nothing about the repo, so no guessing
    except EntryNotFoundError:
        return None


def detect_family(
    model: str, revision: str | None = None, dit: str | None = None, dit_revision: str | None = None
) -> PipelineFamily:
    """The family of a pipeline folder/repo from its `model_index.json` (`_class_name`, `is_distilled`).

    A folder without one (e.g. only `vae/` and `scheduler/` beside a separate `dit`) is told by its DiT's
    `transformer/config.json` (at `dit_revision`): Klein's DiT has no guidance embedder. With neither,
    FLUX.2-dev.
    """
    index = read_repo_json(model, "model_index.json", revision)
    if index is not None:
        cls = index.get("_class_name")
        if cls == KLEIN_PIPELINE:
            return PipelineFamily("klein", KLEIN_PIPELINE, is_distilled=bool(index.get("is_distilled", False)))
        if cls == DEV_PIPELINE:
            return FLUX2_DEV
        raise ValueError(f"model: {model} holds a {cls}; expected a {DEV_PIPELINE} or a {KLEIN_PIPELINE}")
    config = read_repo_json(model, "transformer/config.json", revision)
    if config is None and dit is not None:
        config = read_repo_json(dit, "transformer/config.json", dit_revision)
    if config is None or config.get("guidance_embeds", True):
        return FLUX2_DEV
    # Nothing says whether this Klein DiT is step-distilled: diffusers' default (base, real CFG).
    return PipelineFamily("klein", KLEIN_PIPELINE, is_distilled=False)


def default_dit(model: str) -> str:
    """The DiT to load when none is named: FLUX.2-dev's pre-quantized NF4 repo for FLUX.2-dev, otherwise
    the model's own `transformer/` (quantized to NF4 while loading unless it already is)."""
    return DEV_NF4_REPO if model == DEV_REPO else model


def joint_attention_dim(dit: str, revision: str | None = None) -> int:
    """The embedding width a DiT's context embedder takes, from `transformer/config.json` alone."""
    config = read_repo_json(dit, "transformer/config.json", revision)
    if config is None:
        raise ValueError(f"dit: {dit} has no transformer/config.json")
    return int(config.get("joint_attention_dim", _DEFAULT_JOINT_ATTENTION_DIM))


def check_embedding_width(embedding_dim: int, dit: str, *, revision: str | None = None, encoder: str = "") -> None:
    """Raise `EmbeddingWidthError` unless embeddings `embedding_dim` wide fit the DiT in `dit`. Reads the
    DiT's config only, so it runs before any weight is loaded."""
    expected = joint_attention_dim(dit, revision)
    if embedding_dim != expected:
        source = f" ({encoder})" if encoder else ""
        raise EmbeddingWidthError(
            f"the encoder{source} sends embeddings {embedding_dim} wide but the DiT in {dit} takes "
            f"joint_attention_dim {expected}: FLUX.2-dev's DiT needs FLUX.2-dev's Mistral encoder (15360) and a "
            "FLUX.2 [klein] DiT the Qwen3 encoder of the same Klein model (3 x its hidden size)"
        )


def choose_served_model(info: Any, joint_attention_dim: int, dit: str = "") -> str | None:
    """Which model of a server to encode with for a DiT taking `joint_attention_dim`-wide embeddings, from
    the server's `EncoderInfo`: None when the model `info` describes fits or the server hosts one model
    (`check_embedding_width` then decides), else the name of the first hosted model that fits. Raises
    `EmbeddingWidthError` naming every hosted model's width when none fits."""
    if info.embedding_dim == joint_attention_dim or len(info.models) <= 1:
        return None
    for served in info.models:
        if served.embedding_dim == joint_attention_dim:
            return str(served.name)
    hosted = ", ".join(f"{m.name} ({m.embedding_dim})" for m in info.models)
    where = f"the DiT in {dit}" if dit else "the DiT"
    raise EmbeddingWidthError(
        f"the encoder server hosts {hosted} but {where} takes joint_attention_dim {joint_attention_dim}: host the "
        "encoder of that DiT's model on the server (FLUX.2-dev: Mistral, 15360; FLUX.2 [klein]: its Qwen3, 3 x hidden)"
    )


def encoder_for_dit(encoder: Any, dit: str, *, revision: str | None = None) -> tuple[Any, bool]:
    """`encoder`, or a pool over the same servers for the hosted model whose width fits the DiT in `dit`.

    Only an encoder not pinned to a model that can make such a pool (`EncoderPool`: `model` None,
    `for_model`) is switched; the width is then read from the DiT's config and the servers' `info()` before
    anything is loaded. Returns (encoder, owned): `owned` is True when a new pool was made, which the caller
    closes."""
    if getattr(encoder, "model", "") is not None or not callable(getattr(encoder, "for_model", None)):
        return encoder, False
    chosen = choose_served_model(encoder.info(), joint_attention_dim(dit, revision), dit)
    if chosen is None:
        return encoder, False
    return encoder.for_model(chosen), True


def build_pipeline(family: PipelineFamily, *, scheduler: Any, vae: Any, transformer: Any, encoder: Any = None) -> Any:
    """The family's diffusers pipeline without a local text encoder: a `Flux2RemotePipeline` or a
    `Flux2KleinRemotePipeline` (subclasses of `family.pipeline_class`) whose prompts go to `encoder`
    (None: `prompt_embeds=` only)."""
    from .remote_pipeline import Flux2KleinRemotePipeline, Flux2RemotePipeline

    components = {"scheduler": scheduler, "vae": vae, "transformer": transformer, "encoder": encoder}
    if family.is_klein:
        return Flux2KleinRemotePipeline(**components, is_distilled=family.is_distilled)
    return Flux2RemotePipeline(**components)


__all__ = [
    "FLUX2_DEV",
    "EmbeddingWidthError",
    "PipelineFamily",
    "build_pipeline",
    "check_embedding_width",
    "choose_served_model",
    "default_dit",
    "detect_family",
    "encoder_for_dit",
    "joint_attention_dim",
    "read_repo_json",
]
