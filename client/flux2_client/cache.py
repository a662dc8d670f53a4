"""On-disk cache of received prompt embeddings, one safetensors file per (model fingerprint, prompt).

Keyed by the encoder's model digest and the exact prompt text, so embeddings from another model (or a
retrained one) are never served. Files are safetensors (no pickle); writes go to a temporary file and
are renamed into place, so a crash never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from flux2split_proto.v1 import encoder_pb2 as pb

if TYPE_CHECKING:
    import torch

_TENSOR_KEY = "prompt_embeds"


class EmbeddingCache:
    """`get`/`put` embeddings of single prompts (a (1, L, D) tensor each) under `root`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, digest: str, prompt: str) -> Path:
        if not digest:
            raise ValueError("digest: a model fingerprint digest is needed to key the cache")
        key = hashlib.sha256(digest.encode() + b"\0" + prompt.encode()).hexdigest()
        return self.root / hashlib.sha256(digest.encode()).hexdigest()[:16] / f"{key}.safetensors"

    def get(self, digest: str, prompt: str) -> tuple[torch.Tensor, pb.ModelFingerprint] | None:
        from safetensors import safe_open

        path = self.path(digest, prompt)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensor = f.get_tensor(_TENSOR_KEY)
        except Exception:
            return None  # unreadable entry: treat as a miss, it is rewritten on the next put
        # The key is a hash: check the stored prompt and digest so a collision can never serve a wrong entry.
        if meta.get("prompt") != prompt or meta.get("digest") != digest:
            return None
        fingerprint = pb.ModelFingerprint.FromString(bytes.fromhex(meta.get("fingerprint", "")))
        return tensor, fingerprint

    def put(self, fingerprint: pb.ModelFingerprint, prompt: str, tensor: torch.Tensor) -> Path:
        from safetensors.torch import save_file

        path = self.path(fingerprint.digest, prompt)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"prompt": prompt, "digest": fingerprint.digest, "fingerprint": fingerprint.SerializeToString().hex()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({_TENSOR_KEY: tensor.detach().contiguous().cpu()}, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path
