"""FLUX.2 [klein] through the split, against diffusers' `Flux2KleinPipeline` on the tiny Klein models.

Embeddings (engine and real gRPC server) equal `Flux2KleinPipeline.encode_prompt` on the full unpruned
Qwen3 encoder; images from the client (distilled through the planner's streamer, base with classifier-free
guidance through the CLI) equal `Flux2KleinPipeline` with its own local encoder; a mismatched
encoder/DiT pair fails before any weight is loaded.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flux2_client._quantization import load_nf4_transformer
from flux2_client.families import EmbeddingWidthError, check_embedding_width, default_dit, detect_family
from flux2_client.generation import GenerationParams, generate, load_pipeline
from flux2_client.offload import get_block_streamer, get_memory_plan
from flux2_client.remote import RemoteTextEncoder
from flux2_client.tiny_klein import QWEN3_ADDED_TOKENS, TinyKleinPaths
from flux2_encoder_server import EncoderEngine
from flux2_encoder_server.testing import ServerThread, local_settings
from flux2split_proto.v1 import encoder_pb2 as pb
from PIL import Image
from test_embeddings_exact import LONG, PROMPTS

CPU = torch.device("cpu")
PARAMS = GenerationParams(height=64, width=64, num_inference_steps=2, guidance_scale=4.0, seed=5)
IMAGE_PROMPTS = ["a lighthouse at dusk", "two cats on a sofa"]


@pytest.fixture(scope="module")
def klein_server(tiny_klein: TinyKleinPaths, klein_engine: EncoderEngine) -> Iterator[ServerThread]:
    thread = ServerThread(local_settings(str(tiny_klein.distilled)), lambda _s: klein_engine).start()
    yield thread
    thread.stop()


def reference(pipe, prompts: list[str]) -> torch.Tensor:
    embeds, text_ids = pipe.encode_prompt(prompt=prompts, device=CPU)
    assert text_ids.shape[:2] == embeds.shape[:2]
    return embeds


@pytest.fixture(scope="module")
def references(klein_reference):
    """diffusers' embeddings per prompt tuple, each computed once (512-token CPU forwards are not free)."""
    memo: dict[tuple[str, ...], torch.Tensor] = {}

    def get(prompts: list[str]) -> torch.Tensor:
        if tuple(prompts) not in memo:
            memo[tuple(prompts)] = reference(klein_reference, prompts)
        return memo[tuple(prompts)]

    return get


def arrays(images) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.uint8) for im in images]


# --- the tiny models ---------------------------------------------------------------------------------


def test_tokenizer_has_qwen3_template_and_special_tokens(klein_engine):
    tok = klein_engine.tokenizer
    messages = [{"role": "user", "content": "a fox"}]
    head = "<|im_start|>user\na fox<|im_end|>\n<|im_start|>assistant\n"
    render = tok.apply_chat_template
    assert render(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False) == (
        head + "<think>\n\n</think>\n\n"
    )
    assert render(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True) == head
    assert render(messages, tokenize=False, add_generation_prompt=True) == head
    assert tok.bos_token is None and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.padding_side == "right"
    for text, special in QWEN3_ADDED_TOKENS:  # each one token, and only the special ones skipped on decode
        ids = tok(text)["input_ids"]
        assert len(ids) == 1, text
        assert (tok.decode(ids, skip_special_tokens=True) == "") == special, text


