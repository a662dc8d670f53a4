"""Embeddings from a real server equal diffusers' Flux2Pipeline encode path on the full text encoder."""

from __future__ import annotations

import pytest
import torch
from flux2_client.remote import RemoteTextEncoder
from flux2split_proto.v1 import encoder_pb2 as pb

LONG = "a meticulously detailed scene, " * 120  # far beyond 512 tokens: truncated

PROMPTS = {
    "plain": "a red fox sleeping in fresh snow",
    "img_token": "[IMG]a cat[IMG] next to [IMG] a dog",
    "non_ascii": "un café à Paris — 東京の夜景, emoji 🦊, Ελληνικά",
    "empty": "",
    "long": LONG,
}


def reference(pipe, prompts: list[str]) -> torch.Tensor:
    embeds, text_ids = pipe.encode_prompt(prompt=prompts, device=torch.device("cpu"))
    assert text_ids.shape[:2] == embeds.shape[:2]
    return embeds


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_single_prompt_is_bit_identical(server, reference_pipe, name):
    with RemoteTextEncoder(server.target) as enc:
        got = enc.encode(PROMPTS[name]).prompt_embeds
    want = reference(reference_pipe, [PROMPTS[name]])
    assert got.dtype == want.dtype == torch.bfloat16
    assert got.shape == want.shape == (1, 512, 192)
    assert torch.equal(got, want)


def test_batch_is_bit_identical(server, reference_pipe):
    prompts = list(PROMPTS.values())
    with RemoteTextEncoder(server.target) as enc:
        got = enc.encode(prompts).prompt_embeds
    want = reference(reference_pipe, prompts)
    assert torch.equal(got, want)
    # Rows really differ per prompt, so equality above is not a constant tensor.
    assert not torch.equal(got[0], got[1])


def test_long_prompt_is_truncated_like_diffusers(engine, reference_pipe):
    ids = engine.tokenize([LONG])["input_ids"]
    assert ids.shape == (1, 512)
    assert (ids != engine.tokenizer.pad_token_id).all(), "a long prompt fills all 512 positions"
    longer = LONG + " and then something completely different at the end"
    assert torch.equal(engine.encode([longer]), reference(reference_pipe, [LONG]))


def test_img_token_removed(engine):
    assert torch.equal(engine.encode(["[IMG]a cat"]), engine.encode(["a cat"]))


def test_safetensors_format_gives_same_tensor(server):
    with RemoteTextEncoder(server.target) as enc:
        raw = enc.encode(["a", "b"]).prompt_embeds
        st = enc.encode(["a", "b"], fmt=pb.TENSOR_FORMAT_SAFETENSORS)
    assert st.header.format == pb.TENSOR_FORMAT_SAFETENSORS
    assert torch.equal(raw, st.prompt_embeds)


def test_engine_is_pruned(engine):
    decoder = engine.decoder
    assert len(decoder.layers) == 30
    assert isinstance(decoder.norm, torch.nn.Identity)
    names = {name for name, _ in decoder.named_modules()}
    assert not any("vision" in n or "lm_head" in n for n in names)


def test_system_message_matches_diffusers():
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from flux2_encoder_server.families import FAMILIES

    assert FAMILIES["mistral3"].system_message == SYSTEM_MESSAGE
