"""What `EncoderPool.encode` returns must describe the tensor it returns: shape, byte length, dtype and
checksum of exactly those bytes, with the client cache's hits marked per row."""

from __future__ import annotations

import hashlib

import torch
from flux2_client.cache import EmbeddingCache
from flux2_client.endpoints import EncoderPool
from flux2split_proto.v1 import encoder_pb2 as pb


def raw_sha256(tensor: torch.Tensor) -> bytes:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).digest()


def test_pool_header_describes_rows_partly_from_the_client_cache(server, engine, tmp_path):
    cache = EmbeddingCache(tmp_path)
    with EncoderPool([server.target], cache=cache) as pool:
        pool.encode(["a", "b"])  # now cached
        mixed = pool.encode(["a", "c", "b"])
        cached = pool.encode(["b", "a"])
    assert torch.equal(mixed.prompt_embeds, engine.encode(["a", "c", "b"]))
    assert list(mixed.header.cache_hit) == [True, False, True]
    for result in (mixed, cached):
        header, tensor = result.header, result.prompt_embeds
        assert list(header.shape) == list(tensor.shape)
        assert header.dtype == pb.DTYPE_BFLOAT16
        assert header.byte_length == tensor.numel() * tensor.element_size()
        assert header.sha256 == raw_sha256(tensor)
