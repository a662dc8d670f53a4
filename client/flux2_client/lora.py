"""LoRA adapters on the client's FLUX.2 DiT, through diffusers' own loader, strict about keys.

`load_loras(pipe, [("path/or/repo", 0.8), ...])` loads each LoRA with `pipe.load_lora_weights` (every format
diffusers' FLUX.2 loader converts: the `pytorch_lora_weights.safetensors` that `train_dreambooth_lora_flux2.py`
writes, PEFT, kohya/ComfyUI, ai-toolkit) as adapters `lora_0`, `lora_1`, ... and activates them with their
scales. Switch between generations with `pipe.set_adapters([...], adapter_weights=[...])`; the DiT is not
reloaded. `load_pipeline(loras=...)` calls it before offloading is set up, so the memory plan counts the
adapters and the streamer keeps them resident while the NF4 base blocks stream.

diffusers only logs a warning for LoRA keys that match no module of the model and applies the rest, so a
LoRA made for another model silently does little or nothing; here such keys are an error naming them.
Only safetensors files are read (never a pickle).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ADAPTER_PREFIX = "lora_"
_TRANSFORMER_PREFIX = "transformer."
_SHOWN_KEYS = 10


class LoraKeyError(ValueError):
    """A LoRA has keys that match no module of the DiT."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to load: a `.safetensors` file, a folder or a Hub repo id holding one, and its scale."""

    source: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """`PATH_OR_REPO[:SCALE]`, e.g. `out/pytorch_lora_weights.safetensors:0.8` (scale 1 when absent)."""
        source, sep, tail = text.rpartition(":")
        if sep and source:
            try:
                return cls(source, float(tail))
            except ValueError:
                pass  # a ':' that is part of the path
        if not text:
            raise ValueError("lora: expected PATH_OR_REPO[:SCALE], got an empty string")
        return cls(text)

    @classmethod
    def of(cls, value: str | tuple[str, float] | LoraSpec) -> LoraSpec:
        if isinstance(value, LoraSpec):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        source, scale = value
        return cls(str(source), float(scale))


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA loaded into the pipeline's DiT, under `adapter_name`."""

    adapter_name: str
    source: str
    scale: float


def lora_module_paths(state_dict: Mapping[str, Any]) -> dict[str, list[str]]:
    """Module path (as in the LoRA, `transformer.` prefix included) -> its keys, for a state dict in diffusers'
    format (what `Flux2Pipeline.lora_state_dict` returns). Keys without an adapter part map to ''."""
    paths: dict[str, list[str]] = {}
    for key in state_dict:
        parts = key.split(".")
        cut = next((i for i, part in enumerate(parts) if part.startswith(("lora_", "lokr_")) or part == "alpha"), None)
        paths.setdefault(".".join(parts[:cut]) if cut else "", []).append(key)
    return paths


def unmatched_lora_keys(transformer: Any, state_dict: Mapping[str, Any]) -> list[str]:
    """Keys of a diffusers-format LoRA state dict that name no module of `transformer` (diffusers would skip
    them with a warning)."""
    modules = {name for name, _ in transformer.named_modules()}
    unmatched: list[str] = []
    for path, keys in lora_module_paths(state_dict).items():
        if not path.startswith(_TRANSFORMER_PREFIX) or path[len(_TRANSFORMER_PREFIX) :] not in modules:
            unmatched += keys
    return sorted(unmatched)


def check_lora_keys(transformer: Any, state_dict: Mapping[str, Any], source: str) -> None:
    unmatched = unmatched_lora_keys(transformer, state_dict)
    if unmatched:
        shown = ", ".join(unmatched[:_SHOWN_KEYS])
        more = f" and {len(unmatched) - _SHOWN_KEYS} more" if len(unmatched) > _SHOWN_KEYS else ""
        raise LoraKeyError(
            f"lora {source}: {len(unmatched)} of {len(state_dict)} keys match no module of the "
            f"{type(transformer).__name__}: {shown}{more}"
        )


def load_loras(pipe: Any, loras: Iterable[str | tuple[str, float] | LoraSpec]) -> tuple[LoadedLora, ...]:
    """Load `loras` into `pipe`'s DiT as new adapters and make exactly them active, with their scales."""
    specs = [LoraSpec.of(item) for item in loras]
    if not specs:
        return ()
    existing = set(getattr(pipe.transformer, "peft_config", {}) or {})
    loaded: list[LoadedLora] = []
    index = 0
    for spec in specs:
        while f"{ADAPTER_PREFIX}{index}" in existing:
            index += 1
        name = f"{ADAPTER_PREFIX}{index}"
        existing.add(name)
        # Convert first (the formats diffusers knows), check every key lands on a module, then load the same way
        # a diffusers user would: load_lora_weights.
        state_dict = pipe.lora_state_dict(spec.source, use_safetensors=True)
        check_lora_keys(pipe.transformer, state_dict, spec.source)
        pipe.load_lora_weights(spec.source, adapter_name=name, use_safetensors=True)
        loaded.append(LoadedLora(name, spec.source, spec.scale))
    pipe.set_adapters([lora.adapter_name for lora in loaded], adapter_weights=[lora.scale for lora in loaded])
    return tuple(loaded)
