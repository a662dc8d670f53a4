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

A source names one file: a `.safetensors` path, a folder or Hub repo holding `pytorch_lora_weights.safetensors`
or a single `.safetensors` at its top level, or `owner/name/file.safetensors` for one file of a Hub repo
(`LoraSpec.weight_name` says the same). `resolve_loras` finds each file and its sha256, which the PNG metadata
and the plan output name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADAPTER_PREFIX = "lora_"
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' training scripts write
_TRANSFORMER_PREFIX = "transformer."
_SHOWN_KEYS = 10
SHA256_SHOWN = 12  # hex digits of a LoRA file's sha256 in PNG metadata and plan output


class LoraKeyError(ValueError):
    """A LoRA has keys that match no module of the DiT."""


class LoraSourceError(ValueError):
    """A LoRA source names no file: nothing there, or several candidate files."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to load: a `.safetensors` file, a folder or a Hub repo id holding one, and its scale.
    `weight_name` picks the file inside a folder or repo that holds several."""

    source: str
    scale: float = 1.0
    weight_name: str | None = None

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
    def of(cls, value: str | tuple[str, float] | LoraSpec | ResolvedLora) -> LoraSpec:
        if isinstance(value, LoraSpec):
            return value
        if isinstance(value, ResolvedLora):
            return cls(value.file, value.spec.scale)
        if isinstance(value, str):
            return cls.parse(value)
        source, scale = value
        return cls(str(source), float(scale))


LoraLike = str | tuple[str, float] | LoraSpec


@dataclass(frozen=True)
class ResolvedLora:
    """A LoRA's file on this machine (downloaded if it came from the Hub) and the file's sha256."""

    spec: LoraSpec
    file: str
    sha256: str

    def describe(self) -> str:
        name, digest = Path(self.file).name, self.sha256[:SHA256_SHOWN]
        return f"{name} (sha256 {digest}), scale {self.spec.scale:g}, from {self.spec.source}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.spec.source,
            "file": Path(self.file).name,
            "sha256": self.sha256[:SHA256_SHOWN],
            "scale": self.spec.scale,
        }


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA loaded into the pipeline's DiT, under `adapter_name`, from `file`."""

    adapter_name: str
    source: str
    scale: float
    file: str = ""


def _pick(source: str, names: list[str]) -> str:
    """The LoRA file among a folder's or repo's top-level `.safetensors` files."""
    if DIFFUSERS_LORA_FILE in names:
        return DIFFUSERS_LORA_FILE
    if len(names) == 1:
        return names[0]
    if not names:
        raise LoraSourceError(f"lora {source}: no .safetensors file at its top level")
    listed = ", ".join(f"{source}/{n}" for n in sorted(names))
    raise LoraSourceError(f"lora {source}: {len(names)} .safetensors files, name one of {listed}")


def lora_file(spec: LoraSpec) -> str:
    """The local path of `spec`'s file; a Hub file is downloaded (or found in the Hub cache)."""
    source, path = spec.source, Path(spec.source)
    if path.is_file():
        return str(path)
    if path.is_dir():
        names = [p.name for p in path.iterdir() if p.is_file() and p.suffix == ".safetensors"]
        chosen = path / (spec.weight_name or _pick(source, names))
        if not chosen.is_file():
            raise LoraSourceError(f"lora {source}: no file {spec.weight_name}")
        return str(chosen)
    parts = source.split("/")
    if source.startswith(("/", ".", "~")) or (source.endswith(".safetensors") and len(parts) <= 2):
        raise LoraSourceError(f"lora {source}: no such file or folder")
    from huggingface_hub import hf_hub_download, list_repo_files

    repo, filename = source, spec.weight_name
    if filename is None and source.endswith(".safetensors") and len(parts) > 2:
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        if filename is None:
            filename = _pick(source, [f for f in list_repo_files(repo) if "/" not in f and f.endswith(".safetensors")])
        return hf_hub_download(repo, filename)
    except (OSError, ValueError) as exc:
        if isinstance(exc, LoraSourceError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoraSourceError(f"lora {source}: not a file, a folder or a Hub repo's LoRA ({first})") from None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_loras(loras: Iterable[LoraLike]) -> tuple[ResolvedLora, ...]:
    """Each LoRA's file (downloaded where it is a Hub repo's) and its sha256: what a generation records."""
    resolved = []
    for item in loras:
        spec = LoraSpec.of(item)
        path = lora_file(spec)
        resolved.append(ResolvedLora(spec, path, file_sha256(path)))
    return tuple(resolved)


def lora_file_adapter_bytes(path: str) -> tuple[int, int]:
    """(bytes, widest output) of the DiT adapters a LoRA file holds, from its safetensors header alone: what
    the plan counts before anything is loaded (the loaded adapters keep the file's dtype)."""
    from safetensors import safe_open

    from .planner import align_bytes

    total = widest = 0
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        for key in keys:
            if key.startswith(("text_encoder", "lora_te")):
                continue
            tensor = f.get_slice(key)
            shape, dtype = tensor.get_shape(), tensor.get_dtype()
            numel = 1
            for n in shape:
                numel *= n
            total += align_bytes(numel * _SAFETENSORS_ITEMSIZE.get(dtype, 4))
            if ("lora_B" in key or "lora_up" in key) and shape:
                widest = max(widest, shape[0])
    return total, widest


_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4}


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


def load_loras(pipe: Any, loras: Iterable[LoraLike | ResolvedLora]) -> tuple[LoadedLora, ...]:
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
        # a diffusers user would: load_lora_weights, given the file itself (the one the metadata names).
        path = lora_file(spec)
        state_dict = pipe.lora_state_dict(path, use_safetensors=True)
        check_lora_keys(pipe.transformer, state_dict, spec.source)
        pipe.load_lora_weights(path, adapter_name=name, use_safetensors=True)
        loaded.append(LoadedLora(name, spec.source, spec.scale, path))
    pipe.set_adapters([lora.adapter_name for lora in loaded], adapter_weights=[lora.scale for lora in loaded])
    return tuple(loaded)
