"""Tiny random FLUX.2-dev-shaped models, written in the Hugging Face layout.

No weights can be downloaded in tests, CI or the demo, so the project builds its own: every component has
the real class and the real wiring (30+ decoder layers so hidden states 10/20/30 exist, 32 latent
channels, 128 packed channels, joint_attention_dim = 3 x text hidden size), only narrower. Images drawn
from these weights are noise; pass `--model black-forest-labs/FLUX.2-dev` for real ones.

    flux2-client make-tiny OUT_DIR

writes OUT_DIR/FLUX.2-dev-tiny (the whole pipeline, like black-forest-labs/FLUX.2-dev) and
OUT_DIR/FLUX.2-dev-tiny-bnb-4bit/transformer (a pre-quantized NF4 DiT, like diffusers/FLUX.2-dev-bnb-4bit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Special tokens at the ids the real Tekken tokenizer of Mistral Small 3.1 uses.
_SPECIAL_TOKENS = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    3: "[INST]",
    4: "[/INST]",
    10: "[IMG]",
    11: "<pad>",
    12: "[IMG_BREAK]",
    13: "[IMG_END]",
    17: "[SYSTEM_PROMPT]",
    18: "[/SYSTEM_PROMPT]",
}
_NUM_SPECIAL = 1000  # Tekken reserves the first 1000 ids for control tokens; bytes follow.

# A Mistral v7-style template (system prompt block, [INST] turns) that accepts string content or the
# list-of-parts content diffusers' Flux2Pipeline sends.
MISTRAL_V7_CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}{{- '[IMG]' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- '[SYSTEM_PROMPT]' + text(message['content']) + '[/SYSTEM_PROMPT]' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '[INST]' + text(message['content']) + '[/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- text(message['content']) + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


@dataclass(frozen=True)
class TinyPaths:
    """Where `make_tiny_flux2` wrote the models."""

    pipeline: Path
    nf4_repo: Path


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-character table of byte-level BPE (GPT-2), so every byte is one token.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def build_tiny_tokenizer(model_max_length: int = 512):
    """A byte-level tokenizer with Tekken's special-token ids and a Mistral v7 chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {_SPECIAL_TOKENS.get(i, f"<SPECIAL_{i}>"): i for i in range(_NUM_SPECIAL)}
    for byte, char in _bytes_to_unicode().items():
        vocab[char] = _NUM_SPECIAL + byte
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in _SPECIAL_TOKENS.values()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = MISTRAL_V7_CHAT_TEMPLATE
    return tokenizer


def write_tiny_processor_config(tokenizer_dir: str | Path) -> None:
    """The multimodal processor of the tiny text encoder, beside its tokenizer: a PixtralProcessor whose
    image processor scales images to the tiny vision tower (32 px, patches of 8, merged 2 x 2), as
    `tokenizer/` of FLUX.2-dev holds one for the real tower. Prompt upsampling's image-to-image mode loads
    it with `AutoProcessor` (transformers' PixtralProcessor needs torchvision); nothing else reads it."""
    folder = Path(tokenizer_dir)
    processor = {
        "processor_class": "PixtralProcessor",
        "patch_size": 8,
        "spatial_merge_size": 2,
        "image_token": "[IMG]",
        "image_break_token": "[IMG_BREAK]",
        "image_end_token": "[IMG_END]",
    }
    image_processor = {
        "image_processor_type": "PixtralImageProcessor",
        "processor_class": "PixtralProcessor",
        "patch_size": 8,
        "size": {"longest_edge": 32},
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
    }
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    (folder / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2) + "\n")


def build_tiny_text_encoder(hidden_size: int = 64, num_layers: int = 40, seed: int = 0):
    """A `Mistral3ForConditionalGeneration` with Mistral Small 3.1's structure at toy width."""
    import torch
    from transformers import Mistral3ForConditionalGeneration

    config = tiny_text_encoder_config(hidden_size, num_layers)
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config)
    return model.to(torch.bfloat16).eval()


def tiny_text_encoder_config(hidden_size: int = 64, num_layers: int = 40):
    """The `Mistral3Config` of `build_tiny_text_encoder`."""
    from transformers import Mistral3Config

    return Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": _NUM_SPECIAL + 256,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,  # like the real model, heads * head_dim != hidden_size
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000000.0,
            "sliding_window": None,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 11,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 32,
            "patch_size": 8,
            "num_channels": 3,
        },
        image_token_index=10,
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )


