"""The v1 contract: fresh stubs, health, Info, and the client's refusal of bad streams."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import grpc
import pytest
import torch
from flux2_client.remote import FingerprintMismatchError, RemoteEncoderError, RemoteTextEncoder
from flux2_encoder_server.testing import ServerThread, local_settings
from flux2split_proto import SERVICE_NAME, codec, generate
from flux2split_proto.v1 import encoder_pb2 as pb
from flux2split_proto.v1 import encoder_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st


def test_committed_stubs_are_fresh():
    assert generate.stale_files() == []


def test_stale_stubs_are_detected(tmp_path: Path):
    root = tmp_path / "proto"
    shutil.copytree(generate.PROTO_ROOT / "flux2split_proto", root / "flux2split_proto")
    proto = root / "flux2split_proto" / "v1" / "encoder.proto"
    proto.write_text(proto.read_text() + "\nmessage AddedLater { int32 x = 1; }\n")
    stale = generate.stale_files(root)
    assert "flux2split_proto/v1/encoder_pb2.py" in stale


def test_health_and_info(server, engine):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    with RemoteTextEncoder(server.target) as enc:
        info = enc.info()
    assert info.api_version == "v1"
    assert info.embedding_dim == 192
    assert info.fingerprint.digest == engine.fingerprint.digest
    assert list(info.fingerprint.hidden_layers) == [10, 20, 30]
    assert info.fingerprint.max_length == 512
    assert info.fingerprint.dtype == pb.DTYPE_BFLOAT16
    assert info.fingerprint.revision.startswith("sha256:")


def test_not_serving_until_loaded(tiny, engine):
    release = threading.Event()

    def slow_factory(_settings):
        release.wait(30)
        return engine

    thread = ServerThread(local_settings(str(tiny.pipeline)), slow_factory).start(load=False)
    try:
        future = asyncio.run_coroutine_threadsafe(thread.server.load(), thread.loop)
        with grpc.insecure_channel(thread.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with RemoteTextEncoder(thread.target) as enc, pytest.raises(RemoteEncoderError) as err:
                enc.encode("too early")
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            release.set()
            future.result(30)
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        thread.stop()


def test_fingerprint_pinning(server, engine):
    with RemoteTextEncoder(server.target, expected_fingerprint=engine.fingerprint.digest) as enc:
        assert enc.encode("ok").fingerprint.digest == engine.fingerprint.digest
    with (
        RemoteTextEncoder(server.target, expected_fingerprint="0" * 64) as enc,
        pytest.raises(FingerprintMismatchError, match="does not match the served model"),
    ):
        enc.encode("wrong model")


class _CorruptingContext:
    """The servicer's context, but the second chunk written has one byte flipped."""

    def __init__(self, context):
        self._context = context
        self._chunks = 0

    def __getattr__(self, name):
        return getattr(self._context, name)

    async def write(self, response):
        if isinstance(response, bytes):  # the servicer writes chunks as ready wire bytes
            response = pb.EncodeResponse.FromString(response)
        if response.WhichOneof("part") == "chunk":
            self._chunks += 1
            if self._chunks == 2:
                data = bytearray(response.chunk.data)
                data[7] ^= 0x40
                response = pb.EncodeResponse(chunk=pb.TensorChunk(offset=response.chunk.offset, data=bytes(data)))
        await self._context.write(response)


class _CorruptingService:
    """Wraps the real servicer and flips one byte of the second chunk, as a bad link would."""

    def __init__(self, inner):
        self.inner = inner

    async def Encode(self, request, context):
        await self.inner.Encode(request, _CorruptingContext(context))

    async def Info(self, request, context):
        return await self.inner.Info(request, context)

    async def Upsample(self, request, context):
        return await self.inner.Upsample(request, context)


def test_corrupted_chunk_is_refused(tiny, engine, monkeypatch):
    from flux2_encoder_server import server as server_module

    original = server_module.TextEncoderService
    monkeypatch.setattr(server_module, "TextEncoderService", lambda core: _CorruptingService(original(core)))
    thread = ServerThread(local_settings(str(tiny.pipeline), chunk_bytes=64 * 1024), lambda _s: engine).start()
    try:
        with RemoteTextEncoder(thread.target) as enc, pytest.raises(codec.ChecksumMismatchError):
            enc.encode("corrupt me")
    finally:
        thread.stop()


