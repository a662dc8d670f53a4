"""Random-weight models at the real shapes for the benchmarks (no checkpoint needed, nothing downloaded)."""

from __future__ import annotations

import random
from typing import Any

import torch

# Mistral-Small-3.1-24B-Instruct-2503 (the FLUX.2-dev text encoder), from its config.json.
MISTRAL_SMALL_31_TEXT = {
    "model_type": "mistral",
    "vocab_size": 131072,
    "hidden_size": 5120,
    "intermediate_size": 32768,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000000.0,
    "sliding_window": None,
    "hidden_act": "silu",
    "pad_token_id": 11,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
MISTRAL_SMALL_31_VISION = {
    "model_type": "pixtral",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "head_dim": 64,
    "image_size": 1540,
    "patch_size": 14,
    "num_channels": 3,
    "rope_theta": 10000.0,
}


def encoder_config() -> Any:
    """The Mistral3Config of the FLUX.2-dev text encoder (Mistral Small 3.1 24B)."""
    from transformers import Mistral3Config

    return Mistral3Config(
        text_config=MISTRAL_SMALL_31_TEXT,
        vision_config=MISTRAL_SMALL_31_VISION,
        image_token_index=10,
        spatial_merge_size=2,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        vision_feature_layer=-1,
    )


def build_encoder(tiny: bool, device: str, seed: int = 0) -> Any:
    """Mistral3ForConditionalGeneration (all 40 layers, vision tower, head) with random bf16 weights,
    allocated and initialised directly on `device`."""
    from transformers import Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    if tiny:
        from flux2_client.tiny import build_tiny_text_encoder

        return build_tiny_text_encoder(seed=seed).to(device=device, dtype=torch.bfloat16).eval()
    config = encoder_config()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Mistral3ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


# Qwen/Qwen3-4B and Qwen/Qwen3-8B (the FLUX.2 [klein] 4B and 9B text encoders), from their config.json.
_QWEN3_COMMON = {
    "vocab_size": 151936,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
QWEN3_CONFIGS = {
    "qwen3-4b": {**_QWEN3_COMMON, "hidden_size": 2560, "intermediate_size": 9728, "tie_word_embeddings": True},
    "qwen3-8b": {**_QWEN3_COMMON, "hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False},
}
#: The encoders the benchmarks build: FLUX.2-dev's and the two FLUX.2 [klein] ones.
ENCODERS = ("mistral-small-3.1", "qwen3-4b", "qwen3-8b")


def build_qwen3_encoder(name: str, tiny: bool, device: str, seed: int = 0) -> Any:
    """Qwen3ForCausalLM at the shape of `name` (all 36 layers, final norm, output head: what diffusers'
    Flux2KleinPipeline loads) with random bf16 weights, allocated and initialised directly on `device`;
    `tiny`: the tiny Klein test encoder instead."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    if tiny:
        from flux2_client.tiny_klein import build_tiny_qwen3, build_tiny_qwen3_tokenizer

        tok = build_tiny_qwen3_tokenizer()
        model = build_tiny_qwen3(len(tok), tok.pad_token_id, tok.eos_token_id, seed=seed)
        return model.to(device=device).eval()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_CONFIGS[name]))
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def build_dit(tiny: bool, device: str, seed: int = 0) -> Any:
    """FLUX.2-dev's DiT at real width (48 heads x 128, joint_attention_dim 15360) but reduced depth:
    2 double-stream + 4 single-stream blocks instead of 8 + 48, random weights."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    if tiny:
        from flux2_client.tiny import build_tiny_transformer

        return build_tiny_transformer(joint_attention_dim=192, seed=seed).to(device)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Flux2Transformer2DModel(num_layers=2, num_single_layers=4)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def build_nf4_dit(device: Any, *, double_quant: bool = False, config: dict | None = None, seed: int = 0) -> Any:
    """The FLUX.2-dev DiT (diffusers' defaults are its shapes; `config` overrides them) in bitsandbytes NF4
    with random seeded weights, left in host memory: the state a pre-quantized checkpoint is in after
    loading on the CPU. Built without a checkpoint (docs/design.md): constructed on the meta device, its
    Linears swapped for `Linear4bit`, each weight drawn in bf16 on `device` (a CUDA device), quantized
    there and moved to the host; norm scales near 1. The same seed gives the same bytes in every process."""
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from diffusers import BitsAndBytesConfig, Flux2Transformer2DModel
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    with init_empty_weights():
        model = Flux2Transformer2DModel(**(config or {}))
    qconfig = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=double_quant,
    )
    model = replace_with_bnb_linear(model, modules_to_not_convert=[], quantization_config=qconfig)
    gen = torch.Generator(device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = torch.randn(module.out_features, module.in_features, device=device, dtype=torch.bfloat16, generator=gen)
            w.mul_(module.in_features**-0.5)
            param = bnb.nn.Params4bit(
                w, requires_grad=False, quant_type="nf4", compress_statistics=double_quant, module=module
            ).to(device)
            del w
            module.weight = param.to("cpu")
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:  # norm scales
                module._parameters[name] = torch.nn.Parameter(
                    1 + 0.01 * torch.randn(p.shape, generator=cpu_gen).to(torch.bfloat16), requires_grad=False
                )
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model.eval()


def save_nf4_dit(model: Any, folder: Any, *, double_quant: bool = False) -> None:
    """Write a `build_nf4_dit` model as a pre-quantized checkpoint (`folder`/transformer, the layout of
    diffusers/FLUX.2-dev-bnb-4bit) that `load_nf4_transformer(folder)` loads as the client does. A model
    built without `from_pretrained` has no quantizer to write its config, so the same BitsAndBytesConfig
    `build_nf4_dit` used goes into config.json here. The files are flushed to disk: the kernel reclaims
    pages of a memory-mapped file only once they are clean."""
    import json
    import os
    from pathlib import Path

    from diffusers import BitsAndBytesConfig

    target = Path(folder) / "transformer"
    model.save_pretrained(target, safe_serialization=True)
    qconfig = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=double_quant,
    )
    config_path = target / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = qconfig.to_dict()
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    for path in target.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_PHRASES = (
    "a photograph of an old lighthouse on a rocky coast at dusk, waves crashing, warm light in the windows, "
    "cinematic wide shot, 35mm film grain, a red fox curled up in fresh snow under pine trees, soft morning "
    "light, portrait of an elderly fisherman with a weathered face, dramatic side lighting, isometric "
    "illustration of a tiny city block with shops cafes and a tram, pastel colours, clean vector style, "
    "macro shot of a dew covered spider web, bokeh background, a bowl of ramen with steam rising, neon "
    "signs reflected on a rainy street in Tokyo at night, the text 'OPEN LATE' on a sign, watercolor "
    "painting of a mountain lake, reflections, detailed, highly detailed product render of a mechanical "
    "watch, studio lighting, black background, two cats playing chess in a library, oil painting"
)
_WORDS = _PHRASES.split(" ")


def prompts(count: int, seed: int = 0, min_words: int = 12, max_words: int = 60) -> list[str]:
    """Deterministic English-like prompts of realistic length (about 70-370 characters)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(count)]
