"""Property tests over the Encode request fields, sent as hand-built protobuf bytes so that what the
Python protobuf runtime refuses to serialize (invalid UTF-8, lone surrogates) still reaches the server.

Every request gets exactly the documented answer: OK with one row per prompt, or INVALID_ARGUMENT;
never INTERNAL, and the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
from flux2_encoder_server.testing import FakeEngine, ServerThread, local_settings
from flux2split_proto import SERVICE_NAME, codec
from flux2split_proto.v1 import encoder_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MAX_PROMPTS = 3
MAX_CHARS = 64
ENCODE = f"/{SERVICE_NAME}/Encode"


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64 go on the wire as 10-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


# A prompt is (wire bytes, is valid UTF-8, length in characters).
valid_text = st.text(st.characters(codec="utf-8"), max_size=MAX_CHARS + 8).map(
    lambda s: (s.encode("utf-8"), True, len(s))
)
lone_surrogate = st.tuples(st.text(max_size=8), st.integers(0xD800, 0xDFFF), st.text(max_size=8)).map(
    lambda t: ((t[0] + chr(t[1]) + t[2]).encode("utf-8", "surrogatepass"), False, 0)
)
raw_invalid = st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"abc\x80", b"\xf8\x88\x80\x80\x80"]).map(
    lambda b: (b, False, 0)
)
huge = st.integers(MAX_CHARS + 1, 200_000).map(lambda n: (b"x" * n, True, n))
prompt = st.one_of(valid_text, valid_text, valid_text, lone_surrogate, raw_invalid, huge)
# Field numbers past EncodeRequest's own (1-7; 7 is the upsample option).
unknown_field = st.one_of(
    st.tuples(st.integers(8, 500), st.integers(0, 2**63)).map(lambda t: _int_field(*t)),
    st.tuples(st.integers(8, 500), st.binary(max_size=32)).map(lambda t: _len_field(*t)),
)


short_text = st.text(st.characters(codec="utf-8"), max_size=MAX_CHARS).map(lambda s: (s.encode("utf-8"), True, len(s)))


@st.composite
def encode_requests(draw):
    if draw(st.booleans()):  # half the cases are well-formed, so the OK path is exercised as much
        prompts = draw(st.lists(short_text, min_size=1, max_size=MAX_PROMPTS))
        fmt = draw(st.one_of(st.none(), st.integers(0, 2)))
        request_id = draw(st.one_of(st.none(), short_text))
    else:
        prompts = draw(st.lists(prompt, max_size=MAX_PROMPTS + 2))
        fmt = draw(st.one_of(st.none(), st.integers(-3, 6)))
        request_id = draw(st.one_of(st.none(), valid_text, lone_surrogate))
    unknown = draw(st.lists(unknown_field, max_size=3))
    parts = [_len_field(1, data) for data, _, _ in prompts]
    if fmt is not None:
        parts.append(_int_field(2, fmt))
    if request_id is not None:
        parts.append(_len_field(4, request_id[0]))
    parts.append(_int_field(5, draw(st.integers(0, 1))))
    parts.extend(unknown)
    draw(st.randoms()).shuffle(parts)  # protobuf fields may come in any order
    valid = (
        all(ok for _, ok, _ in prompts)
        and (request_id is None or request_id[1])
        and fmt in (None, 0, 1, 2)
        and 1 <= len(prompts) <= MAX_PROMPTS
        and all(chars <= MAX_CHARS for _, _, chars in prompts)
    )
    return b"".join(parts), valid, len(prompts)


@pytest.fixture(scope="module")
def fuzz_server(engine):
    """Fixed rows (no decoder time), but every batch goes through the real engine's tokenizer and chat
    template first: that is where the text is read, so whatever text would break the engine still does."""
    settings_ = local_settings(max_prompts_per_request=MAX_PROMPTS, max_prompt_chars=MAX_CHARS)
    thread = ServerThread(settings_, lambda _s: FakeEngine(tokenize=engine.tokenize)).start()
    yield thread
    thread.stop()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=encode_requests())
def test_any_request_gets_the_documented_answer(fuzz_server, case):
    raw, valid, count = case
    with grpc.insecure_channel(fuzz_server.target) as channel:
        call = channel.unary_stream(ENCODE, request_serializer=None, response_deserializer=pb.EncodeResponse.FromString)
        try:
            header, tensor = codec.assemble(call(raw, timeout=60))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
            assert not valid, exc.details()
            assert exc.details()  # the message names the field
            return
    assert valid
    assert tuple(tensor.shape) == (count, 512, 192)
    assert len(header.cache_hit) == count


def test_named_invalid_inputs(fuzz_server):
    cases = {
        "no prompts": (b"", "at least one prompt"),
        "too many": (b"".join(_len_field(1, b"x") for _ in range(MAX_PROMPTS + 1)), "max_prompts_per_request=3"),
        "huge": (_len_field(1, b"y" * 1_000_000), "max_prompt_chars=64"),
        "lone surrogate": (_len_field(1, "a\ud800b".encode("utf-8", "surrogatepass")), "EncodeRequest"),
        "unknown format": (_len_field(1, b"ok") + _int_field(2, 99), "format"),
    }
    with grpc.insecure_channel(fuzz_server.target) as channel:
        call = channel.unary_stream(ENCODE, request_serializer=None, response_deserializer=pb.EncodeResponse.FromString)
        for name, (raw, needle) in cases.items():
            with pytest.raises(grpc.RpcError) as err:
                list(call(raw, timeout=30))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert needle in err.value.details(), (name, err.value.details())
        # Unknown fields are ignored (forward compatibility of the v1 contract).
        with_unknown = _len_field(1, b"ok") + _int_field(77, 5) + _len_field(90, b"??")
        _, tensor = codec.assemble(call(with_unknown, timeout=30))
        assert tensor.shape[0] == 1
        info = channel.unary_unary(f"/{SERVICE_NAME}/Info", request_serializer=None)
        with pytest.raises(grpc.RpcError) as err:
            info(b"\x0a\x01", timeout=10)  # a truncated field
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    from flux2_client.remote import RemoteTextEncoder

    with RemoteTextEncoder(fuzz_server.target) as enc:  # still serving
        assert enc.encode("after the fuzzing").prompt_embeds.shape == (1, 512, 192)
    internal = {"frontend": "grpc", "code": "INTERNAL"}
    assert fuzz_server.server.metrics.value("flux2_encoder_requests_total", internal) == 0
