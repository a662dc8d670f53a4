"""Prompt upsampling: the text encoder's own model rewrites short prompts into the detailed ones FLUX.2
was trained on, as diffusers' `Flux2Pipeline.upsample_prompt` does (BFL's reference code does the same).

The server does not depend on diffusers, so its recipe is written out here and `tests/test_upsample.py`
holds it to diffusers' own `upsample_prompt` on the same model, inputs and seed:

1. Images (image-to-image mode) per prompt: several are put side by side into one
   (`Flux2ImageProcessor.concatenate_images`), one over 768 x 768 pixels is scaled down to that area
   with LANCZOS (`_resize_if_exceeds_area`); the system message is the I2I one when the first prompt has
   images, else the T2I one (`diffusers.pipelines.flux2.system_messages`, copied below).
2. One batched chat-template call: system message, the prompt's images as a user turn, the prompt
   (`[IMG]` removed) as another user turn; `add_generation_prompt=True`, padded to 2048 tokens,
   truncated there.
3. `generate(max_new_tokens, do_sample=True, temperature, use_cache=True)` on the whole model, after
   `torch.manual_seed(seed)` (diffusers draws from torch's global generator; here the seed is the
   request's, or one the server draws and reports). Temperature 0 is greedy decoding, which diffusers'
   call cannot run (transformers refuses temperature 0 with sampling).
4. The new tokens decoded with `skip_special_tokens=True, clean_up_tokenization_spaces=True`.

Everything here runs on the batcher's worker thread (`Upsampler.generate`), except the request checks
and the image decoding, which the core runs off the event loop before queueing. One request is one
`generate` call, never merged with another's: sampling draws depend on the batch, so merging would
change a seeded request's text.
"""

from __future__ import annotations

import io
import logging
import math
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_TEMPERATURE",
    "MAX_IMAGE_AREA",
    "SYSTEM_MESSAGE_UPSAMPLING_I2I",
    "SYSTEM_MESSAGE_UPSAMPLING_T2I",
    "UpsampleJob",
    "UpsampleLimits",
    "UpsampleSpec",
    "Upsampled",
    "Upsampler",
    "check_upsample_request",
    "concatenate_images",
    "format_messages",
    "prepare_images",
    "resize_if_exceeds_area",
]

# diffusers.pipelines.flux2.system_messages (from black-forest-labs/flux2); tests keep the copies equal.
SYSTEM_MESSAGE_UPSAMPLING_T2I = (
    "You are an expert prompt engineer for FLUX.2 by Black Forest Labs. Rewrite user prompts to be more "
    "descriptive while strictly preserving their core subject and intent.\n\n"
    "Guidelines:\n"
    "1. Structure: Keep structured inputs structured (enhance within fields). Convert natural language to "
    "detailed paragraphs.\n"
    "2. Details: Add concrete visual specifics - form, scale, textures, materials, lighting (quality, "
    "direction, color), shadows, spatial relationships, and environmental context.\n"
    "3. Text in Images: Put ALL text in quotation marks, matching the prompt's language. Always provide "
    "explicit quoted text for objects that would contain text in reality (signs, labels, screens, etc.) - "
    "without it, the model generates gibberish.\n\n"
    "Output only the revised prompt and nothing else."
)
SYSTEM_MESSAGE_UPSAMPLING_I2I = (
    "You are FLUX.2 by Black Forest Labs, an image-editing expert. You convert editing requests into one "
    "concise instruction (50-80 words, ~30 for brief requests).\n\n"
    "Rules:\n"
    "- Single instruction only, no commentary\n"
    '- Use clear, analytical language (avoid "whimsical," "cascading," etc.)\n'
    "- Specify what changes AND what stays the same (face, lighting, composition)\n"
    "- Reference actual image elements\n"
    '- Turn negatives into positives ("don\'t change X" → "keep X")\n'
    '- Make abstractions concrete ("futuristic" → "glowing cyan neon, metallic panels")\n'
    "- Keep content PG-13\n\n"
    "Output only the final instruction in plain text and nothing else."
)

