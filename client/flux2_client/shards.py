"""A folder of embedding shards: the writer bulk encoding fills, and the reader a training loop uses.

    shard-00000.safetensors   "prompt_embeds" (n, 512, D) bf16; metadata: the model digest and the
                              n captions (JSON), so every shard describes itself
    index.json                the model fingerprint, the shards, and caption -> [shard, row]

Shards are written to a temporary name and renamed, and the index is rewritten (same way) after each
shard, so an interrupted run leaves only complete shards; a shard renamed just before a crash, before the
index caught up, is adopted from its own metadata when the folder is opened again.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flux2split_proto import shared
from flux2split_proto.v1 import encoder_pb2 as pb

if TYPE_CHECKING:
    import torch

__all__ = ["INDEX_NAME", "EmbeddingShards", "ShardFingerprintError", "ShardWriter"]

INDEX_NAME = "index.json"
INDEX_FORMAT = "flux2-split/embedding-shards/v1"
TENSOR_KEY = "prompt_embeds"
META_FINGERPRINT = "flux2split.fingerprint"
META_CAPTIONS = "flux2split.captions"
_SHARD_RE = re.compile(r"^shard-(\d+)\.safetensors$")


class ShardFingerprintError(ValueError):
    """Shards made by another model than the one expected (or than the server now serves)."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """The writing side: the captions already saved (`captions`: caption -> (shard, row)), and atomic
    shard + index writes. Opening a folder of another model's shards raises `ShardFingerprintError`."""

    def __init__(self, folder: str | Path, fingerprint: pb.ModelFingerprint):
        self.folder = folder = Path(folder)
        self.fingerprint = fingerprint
        self.digest = fingerprint.digest
        self.shards: dict[str, int] = {}
        self.captions: dict[str, tuple[str, int]] = {}
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob("*.tmp"):  # a write that was cut off
            leftover.unlink()
        index_path = folder / INDEX_NAME
        if index_path.exists():
            index = json.loads(index_path.read_text(encoding="utf-8"))
            theirs = index.get("fingerprint", {}).get("digest")
            if theirs != self.digest:
                raise ShardFingerprintError(
                    f"{folder} holds embeddings of model digest {str(theirs)[:16]}…; this server serves "
                    f"{fingerprint.weights_id} (digest {self.digest[:16]}…): use another --out"
                )
            self.shards = dict(index["shards"])
            self.captions = {c: (s, r) for c, (s, r) in index["captions"].items()}
        self.next_number = 0
        adopted = False
        from safetensors import safe_open

        for path in sorted(folder.glob("shard-*.safetensors")):
            match = _SHARD_RE.match(path.name)
            if not match:
                continue
            self.next_number = max(self.next_number, int(match.group(1)) + 1)
            if path.name in self.shards:
                continue
            # Renamed into place, but the run stopped before the index was rewritten: adopt it.
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
            if meta.get(META_FINGERPRINT) != self.digest:
                raise ShardFingerprintError(f"{path} was made by model digest {meta.get(META_FINGERPRINT)}")
            shard_captions = json.loads(meta[META_CAPTIONS])
            self.shards[path.name] = len(shard_captions)
            for row, caption in enumerate(shard_captions):
                self.captions.setdefault(caption, (path.name, row))
            adopted = True
        if adopted or not index_path.exists():
            self._write_index()

    def write_shard(self, rows: Sequence[tuple[str, torch.Tensor]]) -> str:
        """Save (caption, (L, D) row) pairs as the next shard; returns its file name."""
        import torch
        from safetensors.torch import save

        name = f"shard-{self.next_number:05d}.safetensors"
        self.next_number += 1
        captions = [caption for caption, _ in rows]
        tensor = torch.stack([row for _, row in rows]).contiguous()
        metadata = {META_FINGERPRINT: self.digest, META_CAPTIONS: json.dumps(captions, ensure_ascii=False)}
        _atomic_write(self.folder / name, save({TENSOR_KEY: tensor}, metadata=metadata))
        self.shards[name] = len(rows)
        for row, caption in enumerate(captions):
            self.captions[caption] = (name, row)
        self._write_index()
        return name

    def _write_index(self) -> None:
        index = {
            "format": INDEX_FORMAT,
            "fingerprint": shared.fingerprint_to_dict(self.fingerprint),
            "shards": self.shards,
            "captions": {c: list(loc) for c, loc in self.captions.items()},
        }
        _atomic_write(self.folder / INDEX_NAME, json.dumps(index, ensure_ascii=False).encode("utf-8"))


class EmbeddingShards:
    """Read side of a shard folder: `(prompt_embeds, text_ids)` for a batch of captions.

    The shards are memory-mapped (safetensors `safe_open`); a batch reads only its rows and lands on the
    CPU (or `device`, when given), so the embeddings of a whole data set never sit on the GPU.
    `expected_fingerprint` (a model digest) refuses shards of any other model.
    """

    def __init__(self, folder: str | Path, *, expected_fingerprint: str | None = None):
        self.folder = Path(folder)
        index = json.loads((self.folder / INDEX_NAME).read_text(encoding="utf-8"))
        if index.get("format") != INDEX_FORMAT:
            raise ValueError(f"{self.folder / INDEX_NAME}: not a {INDEX_FORMAT} index")
        self.fingerprint: pb.ModelFingerprint = shared.fingerprint_from_dict(index["fingerprint"])
        self.digest = self.fingerprint.digest
        if expected_fingerprint is not None and self.digest != expected_fingerprint:
            raise ShardFingerprintError(
                f"{self.folder} holds embeddings of {self.fingerprint.weights_id} (digest "
                f"{self.digest[:16]}…), expected digest {expected_fingerprint[:16]}…"
            )
        self._locations: dict[str, tuple[str, int]] = {c: (s, r) for c, (s, r) in index["captions"].items()}
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._locations)

    def __contains__(self, caption: object) -> bool:
        return caption in self._locations

    @property
    def captions(self) -> list[str]:
        return list(self._locations)

    def _shard(self, name: str) -> Any:
        handle = self._handles.get(name)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(self.folder / name), framework="pt")
            meta = handle.metadata() or {}
            if meta.get(META_FINGERPRINT) != self.digest:
                raise ShardFingerprintError(
                    f"{self.folder / name}: made by model digest {str(meta.get(META_FINGERPRINT))[:16]}…, "
                    f"the index says {self.digest[:16]}…"
                )
            self._handles[name] = handle
        return handle

    def prompt_embeds(self, captions: str | Sequence[str]) -> torch.Tensor:
        import torch

        caption_list = [captions] if isinstance(captions, str) else list(captions)
        rows = []
        for caption in caption_list:
            location = self._locations.get(caption)
            if location is None:
                raise KeyError(f"caption not in {self.folder}: {caption[:80]!r}")
            name, row = location
            rows.append(self._shard(name).get_slice(TENSOR_KEY)[row : row + 1])
        return torch.cat(rows, dim=0)

    def get(
        self, captions: str | Sequence[str], *, device: str | torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(prompt_embeds, text_ids)` as `compute_remote_text_embeddings` returns them."""
        from .training import text_ids_for

        prompt_embeds = self.prompt_embeds(captions)
        text_ids = text_ids_for(prompt_embeds)
        if device is not None:
            prompt_embeds, text_ids = prompt_embeds.to(device), text_ids.to(device)
        return prompt_embeds, text_ids
