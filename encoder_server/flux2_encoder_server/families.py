"""Text-encoder families FLUX.2 uses: how each one turns prompts into token ids, which hidden states
it stacks, and where its decoder stack lives. The engine is family-agnostic; this table is the only
place that knows Mistral from Qwen."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# FLUX.2's system message, exactly as black-forest-labs/flux2 and diffusers' Flux2Pipeline send it
# (diffusers.pipelines.flux2.system_messages.SYSTEM_MESSAGE; a test keeps the two equal).
FLUX2_SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on "
    "object relationships, object\nattribution and actions without speculation."
)


@dataclass(frozen=True)
class EncoderFamily:
    name: str
    #: transformers class of the checkpoint in the `text_encoder/` folder.
    model_class: str
    hidden_layers: tuple[int, ...]
    max_length: int
    system_message: str | None
    #: Prefixes of the decoder stack's tensors in the checkpoint, in the layouts transformers writes
    #: (Mistral3: the current one, then the legacy one transformers 5 still saves; see weights.py).
    checkpoint_prefixes: tuple[str, ...] = ("model.",)

    def text_config(self, config: Any) -> Any:
        """The config object holding `num_hidden_layers` of the decoder stack."""
        return config.text_config if self.name == "mistral3" else config

    def decoder(self, model: Any) -> Any:
        """The bare decoder stack (embeddings, layers, final norm): no vision tower, no output head."""
        return model.model.language_model if self.name == "mistral3" else model.model

    def tokenize(self, tokenizer: Any, prompts: Sequence[str]) -> dict[str, Any]:
        """Token ids and attention masks, padded/truncated to max_length, as diffusers builds them."""
        if self.name == "mistral3":
            # Flux2Pipeline._get_mistral_3_small_prompt_embeds: one batched chat-template call.
            messages = [
                [
                    {"role": "system", "content": [{"type": "text", "text": self.system_message}]},
                    {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]},
                ]
                for prompt in prompts
            ]
            return tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=False,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
            )
        # Flux2KleinPipeline._get_qwen3_prompt_embeds (FLUX.2 [klein]): render each prompt alone with the
        # Qwen3 chat template (no system message, generation prompt, thinking off), then tokenize it alone,
        # padded and truncated to max_length. tests/test_klein.py holds the bytes to diffusers'.
        import torch

        ids, masks = [], []
        for prompt in prompts:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            enc = tokenizer(
                text, return_tensors="pt", padding="max_length", truncation=True, max_length=self.max_length
            )
            ids.append(enc["input_ids"])
            masks.append(enc["attention_mask"])
        return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}

    def recipe_digest(self) -> str:
        """Hash of everything besides the weights that decides the output bytes."""
        recipe = {
            "family": self.name,
            "layers": list(self.hidden_layers),
            "max_length": self.max_length,
            "system_message": self.system_message,
        }
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


FAMILIES: dict[str, EncoderFamily] = {
    "mistral3": EncoderFamily(
        name="mistral3",
        model_class="Mistral3ForConditionalGeneration",
        hidden_layers=(10, 20, 30),
        max_length=512,
        system_message=FLUX2_SYSTEM_MESSAGE,
        checkpoint_prefixes=("model.language_model.", "language_model.model."),
    ),
    "qwen3": EncoderFamily(
        name="qwen3",
        model_class="Qwen3ForCausalLM",
        hidden_layers=(9, 18, 27),
        max_length=512,
        system_message=None,
    ),
}


def family_for_architectures(architectures: Sequence[str] | None, model_type: str | None = None) -> EncoderFamily:
    """The family of a text encoder from its config's `architectures` (e.g. ["Qwen3ForCausalLM"] in a
    FLUX.2 [klein] `text_encoder/config.json`), or from its `model_type` where a config lists none."""
    for family in FAMILIES.values():
        if architectures and family.model_class in architectures:
            return family
    if not architectures and model_type in FAMILIES:
        return FAMILIES[model_type]
    known = ", ".join(f"{f.model_class} ({f.name})" for f in FAMILIES.values())
    raise ValueError(f"text encoder architectures {list(architectures or [])} are not supported; known: {known}")
