"""The encoder engine: the text encoder pruned to what FLUX.2 reads, and the prompt -> embedding step.

Only the decoder layers up to the deepest requested hidden state are loaded (the others' weights are
never read), the final norm is replaced by identity (hidden_states[-1] would otherwise be post-norm),
and the decoder stack is called directly, so the vision tower and the output head are dropped. The
hidden states this gives are bit-identical to those of the full model.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .families import FAMILIES, EncoderFamily, family_for_architectures

log = logging.getLogger(__name__)

# Local files up to this size are hashed whole for the fingerprint; larger ones by their safetensors
# header (names, dtypes, shapes, offsets), so hashing a 48 GB encoder does not delay start-up.
_FULL_HASH_LIMIT = 64 << 20


@dataclass(frozen=True)
class Fingerprint:
    family: str
    weights_id: str
    revision: str
    hidden_layers: tuple[int, ...]
    max_length: int
    dtype: str
    precision: str
    digest: str


def _hash_local_files(folders: list[Path]) -> str:
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder.parent)).encode())
            size = path.stat().st_size
            with path.open("rb") as fh:
                if size <= _FULL_HASH_LIMIT:
                    digest.update(fh.read())
                elif path.suffix == ".safetensors":
                    header_len = int.from_bytes(fh.read(8), "little")
                    digest.update(fh.read(header_len))
                else:
                    digest.update(str(size).encode())
    return "sha256:" + digest.hexdigest()


def _revision_of(model: str, subfolders: list[str], config: Any) -> str:
    root = Path(model)
    if root.is_dir():
        return _hash_local_files([root / sub for sub in subfolders])
    return getattr(config, "_commit_hash", None) or "unknown"


class EncoderEngine:
    """Turns prompts into FLUX.2 prompt embeddings (B, max_length, len(layers) * hidden)."""

    def __init__(
        self,
        family: EncoderFamily,
        tokenizer: Any,
        decoder: Any,
        fingerprint: Fingerprint,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.family = family
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.fingerprint = fingerprint
        self.device = device
        self.dtype = dtype
        self.hidden_size = int(decoder.config.hidden_size)

    @property
    def embedding_dim(self) -> int:
        return len(self.family.hidden_layers) * self.hidden_size

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        revision: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.bfloat16,
        text_encoder_subfolder: str = "text_encoder",
        tokenizer_subfolder: str = "tokenizer",
        family: str | None = None,
    ) -> EncoderEngine:
        """Load from a hub repo id (black-forest-labs/FLUX.2-dev) or a local folder of the same layout."""
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        config = AutoConfig.from_pretrained(model, subfolder=text_encoder_subfolder, revision=revision)
        fam = FAMILIES[family] if family else family_for_architectures(getattr(config, "architectures", None))
        text_config = fam.text_config(config)
        deepest = max(fam.hidden_layers)
        if text_config.num_hidden_layers < deepest:
            raise ValueError(
                f"{model} has {text_config.num_hidden_layers} decoder layers; FLUX.2 reads layer {deepest}"
            )
        text_config.num_hidden_layers = deepest  # layers past the deepest one are never loaded
        model_cls = getattr(transformers, fam.model_class)
        full = model_cls.from_pretrained(
            model,
            subfolder=text_encoder_subfolder,
            revision=revision,
            config=config,
            dtype=dtype,
            device_map=str(device),
        )
        decoder = fam.decoder(full)
        decoder.norm = torch.nn.Identity()
        del full  # drops the vision tower and the output head
        gc.collect()
        decoder.eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(model, subfolder=tokenizer_subfolder, revision=revision)

        dtype_name = str(dtype).removeprefix("torch.")
        revision_id = _revision_of(model, [text_encoder_subfolder, tokenizer_subfolder], config)
        digest_fields = {
            "recipe": fam.recipe_digest(),
            "revision": revision_id,
            "weights_id": model,
            "dtype": dtype_name,
            "precision": "bf16" if dtype == torch.bfloat16 else dtype_name,
        }
        fingerprint = Fingerprint(
            family=fam.name,
            weights_id=model,
            revision=revision_id,
            hidden_layers=fam.hidden_layers,
            max_length=fam.max_length,
            dtype=dtype_name,
            precision=digest_fields["precision"],
            digest=hashlib.sha256(json.dumps(digest_fields, sort_keys=True).encode()).hexdigest(),
        )
        log.info("loaded %s (%s, layers %s) on %s", model, fam.name, list(fam.hidden_layers), device)
        return cls(fam, tokenizer, decoder, fingerprint, device, dtype)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.family.tokenize(self.tokenizer, prompts)

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Embeddings for `prompts` as a CPU tensor in the engine dtype."""
        inputs = self.tokenize(prompts)
        return self.forward(inputs["input_ids"], inputs["attention_mask"])

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.decoder(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            output_hidden_states=True,
            use_cache=False,
        )
        stacked = torch.stack([output.hidden_states[k] for k in self.family.hidden_layers], dim=1)
        batch, channels, seq_len, hidden = stacked.shape
        embeds = stacked.to(self.dtype).permute(0, 2, 1, 3).reshape(batch, seq_len, channels * hidden)
        return embeds.to("cpu")