def test_klein_folders_are_what_diffusers_expects(tiny_klein):
    index = json.loads((tiny_klein.distilled / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is True
    assert index["text_encoder"] == ["transformers", "Qwen3ForCausalLM"]
    assert json.loads((tiny_klein.base / "model_index.json").read_text())["is_distilled"] is False
    dit = json.loads((tiny_klein.distilled / "transformer" / "config.json").read_text())
    encoder = json.loads((tiny_klein.distilled / "text_encoder" / "config.json").read_text())
    assert dit["guidance_embeds"] is False
    assert dit["joint_attention_dim"] == 3 * encoder["hidden_size"] != 192  # not FLUX.2-dev tiny's width
    assert encoder["num_hidden_layers"] >= 28  # hidden state 27 pre-norm, and a layer + the norm to prune
    nf4 = json.loads((tiny_klein.nf4_repo / "transformer" / "config.json").read_text())
    assert nf4["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


def test_make_tiny_cli_family_klein(tiny_klein, capsys):
    from flux2_client.cli import main

    # The fixture's folder is complete, so this only checks the wiring (nothing is rebuilt).
    assert main(["make-tiny", str(tiny_klein.distilled.parent), "--family", "klein"]) == 0
    assert str(tiny_klein.base) in capsys.readouterr().out


# --- server: embeddings --------------------------------------------------------------------------------


def test_recipe_is_diffusers_klein_recipe():
    from diffusers import Flux2KleinPipeline
    from flux2_encoder_server.families import FAMILIES

    defaults = inspect.signature(Flux2KleinPipeline.encode_prompt).parameters
    qwen3 = FAMILIES["qwen3"]
    assert qwen3.hidden_layers == tuple(defaults["text_encoder_out_layers"].default)
    assert qwen3.max_length == defaults["max_sequence_length"].default
    assert qwen3.model_class == inspect.signature(Flux2KleinPipeline).parameters["text_encoder"].annotation.__name__


def test_engine_is_pruned_qwen3(klein_engine):
    assert klein_engine.family.name == "qwen3" and klein_engine.fingerprint.family == "qwen3"
    decoder = klein_engine.decoder
    assert len(decoder.layers) == 27
    assert isinstance(decoder.norm, torch.nn.Identity)
    assert not any("lm_head" in n for n, _ in decoder.named_modules())
    assert klein_engine.embedding_dim == 3 * 128


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_single_prompt_is_bit_identical(klein_server, references, name):
    with RemoteTextEncoder(klein_server.target) as enc:
        got = enc.encode(PROMPTS[name])
    want = references([PROMPTS[name]])
    assert got.fingerprint.family == "qwen3"
    assert got.prompt_embeds.dtype == want.dtype == torch.bfloat16
    assert got.prompt_embeds.shape == want.shape == (1, 512, 384)
    assert torch.equal(got.prompt_embeds, want)


def test_batch_is_bit_identical(klein_server, references):
    prompts = list(PROMPTS.values())
    want = references(prompts)
    with RemoteTextEncoder(klein_server.target) as enc:
        got = enc.encode(prompts).prompt_embeds
    assert torch.equal(got, want)
    assert not torch.equal(got[0], got[1])  # rows really differ per prompt


def test_long_prompt_is_truncated_like_diffusers(klein_engine, references):
    ids = klein_engine.tokenize([LONG])["input_ids"]
    assert ids.shape == (1, 512)
    assert (ids != klein_engine.tokenizer.pad_token_id).all(), "a long prompt fills all 512 positions"
    longer = LONG + " and then something completely different at the end"
    assert torch.equal(klein_engine.encode([longer]), references([LONG]))


def test_reproducible_mode_never_runs_a_lone_prompt(klein_server, klein_engine):
    """The reproducible mode is family-agnostic: a lone Qwen3 prompt runs padded to a batch of two, and
    its bytes equal the same prompt's row inside a larger batch."""
    before = klein_engine.batch_sizes.copy()
    with RemoteTextEncoder(klein_server.target) as enc:
        alone = enc.encode("a quiet harbour", bypass_cache=True)
        batched = enc.encode(["x", "a quiet harbour"], bypass_cache=True).prompt_embeds
    assert alone.header.batching_mode == pb.BATCHING_MODE_REPRODUCIBLE
    ran = klein_engine.batch_sizes - before
    assert ran and 1 not in ran
    assert torch.equal(alone.prompt_embeds[0], batched[1])


def test_nf4_tier_on_qwen3_is_close(tiny_klein, references):
    """The precision tiers are family-agnostic: the Klein encoder loads layer by layer into NF4."""
    nf4 = EncoderEngine.from_pretrained(str(tiny_klein.distilled), device="cpu", precision="nf4")
    assert {type(m).__name__ for m in nf4.decoder.layers[0].modules()} >= {"Linear4bit"}
    assert nf4.fingerprint.precision == "nf4" and nf4.fingerprint.family == "qwen3"
    want = references([PROMPTS["plain"]]).float()
    got = nf4.encode([PROMPTS["plain"]]).float()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1))
    assert (cosine > 0.9).all() and not torch.equal(got, want), cosine


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU kernels and batch shapes: needs CUDA")
def test_on_cuda_bit_identical_to_klein_pipeline_at_every_batch_size(tiny_klein):
    """On a GPU a lone prompt and a batch run other kernels: the reproducible engine gives diffusers'
    bytes for a batch and the same bytes for a prompt whatever it is batched with."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(
        str(tiny_klein.distilled), transformer=None, vae=None, dtype=torch.bfloat16
    ).to("cuda")
    engine = EncoderEngine.from_pretrained(str(tiny_klein.distilled), device="cuda")
    prompts = list(PROMPTS.values())
    want, _ = pipe.encode_prompt(prompt=prompts, device=torch.device("cuda"))
    assert torch.equal(engine.encode(prompts), want.cpu())
    alone = engine.encode([prompts[0]])
    for size in (2, 3, 8, 32):
        batch = [prompts[0]] + [f"other prompt {i}" for i in range(size - 1)]
        assert torch.equal(engine.encode(batch)[:1], alone)


def test_training_helper_matches_klein_pipeline(klein_server, klein_reference, references):
    """`compute_remote_text_embeddings` serves Klein trainers as is: Flux2KleinPipeline's text ids are
    Flux2Pipeline's (`_prepare_text_ids` is a copy), so (prompt_embeds, text_ids) equal encode_prompt's."""
    from flux2_client.training import compute_remote_text_embeddings

    prompts = list(PROMPTS.values())
    want_embeds = references(prompts)
    # encode_prompt with the embeddings given computes only the text ids, with Flux2KleinPipeline's own code.
    _, want_ids = klein_reference.encode_prompt(prompt=None, prompt_embeds=want_embeds, device=CPU)
    with RemoteTextEncoder(klein_server.target) as enc:
        embeds, text_ids = compute_remote_text_embeddings(prompts, enc, request_prompts=2)
    assert torch.equal(embeds, want_embeds)
    assert text_ids.shape == (len(prompts), 512, 4) and torch.equal(text_ids, want_ids)


# --- client: family detection and the width check --------------------------------------------------------


def test_detect_family(tiny_klein, tiny, tmp_path):
    distilled, base, dev = (detect_family(str(p)) for p in (tiny_klein.distilled, tiny_klein.base, tiny.pipeline))
    assert (distilled.pipeline_class, distilled.is_distilled) == ("Flux2KleinPipeline", True)
    assert (base.pipeline_class, base.is_distilled) == ("Flux2KleinPipeline", False)
    assert dev.pipeline_class == "Flux2Pipeline"
    assert not distilled.uses_cfg(4.0) and base.uses_cfg(4.0) and not base.uses_cfg(1.0) and not dev.uses_cfg(4.0)
    assert base.negative_prompts(["a", "b"], 4.0) == ["", ""] and distilled.negative_prompts(["a"], 4.0) == []
    # No model_index.json: told by the DiT's config (Klein's has no guidance embedder), else FLUX.2-dev.
    assert detect_family(str(tiny_klein.nf4_repo)).is_klein and not detect_family(str(tiny.nf4_repo)).is_klein
    assert detect_family(str(tmp_path), dit=str(tiny_klein.nf4_repo)).is_klein
    assert not detect_family(str(tmp_path)).is_klein
    assert default_dit("black-forest-labs/FLUX.2-dev") == "diffusers/FLUX.2-dev-bnb-4bit"
    assert default_dit(str(tiny_klein.base)) == str(tiny_klein.base)


def test_width_check_names_both_widths(tiny_klein, tiny):
    check_embedding_width(384, str(tiny_klein.nf4_repo))
    check_embedding_width(192, str(tiny.nf4_repo))
    with pytest.raises(EmbeddingWidthError, match=r"192 wide .* joint_attention_dim 384"):
        check_embedding_width(192, str(tiny_klein.distilled), encoder="Mistral")


def test_klein_embeddings_into_flux2_dev_dit_fail_before_loading(tiny, klein_server, monkeypatch, capsys):
    """The CLI pairs a Klein encoder server with the FLUX.2-dev DiT: refused in one line with both widths
    named and the model-mismatch exit code, and no weight (DiT, VAE, scheduler) is ever loaded."""
    import diffusers
    from flux2_client import _quantization, generation
    from flux2_client.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("a weight was loaded before the width check")

    monkeypatch.setattr(generation, "load_nf4_transformer", no_loading)
    monkeypatch.setattr(_quantization, "load_nf4_transformer", no_loading)
    monkeypatch.setattr(diffusers.AutoencoderKLFlux2, "from_pretrained", no_loading)
    monkeypatch.setattr(diffusers.FlowMatchEulerDiscreteScheduler, "from_pretrained", no_loading)
    argv = ["generate", "--server", klein_server.target, "--prompt", "a fox", "--model", str(tiny.pipeline)]
    assert main([*argv, "--device", "cpu", "--offload", "none", "--no-progress"]) == 6  # ExitCode.MODEL_MISMATCH
    err = capsys.readouterr().err
    message = err.splitlines()[-1]  # after "received embeddings ...": the embeddings came, the DiT refused them
    assert "Traceback" not in err and message.startswith("flux2-client: error: --dit: ")
    assert "384 wide" in message and "joint_attention_dim 192" in message
    assert str(tiny.pipeline) in message  # no --dit: the model's own transformer/


def test_plan_only_for_klein_reads_the_klein_config(tiny_klein, capsys):
    from flux2_client.cli import main

    assert main(["generate", "--plan-only", "--vram", "4GB", "--model", str(tiny_klein.distilled)]) == 0
    assert "memory plan" in capsys.readouterr().out


def test_planner_spec_from_config_matches_the_loaded_klein_dit(tiny_klein):
    """Before loading, the planner sizes a Klein DiT (its block counts, no guidance embedder) exactly as
    the loaded NF4 DiT's slabs will hold it."""
    from flux2_client.offload import spec_from_module
    from flux2_client.planner import spec_from_config

    config = json.loads((tiny_klein.nf4_repo / "transformer" / "config.json").read_text())
    from_config = spec_from_config(config)
    from_module = spec_from_module(load_nf4_transformer(str(tiny_klein.nf4_repo), device="cpu"))
    assert from_config.atoms == from_module.atoms
    assert from_config.other_bytes == from_module.other_bytes
    assert len(from_config.blocks()) == config["num_layers"] + config["num_single_layers"]


# --- client: images -------------------------------------------------------------------------------------


def _tight_vram(tiny_klein: TinyKleinPaths, workload) -> int:
    """A CPU budget holding the fixed costs plus 2.5 blocks: some blocks stream, others stay resident."""
    from diffusers import AutoencoderKLFlux2
    from flux2_client.offload import spec_from_module
    from flux2_client.planner import _group_units, activation_bytes, vae_decode_bytes

    spec = spec_from_module(
        load_nf4_transformer(str(tiny_klein.nf4_repo), device="cpu"),
        AutoencoderKLFlux2.from_pretrained(str(tiny_klein.distilled), subfolder="vae", dtype=torch.bfloat16),
    )
    work = max(activation_bytes(spec, workload), vae_decode_bytes(spec, workload, tiled=False))
    block = max(n for _, n in _group_units(spec, "block"))
    return int((spec.other_bytes + spec.vae_bytes + work + 2.5 * block) / 0.94)


def test_distilled_images_streamed_equal_klein_pipeline(tiny_klein, klein_server, klein_reference):
    """Distilled Klein: embeddings from the server, the NF4 DiT streamed by the planner; the images equal
    Flux2KleinPipeline encoding the prompts itself with the full Qwen3 encoder."""
    from diffusers import Flux2KleinPipeline
    from flux2_client.planner import Workload

    workload = Workload(PARAMS.height, PARAMS.width, batch=len(IMAGE_PROMPTS))
    pipe = load_pipeline(
        str(tiny_klein.distilled),
        dit=str(tiny_klein.nf4_repo),
        device="cpu",
        offload="plan",
        vram=_tight_vram(tiny_klein, workload),
        workload=workload,
        embedding_dim=384,
    )
    assert isinstance(pipe, Flux2KleinPipeline) and pipe.config.is_distilled
    plan = get_memory_plan(pipe)
    assert plan.mode == "stream" and plan.streamed_units and any(u.resident for u in plan.units)
    with RemoteTextEncoder(klein_server.target) as enc:
        embeds = enc.encode(IMAGE_PROMPTS).prompt_embeds
    ours = generate(pipe, embeds, PARAMS, progress=False)
    assert get_block_streamer(pipe).stats.copies >= len(plan.streamed_units) * PARAMS.num_inference_steps
    theirs = klein_reference(
        prompt=IMAGE_PROMPTS,
        height=PARAMS.height,
        width=PARAMS.width,
        num_inference_steps=PARAMS.num_inference_steps,
        guidance_scale=PARAMS.guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(PARAMS.seed + k) for k in range(len(IMAGE_PROMPTS))],
    ).images
    assert len(ours) == len(theirs) == 2
    for a, b in zip(arrays(ours), arrays(theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    assert arrays(ours)[0].std() > 1 and not np.array_equal(*arrays(ours))


def test_base_cli_images_with_cfg_equal_klein_pipeline(tiny_klein, klein_server, tmp_path):
    """Klein base through `flux2-client generate`: the DiT defaults to the model's own (bf16, quantized to
    NF4 on load), the negative prompt "" is encoded by the server, and real classifier-free guidance gives
    the images of Flux2KleinPipeline with its local encoder (which encodes "" itself)."""
    from diffusers import Flux2KleinPipeline
    from flux2_client.cli import main

    out = tmp_path / "base.png"
    argv = ["generate", "--server", klein_server.target, "--model", str(tiny_klein.base), "--out", str(out)]
    for prompt in IMAGE_PROMPTS:
        argv += ["--prompt", prompt]
    argv += ["--height", "64", "--width", "64", "--steps", "2", "--guidance", "4.0", "--seed", str(PARAMS.seed)]
    assert main([*argv, "--device", "cpu", "--offload", "none", "--no-progress"]) == 0
    ours = [Image.open(out.with_name(f"base_{i}.png")).convert("RGB") for i in range(len(IMAGE_PROMPTS))]

    transformer = load_nf4_transformer(str(tiny_klein.base), device="cpu")  # quantized on load, as the CLI does
    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_klein.base), transformer=transformer, dtype=torch.bfloat16)
    assert pipe.config.is_distilled is False
    kwargs = dict(height=64, width=64, num_inference_steps=2)

    gens = [torch.Generator("cpu").manual_seed(PARAMS.seed + k) for k in range(len(IMAGE_PROMPTS))]
    theirs = pipe(prompt=IMAGE_PROMPTS, guidance_scale=4.0, generator=gens, **kwargs).images
    for a, b in zip(arrays(ours), arrays(theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    # The negative pass matters: without guidance the same embeddings and seeds draw other images.
    with RemoteTextEncoder(klein_server.target) as enc:
        embeds = enc.encode(IMAGE_PROMPTS).prompt_embeds  # served from the cache the CLI filled
    gens = [torch.Generator("cpu").manual_seed(PARAMS.seed + k) for k in range(len(IMAGE_PROMPTS))]
    unguided = pipe(prompt_embeds=embeds, guidance_scale=1.0, generator=gens, **kwargs).images
    assert not np.array_equal(arrays(ours)[0], arrays(unguided)[0])


def test_remote_klein_pipeline_equals_klein_pipeline_with_its_local_encoder(klein_server, klein_reference, references):
    """`pipe(prompt=...)` on Flux2KleinRemotePipeline (prompts encoded by the server) gives the images of
    diffusers' Flux2KleinPipeline encoding them itself: step-distilled, and base with real classifier-free
    guidance, whose negative prompt "" the remote pipeline also sends to the server (once)."""
    from diffusers import Flux2KleinPipeline
    from flux2_client.endpoints import EncoderPool
    from flux2_client.remote_pipeline import Flux2KleinRemotePipeline, with_remote_text_encoder

    call_embeds = dict(height=64, width=64, num_inference_steps=2, guidance_scale=4.0)
    call = dict(prompt=IMAGE_PROMPTS, **call_embeds)
    sent: list[list[str]] = []
    with EncoderPool([klein_server.target]) as pool:

        class Recording:
            def encode(self, prompts):
                sent.append(list(prompts))
                return pool.encode(prompts)

        images = {}
        for distilled in (True, False):
            local = Flux2KleinPipeline(**klein_reference.components, is_distilled=distilled)
            remote = with_remote_text_encoder(local, Recording())
            assert isinstance(remote, Flux2KleinRemotePipeline) and remote.text_encoder is None
            assert remote.config.is_distilled is distilled
            gens = [torch.Generator("cpu").manual_seed(PARAMS.seed + k) for k in range(len(IMAGE_PROMPTS))]
            ours = arrays(remote(**call, generator=gens).images)
            gens = [torch.Generator("cpu").manual_seed(PARAMS.seed + k) for k in range(len(IMAGE_PROMPTS))]
            if distilled:  # diffusers' local encoding of the prompts, memoized (it is what prompt= computes)
                theirs = arrays(local(**call_embeds, prompt_embeds=references(IMAGE_PROMPTS), generator=gens).images)
            else:  # prompt= itself: diffusers encodes the prompts and the negative "" locally
                theirs = arrays(local(**call, generator=gens).images)
            for a, b in zip(ours, theirs, strict=True):
                np.testing.assert_array_equal(a, b)
            images[distilled] = ours
        embeds, text_ids = remote.encode_prompt(IMAGE_PROMPTS)
    assert torch.equal(embeds, references(IMAGE_PROMPTS))  # klein_reference.encode_prompt's answer
    assert torch.equal(text_ids, Flux2KleinPipeline._prepare_text_ids(embeds))
    assert sent[:3] == [IMAGE_PROMPTS, IMAGE_PROMPTS, [""]]  # distilled: no negative pass; base: "" once
    assert not np.array_equal(images[True][0], images[False][0])  # the negative pass changed the image


def test_load_pipeline_with_a_klein_encoder_refuses_the_flux2_dev_dit_before_loading(tiny, klein_server):
    from flux2_client.generation import load_pipeline

    with pytest.raises(EmbeddingWidthError, match=r"384 wide .* joint_attention_dim 192"):
        load_pipeline(str(tiny.pipeline), dit=str(tiny.nf4_repo), device="cpu", encoder=klein_server.target)
