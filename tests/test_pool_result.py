"""What `EncoderPool.encode` returns must describe the tensor it returns: per-row cache hits, the model,
and a checksum only when it is the checksum of exactly these bytes (one server response, every row)."""

from __future__ import annotations

import hashlib

import torch
from flux2_client.cache import EmbeddingCache
from flux2_client.endpoints import EncoderPool


def raw_sha256(tensor: torch.Tensor) -> bytes:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).digest()


def test_pool_result_describes_rows_partly_or_wholly_from_the_client_cache(server, engine, tmp_path):
    cache = EmbeddingCache(tmp_path)
    with EncoderPool([server.target], cache=cache) as pool:
        fresh = pool.encode(["a", "b"])  # now cached
        mixed = pool.encode(["a", "c", "b"])
        cached = pool.encode(["b", "a"])

    # One server response answered every row: its verified checksum is that of the returned bytes.
    assert fresh.cache_hit == (False, False)
    assert fresh.sha256 == raw_sha256(fresh.prompt_embeds)
    assert fresh.served_by == server.target
    assert fresh.header is not None and list(fresh.header.shape) == list(fresh.prompt_embeds.shape)

    # Rows from the cache and from the server: true rows and hits, and no checksum or header that
    # would describe other bytes than these.
    assert torch.equal(mixed.prompt_embeds, engine.encode(["a", "c", "b"]))
    assert mixed.cache_hit == (True, False, True)
    assert mixed.sha256 is None and mixed.header is None
    assert mixed.served_by == server.target

    # Every row from the cache: no server answered, and the model is still named.
    assert torch.equal(cached.prompt_embeds, engine.encode(["b", "a"]))
    assert cached.prompt_embeds.dtype == torch.bfloat16
    assert cached.cache_hit == (True, True)
    assert cached.sha256 is None and cached.header is None and cached.served_by is None
    for result in (fresh, mixed, cached):
        assert result.fingerprint.digest == engine.fingerprint.digest
        assert result.fingerprint.weights_id == engine.fingerprint.weights_id