def write_random_checkpoint(
    model_class: Any,
    config: Any,
    folder: str | Path,
    *,
    max_shard_bytes: int = 5_000_000_000,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, str]:
    """Random bf16 weights for `model_class(config)` written as transformers lays out a sharded
    checkpoint: `model-0000i-of-0000n.safetensors` files filled in parameter order up to
    `max_shard_bytes` each, `model.safetensors.index.json` (its `weight_map`) and `config.json`.

    The model is never built: its parameters are listed on the meta device and made one shard at a time
    on `device` (so a 48 GB encoder can be written from a GPU through a few GB of host RAM). Matrices
    are N(0, 0.02), vectors (norm weights) ones. Returns the weight map (tensor name -> file name).
    """
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with init_empty_weights(include_buffers=True):
        model = model_class(config)
    persistent = model.state_dict().keys()
    tensors = [(n, t) for n, t in model.named_parameters()]  # tied weights once
    tensors += [(n, t) for n, t in model.named_buffers() if n in persistent]
    shards: list[list[tuple[str, Any]]] = [[]]
    size = 0
    for name, meta in tensors:
        nbytes = meta.numel() * 2
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, meta))
        size += nbytes
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for name, meta in shard:
            if meta.dim() >= 2:
                value = torch.randn(meta.shape, generator=gen, device=device, dtype=torch.bfloat16).mul_(0.02)
            else:
                value = torch.ones(meta.shape, device=device, dtype=torch.bfloat16)
            data[name] = value.cpu()
            weight_map[name] = filename
        save_file(data, str(folder / filename), metadata={"format": "pt"})
        del data
    total = sum(meta.numel() * 2 for _, meta in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.architectures = [model_class.__name__]
    config.save_pretrained(folder)
    return weight_map


def build_tiny_transformer(
    joint_attention_dim: int,
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_single_layers: int = 2,
    guidance_embeds: bool = True,
):
    """A `Flux2Transformer2DModel` with FLUX.2-dev's channel layout (Klein's without the guidance
    embedder). Linear sizes are multiples of 64 so bitsandbytes' CPU NF4 kernels (which repack weights on
    avx512_bf16 machines) accept them."""
    import torch
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(8, 8, 8, 8),
        guidance_embeds=guidance_embeds,
    )
    return model.to(torch.bfloat16).eval()


def build_tiny_vae(seed: int = 0):
    """An `AutoencoderKLFlux2` with 32 latent channels and 8x downsampling, like the real one."""
    import torch
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=8,
        sample_size=64,
    )
    return vae.to(torch.bfloat16).eval()


# The scheduler settings of black-forest-labs/FLUX.2-dev (dynamic shifting is required: the pipeline
# passes `mu`).
FLUX2_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}


def make_tiny_flux2(out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> TinyPaths:
    """Write the tiny pipeline folder and its NF4 DiT folder below `out_dir` (skipped when present)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    out_dir = Path(out_dir)
    paths = TinyPaths(pipeline=out_dir / "FLUX.2-dev-tiny", nf4_repo=out_dir / "FLUX.2-dev-tiny-bnb-4bit")
    done_marker = out_dir / ".complete.json"
    if done_marker.exists() and not overwrite:
        return paths

    tokenizer = build_tiny_tokenizer()
    text_encoder = build_tiny_text_encoder(seed=seed)
    joint_dim = 3 * text_encoder.config.text_config.hidden_size
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG),
        vae=build_tiny_vae(seed=seed + 1),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=build_tiny_transformer(joint_dim, seed=seed + 2),
    )
    pipe.save_pretrained(paths.pipeline, safe_serialization=True)
    write_tiny_processor_config(paths.pipeline / "tokenizer")

    from ._quantization import load_nf4_transformer

    nf4 = load_nf4_transformer(str(paths.pipeline), subfolder="transformer", device=torch.device("cpu"))
    nf4.save_pretrained(paths.nf4_repo / "transformer", safe_serialization=True)
    (paths.nf4_repo / "README.md").write_text(
        "Tiny random FLUX.2 DiT quantized to bitsandbytes NF4 by flux2-split (layout of "
        "diffusers/FLUX.2-dev-bnb-4bit). Random weights: images are noise.\n"
    )
    done_marker.write_text(json.dumps({"seed": seed, "pipeline": paths.pipeline.name}))
    return paths
