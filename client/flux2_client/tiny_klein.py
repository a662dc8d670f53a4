"""Tiny random FLUX.2 [klein]-shaped models, written in the layout of diffusers' `Flux2KleinPipeline`.

Like `tiny.py` for FLUX.2-dev: the real classes and wiring at toy width. The text encoder is a
`Qwen3ForCausalLM` with 28 decoder layers (Klein reads hidden states 9, 18 and 27; the last layer and
the final norm exist so the server's pruning has something to drop), its tokenizer is an offline
byte-level `Qwen2Tokenizer` with Qwen3's special tokens and Qwen3's real chat template (with its
`enable_thinking` switch), and the DiT is Klein-shaped: no guidance embedder, joint_attention_dim =
3 x the encoder's hidden size, and its own block counts (Klein 4B has 5 double + 20 single blocks).

    flux2-client make-tiny OUT_DIR --family klein

writes OUT_DIR/FLUX.2-klein-tiny (step-distilled, like black-forest-labs/FLUX.2-klein-4B),
OUT_DIR/FLUX.2-klein-base-tiny (undistilled, real classifier-free guidance, like FLUX.2-klein-base-4B)
and OUT_DIR/FLUX.2-klein-tiny-bnb-4bit/transformer (the distilled DiT pre-quantized to NF4).
Built only when asked: the FLUX.2-dev fixtures never pay for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .tiny import FLUX2_SCHEDULER_CONFIG, _bytes_to_unicode, build_tiny_vae

# Qwen3's chat template, verbatim in a package file (Qwen/Qwen3-4B and Qwen3-8B, the hybrid-thinking
# releases FLUX.2 [klein] ships with): with `add_generation_prompt=True, enable_thinking=False`, as
# Flux2KleinPipeline renders every prompt, a user turn ends in an empty think block:
# "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n".
QWEN3_CHAT_TEMPLATE_FILE = "qwen3_chat_template.jinja"

# Qwen3's added tokens in their real order (ids 151643.. in the real vocabulary, here right after the
# byte-level BPE vocabulary) and whether each is special; <think>/</think> and the tool tags are not.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# A few real BPE merges on top of the 256 byte tokens, so the tokenizer merges like a BPE does (and a
# prompt's token count is not simply its byte count).
_MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("a", "n"))

# Klein 4B's DiT block counts are 5 double + 20 single; the tiny one keeps the 1:4 ratio.
KLEIN_TINY_DOUBLE_BLOCKS = 1
KLEIN_TINY_SINGLE_BLOCKS = 4


@dataclass(frozen=True)
class TinyKleinPaths:
    """Where `make_tiny_klein` wrote the models."""

    distilled: Path
    base: Path
    nf4_repo: Path


def qwen3_chat_template() -> str:
    from importlib.resources import files

    return files(__package__).joinpath(QWEN3_CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")


def _qwen3_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    for left, right in _MERGES:
        vocab.setdefault(left + right, len(vocab))
    return vocab, list(_MERGES)


def build_tiny_qwen3_tokenizer(model_max_length: int = 131072):
    """An offline `Qwen2Tokenizer` (Qwen's pre-tokenizer regex, NFC, byte-level BPE) with Qwen3's added
    tokens, special-token roles (no BOS, EOS <|im_end|>, pad <|endoftext|>) and chat template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _qwen3_vocab()
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        errors="replace",
    )
    tokenizer.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN3_ADDED_TOKENS])
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t, s in QWEN3_ADDED_TOKENS if s and t != "<|endoftext|>"]}
    )
    tokenizer.chat_template = qwen3_chat_template()
    return tokenizer


def build_tiny_qwen3(vocab_size: int, pad_token_id: int, eos_token_id: int, hidden_size: int = 128, seed: int = 0):
    """A `Qwen3ForCausalLM` with Qwen3-4B's structure at toy width: GQA, heads x head_dim != hidden size,
    q/k norms, tied embeddings, and 28 layers (hidden state 27 is then still pre-norm, and the server's
    pruning drops a layer and the final norm). Every Linear size is a multiple of 64, so the server's NF4
    tier runs on bitsandbytes' CPU kernels too."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=28,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        bos_token_id=pad_token_id,  # Qwen3's config names <|endoftext|> as bos; the tokenizer adds none
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).to(torch.bfloat16).eval()


def build_tiny_klein_transformer(joint_attention_dim: int, seed: int = 0):
    """A Klein-shaped `Flux2Transformer2DModel`: no guidance embedder (Klein's pipeline passes
    `guidance=None`), FLUX.2's channel layout, linear sizes multiples of 64 (bitsandbytes' CPU NF4)."""
    from .tiny import build_tiny_transformer

    return build_tiny_transformer(
        joint_attention_dim,
        seed,
        num_layers=KLEIN_TINY_DOUBLE_BLOCKS,
        num_single_layers=KLEIN_TINY_SINGLE_BLOCKS,
        guidance_embeds=False,
    )


def make_tiny_klein(out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> TinyKleinPaths:
    """Write the distilled and base tiny Klein pipelines and the NF4 DiT below `out_dir` (skipped when
    present). Both pipelines share the text encoder, tokenizer, VAE and scheduler; their DiTs differ."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    out_dir = Path(out_dir)
    paths = TinyKleinPaths(
        distilled=out_dir / "FLUX.2-klein-tiny",
        base=out_dir / "FLUX.2-klein-base-tiny",
        nf4_repo=out_dir / "FLUX.2-klein-tiny-bnb-4bit",
    )
    done_marker = out_dir / ".complete-klein.json"
    if done_marker.exists() and not overwrite:
        return paths

    tokenizer = build_tiny_qwen3_tokenizer()
    text_encoder = build_tiny_qwen3(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=seed + 10,
    )
    joint_dim = 3 * text_encoder.config.hidden_size
    vae = build_tiny_vae(seed=seed + 11)
    for path, distilled, dit_seed in ((paths.distilled, True, seed + 12), (paths.base, False, seed + 13)):
        pipe = Flux2KleinPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=build_tiny_klein_transformer(joint_dim, seed=dit_seed),
            is_distilled=distilled,
        )
        pipe.save_pretrained(path, safe_serialization=True)

    from ._quantization import load_nf4_transformer

    nf4 = load_nf4_transformer(str(paths.distilled), subfolder="transformer", device=torch.device("cpu"))
    nf4.save_pretrained(paths.nf4_repo / "transformer", safe_serialization=True)
    (paths.nf4_repo / "README.md").write_text(
        "Tiny random FLUX.2 [klein] DiT quantized to bitsandbytes NF4 by flux2-split. Random weights: images "
        "are noise.\n"
    )
    done_marker.write_text(json.dumps({"seed": seed, "distilled": paths.distilled.name, "base": paths.base.name}))
    return paths
