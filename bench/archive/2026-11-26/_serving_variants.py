"""Serving-path variants for side-by-side benchmarks (bench only, never used by the server).

`legacy_chunks()` puts back the chunk path the server used before pre-serialized chunks: a protobuf
message per chunk built from `bytes(memoryview slice)` and serialized by protobuf (three payload copies
instead of one). The servicer's serializer still accepts message objects, so only the codec call changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from flux2split_proto import codec
from flux2split_proto.v1 import encoder_pb2 as pb


def _legacy_chunk(data: memoryview, offset: int, end: int) -> pb.EncodeResponse:  # type: ignore[return]
    return pb.EncodeResponse(chunk=pb.TensorChunk(offset=offset, data=bytes(data[offset:end])))


@contextlib.contextmanager
def legacy_chunks() -> Iterator[None]:
    original = codec.chunk_response_bytes
    codec.chunk_response_bytes = _legacy_chunk  # type: ignore[assignment]
    try:
        yield
    finally:
        codec.chunk_response_bytes = original  # type: ignore[assignment]
