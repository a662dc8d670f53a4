"""Loading the FLUX.2 DiT in bitsandbytes NF4, from a pre-quantized folder or by quantizing on load."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def allow_bnb_on_cpu() -> Iterator[None]:
    """Lift diffusers' "No GPU found" refusal for bitsandbytes 4-bit while loading.

    bitsandbytes runs NF4 matmuls on the CPU, but diffusers' quantizer refuses to load without an
    accelerator. Only that one check is skipped; every other validation still runs. Used for CPU runs
    (tests, the demo); on a GPU machine it changes nothing.
    """
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    original = BnB4BitDiffusersQuantizer.validate_environment

    def validate_environment(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            original(self, *args, **kwargs)
        except RuntimeError as exc:
            if "No GPU found" not in str(exc):
                raise

    BnB4BitDiffusersQuantizer.validate_environment = validate_environment  # type: ignore[method-assign]
    try:
        yield
    finally:
        BnB4BitDiffusersQuantizer.validate_environment = original  # type: ignore[method-assign]


def keep_canonical_nf4_layout(model: Any) -> None:
    """Keep every bitsandbytes NF4 weight of `model` in the layout it was quantized in, on any device.

    On CPUs with avx512_bf16, bitsandbytes 0.50 rewrites an NF4 weight into a CPU-only layout in its first
    forward (a new `weight.data`; absmax as a transposed bf16 copy) and `state_dict()` rewrites it back, in
    place and lossily: a non-nested absmax stays transposed, so the next forward's repack scrambles the
    scales of every Linear wider than one quantization block, and every new `weight.data` stops viewing
    the streamer's slab. diffusers' `load_lora_adapter` calls `state_dict()`, so a LoRA loaded after a
    first forward (or into the streamed DiT, whose slabs held the repacked layout) changed every later
    image (docs/design.md, "LoRA"). With the repack off, a weight only changes by the bytes copied into
    it, and CPU images are those of bitsandbytes' canonical NF4 dequantization.
    """
    from bitsandbytes.nn import Linear4bit

    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError(
                f"transformer: {name} already ran a CPU forward that repacked its NF4 weight (bitsandbytes "
                "avx512_bf16 path); load the DiT again and set up offloading or LoRAs before the first forward"
            )
        module.support_avx512bf16_for_cpu = False


def _is_prequantized(repo: str, subfolder: str, revision: str | None = None) -> bool:
    config_path = Path(repo) / subfolder / "config.json"
    if config_path.is_file():
        return "quantization_config" in json.loads(config_path.read_text())
    from huggingface_hub import hf_hub_download

    try:
        local = hf_hub_download(repo, f"{subfolder}/config.json", revision=revision)
    except Exception:
        return False
    return "quantization_config" in json.loads(Path(local).read_text())


def load_nf4_transformer(
    repo: str,
    subfolder: str = "transformer",
    device: Any = None,
    double_quant: bool = False,
    revision: str | None = None,
):
    """Load `Flux2Transformer2DModel` in NF4 with bf16 compute.

    A folder saved pre-quantized (its config carries `quantization_config`, like
    diffusers/FLUX.2-dev-bnb-4bit) loads as it is; a bf16 checkpoint is quantized while loading.
    """
    import torch
    from diffusers import BitsAndBytesConfig, Flux2Transformer2DModel

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kwargs: dict[str, Any] = {"subfolder": subfolder, "dtype": torch.bfloat16, "revision": revision}
    if not _is_prequantized(repo, subfolder, revision):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=double_quant,
        )
    if device.type == "cpu":
        with allow_bnb_on_cpu():
            model = Flux2Transformer2DModel.from_pretrained(repo, device_map="cpu", **kwargs)
    else:
        model = Flux2Transformer2DModel.from_pretrained(repo, device_map=str(device), **kwargs)
    keep_canonical_nf4_layout(model)
    return model.eval()