def test_chunks_stay_under_default_limit(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TextEncoderStub(channel)
        sizes = [r.ByteSize() for r in stub.Encode(pb.EncodeRequest(prompts=["a"] * 3), timeout=30)]
    assert max(sizes) <= 4 * 1024 * 1024
    assert len(sizes) > 1


def test_codec_refuses_truncated_and_inconsistent_streams():
    tensor = torch.randn(2, 8, 6).to(torch.bfloat16)
    payload = codec.serialize(tensor)
    header = pb.EncodeResponse(header=payload.header())
    chunks = list(codec.iter_chunks(payload.data, chunk_bytes=40))
    _, back = codec.assemble([header, *chunks])
    assert torch.equal(back, tensor)
    with pytest.raises(codec.IncompleteStreamError):
        codec.assemble([header, *chunks[:-1]])
    with pytest.raises(codec.IncompleteStreamError):
        codec.assemble([header, chunks[1]])
    bad = pb.EncodeResponse(header=payload.header())
    bad.header.shape[0] = 3
    with pytest.raises(codec.WireError, match="does not match shape"):
        codec.assemble([bad, *chunks])
    with pytest.raises(codec.WireError, match="exceeds the client limit"):
        codec.assemble([header, *chunks], max_bytes=10)


# Random bytes a little over 2^21, so chunk lengths and offsets need three-byte varints.
_BIG = torch.randint(0, 256, ((1 << 21) + 4099,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
_BIG_VIEW = memoryview(_BIG.numpy()).cast("B")
_EDGES = [0, 1, 127, 128, 16383, 16384, 1 << 20, (1 << 21) - 1, 1 << 21, (1 << 21) + 1, len(_BIG_VIEW)]


@settings(max_examples=80, deadline=None)
@given(
    a=st.one_of(st.sampled_from(_EDGES), st.integers(0, len(_BIG_VIEW))),
    b=st.one_of(st.sampled_from(_EDGES), st.integers(0, len(_BIG_VIEW))),
)
def test_preserialized_chunk_is_what_protobuf_writes(a: int, b: int):
    offset, end = min(a, b), max(a, b)
    wire = codec.chunk_response_bytes(_BIG_VIEW, offset, end)
    built = pb.EncodeResponse(chunk=pb.TensorChunk(offset=offset, data=bytes(_BIG_VIEW[offset:end])))
    assert wire == built.SerializeToString()
    parsed = pb.EncodeResponse.FromString(wire)
    assert parsed.WhichOneof("part") == "chunk"
    assert parsed.chunk.offset == offset and parsed.chunk.data == bytes(_BIG_VIEW[offset:end])


def test_preserialized_chunks_reassemble_and_refuse_bad_ranges():
    tensor = torch.randn(3, 8, 6).to(torch.bfloat16)
    payload = codec.serialize(tensor)
    wires = list(codec.iter_chunk_response_bytes(payload.data, chunk_bytes=40))
    assert [w for w in wires] == [m.SerializeToString() for m in codec.iter_chunks(payload.data, chunk_bytes=40)]
    header = pb.EncodeResponse(header=payload.header())
    _, back = codec.assemble([header, *(pb.EncodeResponse.FromString(w) for w in wires)])
    assert torch.equal(back, tensor)
    for offset, end in [(-1, 4), (5, 4), (0, len(payload.data) + 1)]:
        with pytest.raises(ValueError, match="outside a payload"):
            codec.chunk_response_bytes(payload.data, offset, end)
    with pytest.raises(ValueError, match="chunk_bytes"):
        list(codec.iter_chunk_response_bytes(payload.data, chunk_bytes=0))


@pytest.mark.parametrize(
    "prompts, needle",
    [
        ([], "at least one prompt"),
        (["x"] * 65, "max_prompts_per_request=64"),
        (["x" * 20001], "max_prompt_chars"),
    ],
)
def test_bad_requests_are_invalid_argument(server, prompts, needle):
    with RemoteTextEncoder(server.target) as enc, pytest.raises(RemoteEncoderError) as err:
        enc.encode(prompts)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.message
    with RemoteTextEncoder(server.target) as enc:  # and the server keeps serving
        assert enc.encode("still fine").prompt_embeds.shape[0] == 1
