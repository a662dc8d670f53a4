"""Local generation: the NF4 DiT and the VAE only, embeddings from a remote encoder.

`load_pipeline` hands back a ready diffusers `Flux2Pipeline` (no text encoder, no tokenizer) whose DiT
fits the VRAM budget (see `planner` / `offload`); call it with `prompt_embeds=` (and `image=` for
reference images) as you would any diffusers pipeline, or use `generate`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ._images import load_reference_images
from ._quantization import load_nf4_transformer
from .lora import LoraSpec, ResolvedLora, load_loras, resolve_loras
from .planner import MAX_REFERENCE_IMAGES, OFFLOAD_CHOICES, Workload, parse_size

_log = logging.getLogger(__name__)


class PlannedOutOfMemoryError(torch.OutOfMemoryError):
    """The device ran out of memory while the pipeline ran; `memory_plan` is the plan it ran under (None
    without the planner), so the error can say what was tried."""

    def __init__(self, message: str, memory_plan: Any):
        super().__init__(message)
        self.memory_plan = memory_plan


class _Fingerprint(Protocol):
    weights_id: str
    digest: str


class _Encoded(Protocol):
    @property
    def prompt_embeds(self) -> torch.Tensor: ...
    @property
    def fingerprint(self) -> _Fingerprint: ...


@runtime_checkable
class PromptEncoder(Protocol):
    """What `generate_to_files` and the remote pipelines need from an encoder: an `EncoderPool` or a
    `RemoteTextEncoder`."""

    def encode(self, prompts: Sequence[str]) -> _Encoded: ...


@dataclass(frozen=True)
class GenerationParams:
    """What one generation computes. `sigmas`: a custom noise schedule of `num_inference_steps` values, passed to
    the pipeline's `sigmas=` (e.g. `turbo.TURBO_SIGMAS`); `step_cache`: one of `step_cache.CACHE_CHOICES`, on for
    the call only."""

    height: int = 1024
    width: int = 1024
    num_inference_steps: int = 50
    guidance_scale: float = 4.0
    seed: int = 0
    sigmas: tuple[float, ...] | None = None
    step_cache: str | None = None

    def check(self) -> None:
        from .step_cache import CACHE_CHOICES

        if self.sigmas is not None and len(self.sigmas) != self.num_inference_steps:
            raise ValueError(
                f"sigmas: {len(self.sigmas)} values for {self.num_inference_steps} steps (one per step is needed)"
            )
        if self.step_cache is not None and self.step_cache not in CACHE_CHOICES:
            raise ValueError(f"step_cache: expected one of {', '.join(CACHE_CHOICES)}, got {self.step_cache!r}")


def load_pipeline(
    model: str = "black-forest-labs/FLUX.2-dev",
    *,
    dit: str | None = None,
    device: str | torch.device | None = None,
    offload: str | None = None,
    vram: str | int | None = None,
    workload: Workload | None = None,
    num_slots: int = 2,
    revision: str | None = None,
    loras: Sequence[str | tuple[str, float] | LoraSpec | ResolvedLora] = (),
    verbose: bool = False,
    embedding_dim: int | None = None,
    encoder: str | Sequence[str] | PromptEncoder | None = None,
    dit_revision: str | None = None,
):
    """A ready diffusers pipeline with the NF4 DiT and the VAE; its text encoder is `encoder`, on another
    machine. Call it like any diffusers FLUX.2 pipeline: `pipe(prompt=...)` (with `image=` for reference
    images, `num_images_per_prompt=`...), or `pipe(prompt_embeds=...)`.

    Args:
        model: repo id or folder with `vae/` and `scheduler/` (and `transformer/` if `dit` is unset).
        dit: repo id or folder whose `transformer/` holds the DiT, pre-quantized NF4 (like
            diffusers/FLUX.2-dev-bnb-4bit) or bf16 (then quantized to NF4 while loading).
        device: execution device; default cuda if available, else cpu.
        offload: "plan" (default on CUDA: the memory planner decides resident vs streamed blocks for
            `vram`), "leaf_level" (diffusers' group offloading recipe) or "none" (all on the device;
            default on CPU).
        vram: budget for everything the process holds on the card, e.g. "8GB"; None = what is free now.
        workload: the largest call planned for (size, reference images, batch); default 1024x1024,
            no references, one image. A bigger call later is refused by `generate` with a clear error.
        num_slots: device slots streamed blocks rotate through (2 = double buffering).
        embedding_dim: width of the embeddings the pipeline will get (the encoder's); checked against the
            DiT's joint_attention_dim before anything is loaded (`families.EmbeddingWidthError`);
            default: the encoder's, asked from `encoder` when it has `info()`.
        loras: LoRAs as `(path_or_repo, scale)` (or `"PATH_OR_REPO[:SCALE]"`), loaded with diffusers'
            `load_lora_weights` as adapters `lora_0`, `lora_1`, ... and all active; the plan counts them and
            they stay resident while base blocks stream. Switch later with `pipe.set_adapters(...)`.
        encoder: where prompts are encoded: a target ("host:port", or "http(s)://…/predict") or a list of
            them (failover), or an `EncoderPool` (for tokens, TLS, cache, deadlines). None: `prompt_embeds=` only.
        revision: hub revision (branch, tag or commit) of `model`, and of the DiT when `dit` is unset.
        dit_revision: hub revision of `dit`.
        verbose: log the memory plan (INFO on the `flux2_client.generation` logger).

    The pipeline class follows `model`'s model_index.json: `Flux2RemotePipeline` (a `Flux2Pipeline`) for
    FLUX.2-dev, `Flux2KleinRemotePipeline` (a `Flux2KleinPipeline`) for FLUX.2 [klein]; see
    `remote_pipeline` and `families`.

    With `offload="plan"` the plan and its streamer sit in a named hook on `pipe.transformer`:
    `flux2_client.get_memory_plan(pipe)` returns the plan (printable with `.describe()`),
    `flux2_client.offload.get_block_streamer(pipe)` the streamer.
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

    from .families import build_pipeline, check_embedding_width, detect_family, encoder_for_dit

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if offload is None:
        offload = "plan" if device.type == "cuda" else "none"
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"offload: expected one of {', '.join(OFFLOAD_CHOICES)}, got {offload!r}")
    if offload == "plan" and vram is None and device.type != "cuda":
        raise ValueError("vram: offload='plan' on a CPU device needs an explicit budget (there is no free memory)")
    dit_rev = dit_revision if dit else revision
    family = detect_family(model, revision, dit=dit, dit_revision=dit_rev)
    if encoder is not None:
        from .remote_pipeline import as_prompt_encoder, served_embedding_dim

        prompt_encoder = as_prompt_encoder(encoder)
        if embedding_dim is None:
            # A pool not pinned to a model, on servers hosting several: the one that fits this DiT (the
            # pipeline keeps the new pool).
            prompt_encoder, _ = encoder_for_dit(prompt_encoder, dit or model, revision=dit_rev)
            embedding_dim = served_embedding_dim(prompt_encoder)  # a wrong encoder fails before any weight loads
        encoder = prompt_encoder
    if embedding_dim is not None:
        check_embedding_width(embedding_dim, dit or model, revision=dit_rev)
    # The planner and the leaf_level recipe both start from host memory; only "none" loads onto the device.
    load_device = device if offload == "none" else torch.device("cpu")
    transformer = load_nf4_transformer(dit or model, device=load_device, revision=dit_rev)
    vae = AutoencoderKLFlux2.from_pretrained(model, subfolder="vae", dtype=torch.bfloat16, revision=revision)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler", revision=revision)
    pipe = build_pipeline(family, scheduler=scheduler, vae=vae, transformer=transformer, encoder=encoder)
    # Before offloading is set up: the plan counts the adapters, and the streamer lays them out resident.
    load_loras(pipe, loras)
    if offload == "plan":
        from .offload import apply_memory_plan, plan_for

        budget = parse_size(vram) if vram is not None else None
        plan = plan_for(transformer, vae, workload or Workload(), device, vram=budget, num_slots=num_slots)
        if verbose:
            _log.info("%s", plan.describe())
        try:
            apply_memory_plan(pipe, plan, device)
        except torch.OutOfMemoryError as exc:
            raise PlannedOutOfMemoryError(str(exc), plan) from exc
    elif offload == "leaf_level":
        from .offload import apply_leaf_level_offloading

        pipe.vae.to(device)
        apply_leaf_level_offloading(transformer, device)
    else:
        pipe.vae.to(device)
    return pipe