#: diffusers' `UPSAMPLING_MAX_IMAGE_SIZE`: reference images are scaled down to at most this many pixels.
MAX_IMAGE_AREA = 768**2
#: diffusers' defaults: `upsample_prompt(temperature=0.15)`, `generate(max_new_tokens=512)`.
DEFAULT_TEMPERATURE = 0.15
DEFAULT_MAX_NEW_TOKENS = 512
#: Every conversation is padded (and truncated) to this many tokens before generating, as diffusers does.
INPUT_MAX_LENGTH = 2048
#: Image files the server decodes (PIL format names).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
#: Seeds the server draws itself fit in 53 bits, so JSON clients read them back exactly.
_DRAWN_SEED_BITS = 53


@dataclass(frozen=True)
class UpsampleLimits:
    """What one upsampling request may ask for (from the settings)."""

    max_prompts: int
    max_images: int
    max_image_bytes: int
    max_image_pixels: int
    max_temperature: float
    max_new_tokens: int
    #: Image-to-image mode is available (the model folder has a vision processor that loads here).
    images: bool = True


@dataclass(frozen=True)
class UpsampleSpec:
    """An upsampling request as a front-end received it, not yet checked. `temperature` None: the
    default (0.15); `max_new_tokens` 0: the default (512); `seed` None: the server draws one;
    `images_per_prompt` empty: every prompt gets every image."""

    temperature: float | None = None
    max_new_tokens: int = 0
    seed: int | None = None
    images: Sequence[bytes] = ()
    images_per_prompt: Sequence[int] = ()


@dataclass(frozen=True)
class UpsampleJob:
    """A checked request: what `Upsampler.generate` runs. `images`: None in text-to-image mode, else
    per prompt the decoded images (diffusers' list of lists)."""

    prompts: list[str]
    temperature: float
    max_new_tokens: int
    seed: int
    images: list[list[Any]] | None = None
    image_bytes: int = 0


@dataclass(frozen=True)
class Upsampled:
    """The rewritten prompts, the seed they were sampled with and the tokens generated for each."""

    prompts: list[str]
    seed: int
    new_tokens: list[int] = field(default_factory=list)


def check_upsample_request(
    prompts: list[str], spec: UpsampleSpec, limits: UpsampleLimits, field_prefix: str = ""
) -> UpsampleJob:
    """`spec` checked against `limits` and its images decoded (blocking: run it off the event loop).
    Raises InvalidArgument naming the field and the limit; FailedPrecondition when images are sent to a
    server without image mode. `prompts` were checked by the core already."""
    f = field_prefix
    if len(prompts) > limits.max_prompts:
        raise InvalidArgument(
            f"{f}prompts: {len(prompts)} prompts exceed upsample_max_prompts={limits.max_prompts} per request"
        )
    temperature = DEFAULT_TEMPERATURE if spec.temperature is None else spec.temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise InvalidArgument(f"{f}temperature: expected a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or not 0 <= temperature <= limits.max_temperature:
        raise InvalidArgument(
            f"{f}temperature: {temperature:g} is outside 0 to upsample_max_temperature={limits.max_temperature:g} "
            "(0: greedy decoding)"
        )
    max_new_tokens = spec.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise InvalidArgument(f"{f}max_new_tokens: expected an integer, got {type(max_new_tokens).__name__}")
    if not 1 <= max_new_tokens <= limits.max_new_tokens:
        raise InvalidArgument(
            f"{f}max_new_tokens: {max_new_tokens} is outside 1 to upsample_max_new_tokens={limits.max_new_tokens}"
        )
    seed = spec.seed
    if seed is None:
        seed = random.SystemRandom().getrandbits(_DRAWN_SEED_BITS)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise InvalidArgument(f"{f}seed: expected an integer from 0 to 2**64-1, got {seed!r}")
    images = _split_images(prompts, spec, limits, f)
    return UpsampleJob(
        prompts=list(prompts),
        temperature=float(temperature),
        max_new_tokens=max_new_tokens,
        seed=seed,
        images=images,
        image_bytes=sum(len(b) for b in spec.images),
    )


def _split_images(prompts: list[str], spec: UpsampleSpec, limits: UpsampleLimits, f: str) -> list[list[Any]] | None:
    files = list(spec.images)
    counts = list(spec.images_per_prompt)
    if not files:
        if any(counts):
            raise InvalidArgument(f"{f}images_per_prompt: counts {counts} given without images")
        return None
    if len(files) > limits.max_images:
        raise InvalidArgument(f"{f}images: {len(files)} images exceed upsample_max_images={limits.max_images}")
    if counts:
        if len(counts) != len(prompts):
            raise InvalidArgument(
                f"{f}images_per_prompt: {len(counts)} counts for {len(prompts)} prompts (one per prompt, or none)"
            )
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts) or sum(counts) != len(files):
            raise InvalidArgument(
                f"{f}images_per_prompt: counts {counts} must be non-negative and add up to the {len(files)} images"
            )
    decoded = [_decode_image(data, i, limits, f) for i, data in enumerate(files)]
    if not limits.images:
        raise FailedPrecondition(
            f"{f}images: this server upsamples text-to-image prompts only (image-to-image mode needs the model's "
            "vision processor, which needs torchvision on the server); send no images"
        )
    if not counts:
        return [list(decoded) for _ in prompts]
    per_prompt, start = [], 0
    for count in counts:
        per_prompt.append(decoded[start : start + count])
        start += count
    return per_prompt