def generate(
    pipe: Any,
    prompt_embeds: torch.Tensor,
    params: GenerationParams,
    *,
    images: Sequence[Any] | None = None,
    num_images_per_prompt: int = 1,
    progress: bool = True,
    negative_prompt_embeds: torch.Tensor | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run the pipeline on received embeddings; returns PIL images, prompt-major (all images of the first
    prompt, then the second's). `images` are reference images for multi-reference editing (up to 10).

    `negative_prompt_embeds` (one row per prompt) feed the negative pass of a pipeline with real
    classifier-free guidance (FLUX.2 [klein] base models; `families.PipelineFamily.negative_prompts`).

    Image k of a call draws its noise from its own CPU generator seeded with `params.seed + k`, so an
    image does not depend on which GPU drew it and can be reproduced alone from the seed in its PNG.
    Running out of device memory raises `PlannedOutOfMemoryError` (a `torch.OutOfMemoryError`) carrying
    the memory plan in use.

    `params.step_cache` turns that cache on for this call only (`step_cache`); a cache enabled on the
    transformer beforehand (`pipe.transformer.enable_cache(...)`) is used as it is. Either way the call runs
    inside `transformer.cache_context("cond")`, which Flux2Pipeline does not set itself.
    """
    params.check()
    refs = list(images or [])
    if len(refs) > MAX_REFERENCE_IMAGES:
        raise ValueError(f"images: at most {MAX_REFERENCE_IMAGES} reference images, got {len(refs)}")
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt: at least 1, got {num_images_per_prompt}")
    batch = prompt_embeds.shape[0] * num_images_per_prompt
    from .offload import get_memory_plan

    plan = get_memory_plan(pipe)
    if plan is not None:
        wanted = Workload(params.height, params.width, tuple(im.size for im in refs), batch)
        planned = plan.workload
        if wanted.tokens * wanted.batch > planned.tokens * planned.batch or (
            wanted.height * wanted.width * wanted.batch > planned.height * planned.width * planned.batch
        ):
            raise ValueError(
                f"this call ({wanted.width}x{wanted.height}, {len(refs)} reference image(s), batch {batch}) is "
                f"larger than the workload the memory plan was made for ({planned.width}x{planned.height}, "
                f"{len(planned.reference_sizes)} reference image(s), batch {planned.batch}); "
                "pass workload= to load_pipeline"
            )
    generators = [torch.Generator("cpu").manual_seed(params.seed + k) for k in range(batch)]
    pipe.set_progress_bar_config(disable=not progress)
    device = pipe._execution_device
    if negative_prompt_embeds is not None:
        kwargs["negative_prompt_embeds"] = negative_prompt_embeds.to(device)
    if params.sigmas is not None:
        kwargs["sigmas"] = list(params.sigmas)
    try:
        with _step_cache(pipe.transformer, params):
            result = pipe(
                prompt_embeds=prompt_embeds.to(device),
                image=refs or None,
                height=params.height,
                width=params.width,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                num_images_per_prompt=num_images_per_prompt,
                generator=generators if batch > 1 else generators[0],
                **kwargs,
            )
    except torch.OutOfMemoryError as exc:
        raise PlannedOutOfMemoryError(str(exc), plan) from exc
    return list(result.images)


@contextlib.contextmanager
def _step_cache(transformer: Any, params: GenerationParams) -> Any:
    """`params.step_cache` on `transformer` for the call, and the cache context its hooks read."""
    from .step_cache import disable_step_cache, enable_step_cache

    if params.step_cache is not None:
        if transformer.is_cache_enabled:
            raise ValueError("step_cache: the transformer already has a cache enabled; disable_cache() it first")
        enable_step_cache(transformer, params.step_cache, params.num_inference_steps)
    try:
        if transformer.is_cache_enabled:
            with transformer.cache_context("cond"):
                yield
        else:
            yield
    finally:
        if params.step_cache is not None:
            disable_step_cache(transformer)


def save_png(image: Any, path: str | Path, metadata: dict[str, Any], parameters: str | None = None) -> Path:
    """Write `image` with `metadata` as JSON in the `flux2_split` text chunk and, when given, `parameters`
    (the A1111 infotext that Forge and Civitai read; `png_metadata.infotext`) in the `parameters` chunk.
    No `prompt` chunk: ComfyUI reads that name as its workflow."""
    from .png_metadata import png_info

    info = png_info(metadata, parameters)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path


def describe_recipe(loras: Sequence[ResolvedLora], params: GenerationParams, turbo: bool = False) -> str:
    """What a generation adds to the base model, printed beside the memory plan: every LoRA (file, sha256 prefix,
    scale), the step cache and turbo; "" when nothing."""
    lines = [f"  LoRA            {lora.describe()}" for lora in loras]
    if turbo:
        from .turbo import TURBO_REPO

        lines.append(
            f"  turbo           {TURBO_REPO}: {params.num_inference_steps} steps on its sigmas, "
            f"guidance {params.guidance_scale:g}"
        )
    elif params.sigmas is not None:
        lines.append(f"  sigmas          {', '.join(f'{s:g}' for s in params.sigmas)}")
    if params.step_cache is not None:
        lines.append(f"  step cache      {params.step_cache}")
    return "\n".join(["generation", *lines]) if lines else ""


def recipe_metadata(loras: Sequence[ResolvedLora], params: GenerationParams, turbo: bool = False) -> dict[str, Any]:
    """PNG metadata keys for the LoRAs, custom sigmas, step cache and turbo (only those used)."""
    meta: dict[str, Any] = {}
    if loras:
        meta["loras"] = json.dumps([lora.as_dict() for lora in loras])
    if params.sigmas is not None:
        meta["sigmas"] = json.dumps(list(params.sigmas))
    if params.step_cache is not None:
        meta["step_cache"] = params.step_cache
    if turbo:
        from .turbo import TURBO_REPO

        meta["turbo"] = TURBO_REPO
    return meta


def output_paths(out: str | Path, num_prompts: int, num_images_per_prompt: int) -> list[Path]:
    """Where the images of one call go, prompt-major: `out` itself for a single image, else
    `<stem>_<prompt>` (one image per prompt) or `<stem>_<prompt>_<n>`."""
    out = Path(out)
    n = num_images_per_prompt
    if num_prompts * n == 1:
        return [out]
    if n == 1:
        return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(num_prompts)]
    return [out.with_name(f"{out.stem}_{i}_{j}{out.suffix}") for i in range(num_prompts) for j in range(n)]


def generate_to_files(
    encoder: PromptEncoder,
    prompts: str | Sequence[str],
    out: str | Path,
    params: GenerationParams | None = None,
    *,
    model: str = "black-forest-labs/FLUX.2-dev",
    dit: str | None = None,
    images: Sequence[str | Path] = (),
    num_images_per_prompt: int = 1,
    device: str | torch.device | None = None,
    offload: str | None = None,
    vram: str | int | None = None,
    progress: bool = True,
    verbose: bool = False,
    negative_prompt: str = "",
    revision: str | None = None,
    dit_revision: str | None = None,
    loras: Sequence[str | tuple[str, float] | LoraSpec] = (),
    turbo: bool = False,
    upsample_temperature: float | None = None,
) -> list[Path]:
    """Prompts in, PNG files out: what `flux2-client generate` and the demo run.

    Encodes `prompts` on `encoder` (first, so an encoder problem shows before any model loads; an
    `EncoderPool` not pinned to a model encodes with the served model whose width fits the DiT), loads the
    pipeline for this call's workload (`load_pipeline` with `model`, `dit`, `device`, `offload`, `vram`),
    generates (image k seeded with `params.seed + k`) and writes one PNG per image, named by
    `output_paths`, carrying prompt, seed, steps, guidance, size, reference image names, the encoder's
    model and fingerprint, the model and the DiT as JSON, and the A1111 `parameters` text that Forge and
    Civitai read (`save_png`, `png_metadata`). Returns the paths in prompt-major order.
    FLUX.2 [klein] base models also get `negative_prompt` (default "") encoded on `encoder` for real
    classifier-free guidance (`families.PipelineFamily.negative_prompts`). `revision` / `dit_revision` pin
    the hub revisions of `model` / `dit`. `verbose` logs progress at INFO on `flux2_client` loggers.

    `loras` (`PATH_OR_REPO[:SCALE]`, `(source, scale)` or `LoraSpec`) are loaded into the DiT; `turbo` adds the
    FLUX.2-dev Turbo LoRA and runs its 8 steps on its sigmas (`turbo`), with `params.guidance_scale`;
    `params.step_cache` turns on a step cache. The PNGs and the printed plan name every LoRA (file, sha256,
    scale), the sigmas, the cache and turbo.

    `upsample_temperature` (0.15 recommended; 0 greedy): the server first rewrites the prompts (prompt
    upsampling, diffusers' `caption_upsample_temperature`, with the reference images in image-to-image
    mode, sampled with `params.seed`) and encodes the rewritten ones in the same call; they are logged and
    are the PNGs' prompt, the originals kept as `original_prompt`.
    """
    from .families import detect_family, encoder_for_dit
    from .png_metadata import SAMPLER, guidance_fields, infotext

    params = params or GenerationParams()
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list or any(not isinstance(p, str) or not p.strip() for p in prompt_list):
        raise ValueError("prompts: one or more non-empty prompts are needed")
    if len(images) > MAX_REFERENCE_IMAGES:
        raise ValueError(f"images: at most {MAX_REFERENCE_IMAGES} reference images, got {len(images)}")
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt: at least 1, got {num_images_per_prompt}")
    dit_rev = dit_revision if dit else revision
    family = detect_family(model, revision, dit=dit, dit_revision=dit_rev)
    lora_list = list(loras)
    if turbo:
        from .turbo import TURBO_LORA, turbo_params

        if family.is_klein:
            raise ValueError("turbo: the FLUX.2-dev Turbo LoRA is for FLUX.2-dev, not FLUX.2 [klein]")
        params = turbo_params(params, guidance_scale=params.guidance_scale)
        lora_list.append(TURBO_LORA)
    params.check()
    refs = load_reference_images(images)
    resolved = resolve_loras(lora_list)  # before encoding: a missing LoRA file shows at once

    chosen, owned = encoder_for_dit(encoder, dit or model, revision=dit_rev)
    try:
        if upsample_temperature is not None:
            from .encoder import UpsampleOptions

            upsample = UpsampleOptions(temperature=upsample_temperature, seed=params.seed, images=refs)
            encoded = chosen.encode(prompt_list, upsample=upsample)  # type: ignore[call-arg]
            rewritten = list(encoded.upsampled_prompts or prompt_list)  # type: ignore[attr-defined]
            for i, text in enumerate(rewritten):
                _log.info("upsampled prompt %d: %s", i, text)
        else:
            encoded = chosen.encode(prompt_list)
            rewritten = prompt_list
        negatives = family.negative_prompts(prompt_list, params.guidance_scale, negative_prompt)
        negative_embeds = chosen.encode(negatives).prompt_embeds if negatives else None
    finally:
        if owned:
            chosen.close()
    fp = encoded.fingerprint
    if verbose:
        shape = tuple(encoded.prompt_embeds.shape)
        _log.info("received embeddings %s from %s (%s)", shape, fp.weights_id, fp.digest[:12])
        recipe = describe_recipe(resolved, params, turbo)
        if recipe:
            _log.info("%s", recipe)
    workload = Workload(
        params.height, params.width, tuple(im.size for im in refs), len(prompt_list) * num_images_per_prompt
    )
    pipe = load_pipeline(
        model,
        dit=dit,
        device=device,
        offload=offload,
        vram=vram,
        workload=workload,
        verbose=verbose,
        embedding_dim=encoded.prompt_embeds.shape[-1],
        revision=revision,
        dit_revision=dit_revision,
        loras=resolved,
    )
    results = generate(
        pipe,
        encoded.prompt_embeds,
        params,
        images=refs,
        num_images_per_prompt=num_images_per_prompt,
        progress=progress,
        negative_prompt_embeds=negative_embeds,
    )
    paths = []
    targets = output_paths(out, len(prompt_list), num_images_per_prompt)
    for k, (image, path) in enumerate(zip(results, targets, strict=True)):
        prompt, seed = rewritten[k // num_images_per_prompt], params.seed + k
        meta = {
            "prompt": prompt,
            "seed": seed,
            "steps": params.num_inference_steps,
            "guidance": params.guidance_scale,
            "height": params.height,
            "width": params.width,
            "reference_images": json.dumps([Path(p).name for p in images]),
            "encoder_model": fp.weights_id,
            "encoder_fingerprint": fp.digest,
            "model": model,
            "dit": dit or model,
            **recipe_metadata(resolved, params, turbo),
        }
        if negatives:
            meta["negative_prompt"] = negative_prompt
        if upsample_temperature is not None:
            meta["original_prompt"] = prompt_list[k // num_images_per_prompt]
            meta["upsample_temperature"] = upsample_temperature
            meta["upsample_seed"] = getattr(encoded, "upsample_seed", None)
        fields: dict[str, object] = {"Steps": params.num_inference_steps, "Sampler": SAMPLER}
        fields |= guidance_fields(family, params.guidance_scale)
        fields |= {"Seed": seed, "Size": f"{params.width}x{params.height}", "Model": Path(model).name}
        parameters = infotext(prompt, fields, negative_prompt if negatives else "")
        paths.append(save_png(image, path, meta, parameters))
        if verbose:
            _log.info("wrote %s", path)
    return paths