def _decode_image(data: object, index: int, limits: UpsampleLimits, f: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    name = f"{f}images[{index}]"
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidArgument(f"{name}: expected the bytes of an image file, got {type(data).__name__}")
    if len(data) > limits.max_image_bytes:
        raise InvalidArgument(f"{name}: {len(data)} bytes exceed upsample_max_image_bytes={limits.max_image_bytes}")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise InvalidArgument(f"{name}: not a PNG, JPEG or WebP image") from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > limits.max_image_pixels:
        raise InvalidArgument(
            f"{name}: {width}x{height} pixels exceed upsample_max_image_pixels={limits.max_image_pixels}"
        )
    try:
        image.load()  # the header was read; decode the pixels now, off the model thread
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidArgument(f"{name}: the image data is damaged ({type(exc).__name__})") from None
    return image


# -- diffusers' recipe ---------------------------------------------------------------------------------------


def concatenate_images(images: list[Any]) -> Any:
    """Images side by side, vertically centred on white (diffusers' `Flux2ImageProcessor.concatenate_images`)."""
    from PIL import Image

    if len(images) == 1:
        return images[0].copy()
    images = [img.convert("RGB") if img.mode != "RGB" else img for img in images]
    total_width = sum(img.width for img in images)
    max_height = max(img.height for img in images)
    out = Image.new("RGB", (total_width, max_height), (255, 255, 255))
    x = 0
    for img in images:
        out.paste(img, (x, (max_height - img.height) // 2))
        x += img.width
    return out


def resize_if_exceeds_area(image: Any, target_area: int = MAX_IMAGE_AREA) -> Any:
    """`image` scaled down (LANCZOS) to about `target_area` pixels when it has more (diffusers'
    `Flux2ImageProcessor._resize_if_exceeds_area`)."""
    from PIL import Image

    width, height = image.size
    if width * height <= target_area:
        return image
    scale = math.sqrt(target_area / (width * height))
    return image.resize((int(width * scale), int(height * scale)), Image.Resampling.LANCZOS)


def prepare_images(images: list[list[Any]]) -> list[list[Any]]:
    """Per prompt: its images concatenated into one (when several), then capped at MAX_IMAGE_AREA
    (diffusers' `_validate_and_process_images`)."""
    joined = [[concatenate_images(group)] if len(group) > 1 else group for group in images]
    return [[resize_if_exceeds_area(img) for img in group] for group in joined]


def format_messages(prompts: list[str], system_message: str, images: list[list[Any]] | None) -> list[list[dict]]:
    """The conversations diffusers' `format_input` builds: system message, the prompt's images as one user
    turn (when it has a list of them, even empty), its text as another; `[IMG]` removed from the text."""
    cleaned = [prompt.replace("[IMG]", "") for prompt in prompts]
    system = {"role": "system", "content": [{"type": "text", "text": system_message}]}
    conversations: list[list[dict]] = []
    for i, text in enumerate(cleaned):
        turns = [system]
        if images is not None:
            turns.append({"role": "user", "content": [{"type": "image", "image": img} for img in images[i]]})
        turns.append({"role": "user", "content": [{"type": "text", "text": text}]})
        conversations.append(turns)
    return conversations


class _StopWhen:
    """A transformers stopping criterion that ends generation when `should_stop()` turns true (the caller
    went away or its deadline passed): no model time for text nobody will read. It never stops a request
    that is still wanted, so it changes no output."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


class Upsampler:
    """The whole text encoder (`Mistral3ForConditionalGeneration`: every decoder layer, the final norm,
    the output head, the vision tower) and its tokenizer, and the vision processor when one loads. Shares
    its decoder layers with the encoder engine: one copy of the weights serves both."""

    def __init__(self, model: Any, tokenizer: Any, processor: Any = None, tokenizer_lock: Any = None):
        self.model = model
        self.tokenizer = tokenizer
        #: The engine's lock around its (shared) tokenizer; see `EncoderEngine.tokenizer_lock`.
        self._tokenizer_lock = tokenizer_lock if tokenizer_lock is not None else threading.Lock()
        #: The model folder's processor (PixtralProcessor for FLUX.2-dev); None: text-to-image mode only.
        self.processor = processor

    @property
    def supports_images(self) -> bool:
        return self.processor is not None

    @staticmethod
    def load_processor(model: str, subfolder: str, *, revision: str | None, token: str | bool | None) -> Any:
        """The folder's multimodal processor, or None (with the reason logged) when it has none or it does
        not load here (transformers' PixtralProcessor needs torchvision)."""
        try:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(model, subfolder=subfolder, revision=revision, token=token)
        except Exception as exc:  # ImportError for torchvision, OSError/ValueError for a folder without one
            log.warning("prompt upsampling: image-to-image mode is off: no vision processor loads (%s)", exc)
            return None
        if getattr(processor, "image_processor", None) is None:
            log.warning("prompt upsampling: image-to-image mode is off: %s/%s has no image processor", model, subfolder)
            return None
        return processor

    def generate(self, job: UpsampleJob, should_stop: Callable[[], bool] = lambda: False) -> Upsampled:
        """Rewrite `job.prompts` (diffusers' recipe, module docstring). Runs on the model's worker thread."""
        import torch

        images = prepare_images(job.images) if job.images else None
        # diffusers picks the message from the first prompt's images: a list, even empty, means I2I.
        system = SYSTEM_MESSAGE_UPSAMPLING_I2I if images is not None else SYSTEM_MESSAGE_UPSAMPLING_T2I
        messages = format_messages(job.prompts, system, images)
        # The processor renders and tokenizes both modes, as diffusers' call does; a server without one
        # serves text-to-image mode with the tokenizer the processor would wrap.
        template = self.processor if self.processor is not None else self.tokenizer
        with self._tokenizer_lock:
            inputs = template.apply_chat_template(
                messages,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                padding="max_length",
                truncation=True,
                max_length=INPUT_MAX_LENGTH,
            )
        device = self.model.device
        inputs["input_ids"] = inputs["input_ids"].to(device)
        inputs["attention_mask"] = inputs["attention_mask"].to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(device, self.model.dtype)
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": job.temperature} if job.temperature > 0 else {"do_sample": False}
        )
        from transformers import StoppingCriteriaList

        devices = [device] if device.type == "cuda" else []
        # The request's seed on torch's default generators, as `torch.manual_seed(seed)` before diffusers'
        # call seeds them; the state before is restored after, so nothing else sees this seed.
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(job.seed)
            generated = self.model.generate(
                **inputs,
                max_new_tokens=job.max_new_tokens,
                use_cache=True,
                stopping_criteria=StoppingCriteriaList([_StopWhen(should_stop)]),
                **sampling,
            )
        new = generated[:, inputs["input_ids"].shape[1] :].cpu()
        with self._tokenizer_lock:
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        return Upsampled(prompts=list(texts), seed=job.seed, new_tokens=self._new_token_counts(new))

    def _new_token_counts(self, new: Any) -> list[int]:
        """Tokens generated per row: up to and including its first end-of-sequence token (generate pads a
        finished row until every row is done)."""
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        counts = []
        for row in new.tolist():
            ends = [i for i, token in enumerate(row) if token in eos_ids]
            counts.append(ends[0] + 1 if ends else len(row))
        return counts
